"""The one peak-memory probe: what "measured peak" means in health.json (the guard, `loft doctor --measure`) and in
`loft bench speed`'s records, so that the estimator's calibration compares like with like.

Axolotl resets torch's peak counters at every memory log (axolotl.utils.bench.gpu_memory_usage_all): read after
one of those, torch's peak is only the peak since the last log (on the GPU host every `--measure` once read
5.42 GiB, the last step alone). The probe does not lose those spans: once it watches, a reset first folds the
peaks so far into its own, then resets. Training's start splits the process in two:

    load_peak_*   before the trainer began (model loading, k-bit preparation)
    train_peak_*  from the trainer's start on
    peak_*        the whole process: the larger of the two; the estimator's `Estimate.allocated`

The counters are process-wide, so the probe is too (PROBE): the guard and the speed callback share it, and the first
of them to see training start marks it. Torch only: the TRL and Unsloth runners of `loft bench speed` use it as well.
"""

import os

import torch

GIB = 2**30


def local_device() -> int:
    """This rank's GPU: LOCAL_RANK under accelerate/torchrun, 0 in a single process."""
    return int(os.environ.get("LOCAL_RANK", "0"))


class PeakProbe:
    def __init__(self):
        self.folded = [0, 0]  # allocated, reserved bytes: peaks of the spans a reset closed since training began
        self.load: tuple[int, int] | None = None  # peaks before training began; None until it begins

    def watch(self) -> None:
        """From now on a reset of torch's peak counters folds the peaks so far into this probe first."""
        if not torch.cuda.is_available() or getattr(torch.cuda.reset_peak_memory_stats, "loft_probe", None):
            return
        original = torch.cuda.reset_peak_memory_stats

        def folding_reset(device=None):
            self.folded = list(self._now())
            original(device)

        folding_reset.loft_probe, folding_reset.original = self, original
        torch.cuda.reset_peak_memory_stats = torch.cuda.memory.reset_peak_memory_stats = folding_reset

    def start_training(self) -> None:
        """Close the loading span and count training's from here; a second call (another callback) changes nothing."""
        if self.load is not None or not torch.cuda.is_available():
            return
        self.watch()
        self.load = self._now()
        self.folded = [0, 0]
        reset = torch.cuda.reset_peak_memory_stats
        getattr(reset, "original", reset)(local_device())

    def record(self) -> dict:
        """Peaks in GiB: the whole process, training's and loading's (None without a CUDA device)."""
        if not torch.cuda.is_available():
            return {"peak_allocated_gib": None, "peak_reserved_gib": None}
        train, load = self._now(), self.load or (0, 0)
        gib = lambda n: round(n / GIB, 3)  # noqa: E731
        return {"peak_allocated_gib": gib(max(train[0], load[0])), "peak_reserved_gib": gib(max(train[1], load[1])),
                "train_peak_allocated_gib": gib(train[0]), "train_peak_reserved_gib": gib(train[1]),
                "load_peak_allocated_gib": gib(load[0]), "load_peak_reserved_gib": gib(load[1])}

    def _now(self) -> tuple[int, int]:
        device = local_device()
        return (max(self.folded[0], torch.cuda.max_memory_allocated(device)),
                max(self.folded[1], torch.cuda.max_memory_reserved(device)))


PROBE = PeakProbe()

