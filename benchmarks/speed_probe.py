"""What `loft bench speed` measures inside a training process, the same way for every runner.

Every runner (Axolotl through the recipe; the naive and the tuned TRL scripts; Unsloth, whose trainers are TRL's)
is a Hugging Face Trainer, so one TrainerCallback measures them all:

  * tokens: non-padding input tokens of every forward pass that builds a graph, counted at the input embedding.
    Forwards under no_grad (DPO's reference pass, evaluation) are not training work and are not counted;
    gradient-checkpointing recomputation re-runs decoder layers, never the embedding, so it is not counted twice.
  * time: a CUDA-synchronised wall clock at the start of training and at the end of every optimizer step.
  * memory: torch's peak allocated and reserved bytes over the whole process (model loading included) and since
    training began, as training/plugins/peak.py measures them for the health guard too.

The callback writes raw marks to a JSON file; benchmarks/speed.py turns them into tokens/s (see `throughput`).
In an Axolotl run the same callback arrives through SpeedPlugin (listed under `plugins:` in the resolved
recipe), which also applies the memory cap and records an out-of-memory crash as "does not fit".
"""

import json
import os
import sys
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from benchmarks import memory_trace
from training.plugins.peak import GIB, PROBE, local_device

# Environment the harness sets for an Axolotl child process (SpeedPlugin reads it there).
ENV_OUT = "LOFT_SPEED_OUT"
ENV_CAP = "LOFT_SPEED_CAP_GIB"
ENV_PAD = "LOFT_SPEED_PAD_ID"
ENV_PROFILE_STEP = "LOFT_SPEED_PROFILE_STEP"
ENV_TRACE = "LOFT_SPEED_TRACE"  # 1: the profiled step's whole timeline is also written, gzipped, for chrome://tracing


def rank_path(path: str | Path) -> Path:
    """Where this rank writes its record: the path itself on rank 0, NAME.rankR.json beside it on the others."""
    path, rank = Path(path), int(os.environ.get("RANK", "0"))
    return path if rank == 0 else path.with_name(f"{path.stem}.rank{rank}{path.suffix}")


def apply_cap(cap_gib: float | None) -> None:
    """Emulate a smaller card: the caching allocator refuses to hold more than cap_gib on this rank's GPU."""
    if not cap_gib or not torch.cuda.is_available():
        return
    device = local_device()
    total = torch.cuda.get_device_properties(device).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap_gib * GIB / total), device)


def is_oom(exc: BaseException) -> bool:
    """torch raises OutOfMemoryError; bitsandbytes and some kernels raise a RuntimeError that says so."""
    return isinstance(exc, torch.OutOfMemoryError) or "out of memory" in str(exc).lower()


def device_name() -> str:
    return torch.cuda.get_device_name(local_device()) if torch.cuda.is_available() else "cpu"


def write(path: str | Path, record: dict) -> None:
    record.setdefault("rank", int(os.environ.get("RANK", "0")))
    rank_path(path).write_text(json.dumps(record, indent=1))


def does_not_fit(path: str | Path, runner: str, cap_gib: float | None, exc: BaseException,
                 meta: dict | None = None) -> dict:
    memory_trace.write_if_recording(rank_path(path))
    record = {"runner": runner, "status": "does_not_fit", "cap_gib": cap_gib, "device": device_name(),
              "error": str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__, **PROBE.record(),
              **(meta or {})}
    write(path, record)
    return record


class TokenCounter:
    """Forward pre-hook on the input embedding: adds the non-padding ids of each grad-enabled forward.

    The sum stays on the device (no sync per forward); `value()` reads it once per optimizer step.
    """

    def __init__(self, pad_id: int):
        self.pad_id = pad_id
        self.total = None
        self.handle = None

    def __call__(self, module, args, kwargs):
        if not torch.is_grad_enabled():
            return
        ids = args[0] if args else kwargs["input"]
        n = (ids != self.pad_id).sum()
        self.total = n if self.total is None else self.total + n

    def attach(self, model) -> None:
        if self.handle is None:
            self.handle = model.get_input_embeddings().register_forward_pre_hook(self, with_kwargs=True)

    def value(self) -> int:
        return 0 if self.total is None else int(self.total)


def _sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class SpeedCallback(TrainerCallback):
    """Marks (seconds, tokens so far) at train begin and at every optimizer step end; writes them at train end.

    profile_step: if set, that step (1-based, after the timed ones) runs under torch.profiler and its top
    kernels are written next to the JSON; the harness never times it.
    meta: what the runner adds to its record (its settings and package versions).
    losses: the training loss the trainer logged at each step, to check that a faster setting learns the same.
    """

    def __init__(self, out_path, runner: str, pad_id: int, cap_gib=None, profile_step: int | None = None,
                 meta: dict | None = None):
        self.out_path = Path(out_path)
        self.runner = runner
        self.counter = TokenCounter(pad_id)
        self.cap_gib = cap_gib
        self.profile_step = profile_step
        self.marks: list[tuple[float, int]] = []
        self.profiler = None
        self.top_kernels = None
        self.timeline = None  # the profiled step: wall time against the device's busy time
        self.meta = meta or {}
        self.losses: list[float] = []  # logged train loss per step (averaged over ranks by the Trainer)

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        self.counter.attach(model)
        _sync()
        PROBE.start_training()  # what loading took; training's own peak starts here
        self.marks = [(time.perf_counter(), self.counter.value())]
        if self.profile_step == 1:
            self._start_profile()

    def _start_profile(self) -> None:
        """From the end of the step before the profiled one: the same interval a timed step is measured over, so
        the time between steps (the next batch, logging, callbacks) is in the profile too."""
        self.profiler = torch.profiler.profile(
            activities=[torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA])
        self.profiler.start()
        self.profile_started = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        _sync()
        self.marks.append((time.perf_counter(), self.counter.value()))
        if self.profiler is not None:
            wall = time.perf_counter() - self.profile_started
            self.profiler.stop()
            self.top_kernels = top_kernels(self.profiler, self.out_path.with_suffix(".profile.txt"))
            self.timeline = {"step_ms": round(wall * 1000, 1), **device_timeline(self.profiler)}
            if os.environ.get(ENV_TRACE) == "1":
                write_trace(self.profiler, self.out_path.with_suffix(".trace.json.gz"))
            self.profiler = None
        elif self.profile_step and state.global_step + 1 == self.profile_step:
            self._start_profile()

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(round(float(logs["loss"]), 4))

    def on_train_end(self, args, state, control, **kwargs):
        write(self.out_path, self.record())

    def record(self) -> dict:
        return {"runner": self.runner, "status": "ok", "cap_gib": self.cap_gib, "device": device_name(),
                "torch": torch.__version__, "marks": self.marks, "losses": self.losses,
                "top_kernels": self.top_kernels, "timeline": self.timeline, **PROBE.record(), **self.meta}


