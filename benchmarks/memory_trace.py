"""What held the GPU's memory when a run did not fit: the failed allocation and the live blocks, by origin.

Set LOFT_SPEED_MEMORY_TRACE=1 for a `loft bench speed` run: every runner's process then records torch's allocator
history (Python frames of each allocation), and an out-of-memory error writes NAME.memory.txt beside the record:
the size that failed, the largest live blocks with the Python line that made each, and the live bytes grouped by
that line. Blocks allocated with no Python frame come from the autograd engine (a backward kernel's outputs and
workspaces). Recording slows the step; it is for finding the tensor that breaks the cap, not for timing.
"""

import os
from collections import defaultdict
from pathlib import Path

import torch

ENV = "LOFT_SPEED_MEMORY_TRACE"
OWN = ("torch/", "/contextlib.py", "benchmarks/memory_trace.py")  # frames that say nothing about who asked


def wanted() -> bool:
    return os.environ.get(ENV) == "1" and torch.cuda.is_available()


def start() -> bool:
    if not wanted():
        return False
    torch.cuda.memory._record_memory_history(max_entries=200_000, stacks="python")
    return True


def origin(frames: list[dict]) -> str:
    """The innermost frame outside torch itself, as file:line function; the autograd engine when none."""
    for frame in frames:
        name = frame.get("filename", "")
        if name and not any(own in name for own in OWN):
            short = "/".join(name.split("/")[-3:])
            return f"{short}:{frame.get('line')} {frame.get('name')}"
    return "(no Python frame: autograd backward)"


def live_at_oom(trace: list[dict]) -> tuple[dict | None, list[tuple[int, str]]]:
    """Replay one device's recorded allocations and frees up to its last out-of-memory event: (that event, the
    blocks live at that moment as (bytes, origin)). Blocks allocated before the recorded window are not in it."""
    ooms = [i for i, e in enumerate(trace) if e.get("action") == "oom"]
    if not ooms:
        return None, []
    live = {}
    for event in trace[:ooms[-1]]:
        if event.get("action") == "alloc":
            live[event["addr"]] = (event["size"], origin(event.get("frames", [])))
        elif event.get("action") in ("free_requested", "free_completed"):
            live.pop(event.get("addr"), None)
    return trace[ooms[-1]], list(live.values())


def summary(snapshot: dict, top: int = 25) -> str:
    gib = lambda n: f"{n / 2**30:6.3f} GiB"  # noqa: E731
    lines = []
    for trace in snapshot.get("device_traces", []):
        oom, blocks = live_at_oom(trace)
        if oom is None:
            continue
        lines.append(f"failed allocation: {gib(oom.get('size', 0))} from {origin(oom.get('frames', []))}")
        lines.append(f"live at that moment, allocated within the recorded window: {gib(sum(s for s, _ in blocks))} "
                     f"in {len(blocks)} blocks (the rest, e.g. the weights, came before it)")
        lines.append("largest:")
        lines += [f"  {gib(s)}  {where}" for s, where in sorted(blocks, reverse=True)[:top]]
        grouped = defaultdict(lambda: [0, 0])
        for s, where in blocks:
            grouped[where][0] += s
            grouped[where][1] += 1
        lines.append("by origin:")
        lines += [f"  {gib(s)} ({n:>5} blocks)  {where}"
                  for where, (s, n) in sorted(grouped.items(), key=lambda kv: -kv[1][0])[:top]]
    return "\n".join(lines or ["no out-of-memory event in the recorded history"]) + "\n"


def write_if_recording(record_path: str | Path) -> Path | None:
    """After an out-of-memory error: NAME.memory.txt beside the record, when recording was asked for."""
    if not wanted():
        return None
    path = Path(record_path).with_suffix(".memory.txt")
    try:
        path.write_text(summary(torch.cuda.memory._snapshot()))
    except Exception as err:  # the record of the failed run matters more than its memory summary
        path.write_text(f"no summary: {type(err).__name__}: {err}\n")
    return path