def device_timeline(prof, gap_us: float = 20.0) -> dict:
    """How the device spent the profiled step: kernels and copies merged into busy intervals; the idle time between
    them longer than gap_us is time the device waited for the host (launches, Python, synchronisations)."""
    return timeline_of(sorted((e.time_range.start, e.time_range.end) for e in prof.events()
                              if e.device_type == torch.autograd.DeviceType.CUDA), gap_us)


def timeline_of(spans: list[tuple[float, float]], gap_us: float = 20.0) -> dict:
    """spans: sorted (start, end) of device events in microseconds, possibly overlapping (several streams)."""
    busy = idle = 0.0
    end = None
    for start, stop in spans:
        if end is None or start > end:
            if end is not None and start - end > gap_us:
                idle += start - end
            busy += stop - start
            end = stop
        elif stop > end:
            busy += stop - end
            end = stop
    return {"device_events": len(spans), "device_busy_ms": round(busy / 1000, 1),
            "device_span_ms": round((spans[-1][1] - spans[0][0]) / 1000, 1) if spans else 0.0,
            "device_idle_gaps_ms": round(idle / 1000, 1)}


def write_trace(prof, path: Path) -> None:
    import gzip
    import shutil

    raw = path.with_suffix("")  # .trace.json
    prof.export_chrome_trace(str(raw))
    with open(raw, "rb") as src, gzip.open(path, "wb") as dst:
        shutil.copyfileobj(src, dst)
    raw.unlink()


def top_kernels(prof, table_path: Path, n: int = 25) -> list[dict]:
    """The n ops/kernels with the most self device time in the profiled step; the full table goes to table_path,
    with the ops that took the most host time after it (where the host, not the device, sets the pace)."""
    key = "self_device_time_total"
    events = prof.key_averages()
    table_path.write_text(events.table(sort_by=key, row_limit=40) + "\n\nby host time:\n"
                          + events.table(sort_by="self_cpu_time_total", row_limit=40))
    total = sum(getattr(e, key, 0) for e in events) or 1
    rows = sorted(events, key=lambda e: getattr(e, key, 0), reverse=True)[:n]
    return [{"name": e.key[:120], "self_device_ms": round(getattr(e, key, 0) / 1000, 2),
             "share": round(getattr(e, key, 0) / total, 3), "calls": e.count} for e in rows]


def callback_from_env(runner: str = "loft") -> SpeedCallback:
    profile = os.environ.get(ENV_PROFILE_STEP)
    cap = os.environ.get(ENV_CAP)
    return SpeedCallback(os.environ[ENV_OUT], runner, int(os.environ.get(ENV_PAD, "0")),
                         cap_gib=float(cap) if cap else None, profile_step=int(profile) if profile else None)


def measure(args, runner: str, build_trainer, meta: dict) -> int:
    """A runner's whole measurement: peaks over the process (the shared probe), the memory cap, the callback, and
    an out-of-memory error recorded as "does not fit" (any other error propagates: the harness reports it with the
    log)."""
    PROBE.watch()
    apply_cap(args.cap_gib)
    memory_trace.start()
    callback = SpeedCallback(args.out, runner, args.pad_id, cap_gib=args.cap_gib, profile_step=args.profile_step,
                             meta=meta)
    try:
        build_trainer(args, callback).train()
    except Exception as exc:
        if not is_oom(exc):
            raise
        does_not_fit(args.out, runner, args.cap_gib, exc, meta)
    return 0


def install_oom_hook(out_path: str, runner: str, cap_gib) -> None:
    """An uncaught out-of-memory error in a process we don't drive (Axolotl's CLI) still leaves a record."""
    previous = sys.excepthook

    def hook(kind, exc, tb):
        if is_oom(exc):
            does_not_fit(out_path, runner, cap_gib, exc)
        previous(kind, exc, tb)

    sys.excepthook = hook


try:  # Axolotl is only needed in Axolotl's own process; the TRL baseline never touches the plugin.
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


class SpeedPlugin(BasePlugin):
    """Axolotl plugin: `plugins: [benchmarks.speed_probe.SpeedPlugin]` (the harness adds it to the recipe)."""

    def register(self, cfg):
        if ENV_OUT not in os.environ:
            return
        cap = os.environ.get(ENV_CAP)
        PROBE.watch()
        apply_cap(float(cap) if cap else None)
        memory_trace.start()
        install_oom_hook(os.environ[ENV_OUT], "loft", float(cap) if cap else None)

    def add_callbacks_post_trainer(self, cfg, trainer):
        return [callback_from_env("loft")] if ENV_OUT in os.environ else []
