"""How a speed run's step marks become its numbers: tokens/s, MFU, whether it fit the cap, per-GPU peaks when
several ranks ran; and the one line `loft bench speed` prints per runner.

One throughput measure for every runner (benchmarks/speed_probe.py counts, this module divides):
  tokens/s = non-padding input tokens of the training forward passes in optimizer steps warmup+1 .. warmup+steps
             ÷ CUDA-synchronised wall-clock seconds from the end of step `warmup` to the end of the last step.
  Data loading, logging and the optimizer step are inside the clock; model loading and warm-up are not.
  MFU = 6 · N_params · tokens/s ÷ the GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s). N_params counts every
  parameter of the base model, as if all were trained in bf16: for LoRA and QLoRA this is the usual 6N
  convention, not the hardware's FLOPs (frozen weights need no weight gradients; QLoRA also dequantizes).
"""

from training.errors import LoftError

# Dense bf16 tensor-core peaks (TFLOP/s, no sparsity) from the vendors' datasheets; first match wins.
PEAK_TFLOPS = [("H100 PCIe", 756.0), ("H100 NVL", 835.0), ("H100", 989.4), ("H200", 989.4), ("GH200", 989.4),
               ("A100", 312.0), ("L40S", 362.0), ("L4", 121.0), ("RTX 4090", 165.2), ("RTX 3090", 71.0),
               ("A10G", 70.0)]


def peak_tflops(device: str) -> float | None:
    return next((tf for key, tf in PEAK_TFLOPS if key.lower() in device.lower()), None)


def mfu(params: int, tokens_per_s: float, peak: float | None) -> float | None:
    return 6 * params * tokens_per_s / (peak * 1e12) if peak and tokens_per_s else None


def throughput(marks: list, warmup: int, steps: int) -> dict:
    """marks[0] = (seconds, tokens) at train begin, marks[k] at the end of optimizer step k (see the docstring)."""
    if len(marks) < warmup + steps + 1:
        raise LoftError(f"the run logged {len(marks) - 1} steps, fewer than warmup {warmup} + steps {steps}; "
                        "the dataset ran out or training stopped early")
    (t0, n0), (t1, n1) = marks[warmup], marks[warmup + steps]
    step_s = sorted(b[0] - a[0] for a, b in zip(marks[warmup:warmup + steps], marks[warmup + 1:warmup + steps + 1]))
    if n1 == n0:
        raise LoftError("the token counter saw no training tokens; the input embedding was never called with grad")
    return {"tokens": n1 - n0, "seconds": round(t1 - t0, 3), "tokens_per_s": round((n1 - n0) / (t1 - t0), 1),
            "tokens_per_step": round((n1 - n0) / steps), "step_s_median": round(step_s[len(step_s) // 2], 3)}


def fits(peak_reserved_gib: float | None, cap_gib: float | None) -> bool | None:
    """Did the run stay inside the cap? (None when no cap or no GPU.) The allocator enforces it; this reports it."""
    if cap_gib is None or peak_reserved_gib is None:
        return None
    return peak_reserved_gib <= cap_gib


def summarize(result: dict, params: int, warmup: int, steps: int, peak_override: float | None) -> dict:
    others = result.pop("other_ranks", [])
    failed = [r for r in others if r.get("status") != "ok"]
    if result.get("status") != "ok" or failed:
        return result if result.get("status") != "ok" else {**failed[0], "runner": result["runner"]}
    try:  # one runner that stopped early is that runner's error, not the end of the whole comparison
        summary = dict(result, **throughput(result.pop("marks"), warmup, steps))
        extra = sum(throughput(r["marks"], warmup, steps)["tokens"] for r in others)
    except LoftError as err:
        return dict(result, status="error", error=str(err))
    gpus = 1 + len(others)
    if others:  # data parallel: each rank trains its own tokens in the same wall-clock window (rank 0's clock)
        summary["tokens"] += extra
        summary["tokens_per_s"] = round(summary["tokens"] / summary["seconds"], 1)
        summary["tokens_per_step"] = round(summary["tokens"] / steps)
        summary["per_gpu"] = [{k: r.get(k) for k in ("rank", "peak_allocated_gib", "peak_reserved_gib",
                                                       "train_peak_allocated_gib", "train_peak_reserved_gib")}
                              for r in [result, *others]]
        for key in ("peak_allocated_gib", "peak_reserved_gib", "train_peak_allocated_gib", "train_peak_reserved_gib"):
            values = [r[key] for r in summary["per_gpu"] if r.get(key) is not None]
            summary[key] = max(values) if values else None  # the busiest GPU decides what card is needed
    summary["gpus"] = gpus
    peak = peak_override or peak_tflops(summary["device"])
    summary["peak_tflops"] = peak
    summary["mfu"] = round(mfu(params, summary["tokens_per_s"], peak * gpus), 4) if peak else None
    summary["fits_cap"] = fits(summary.get("peak_reserved_gib"), summary.get("cap_gib"))
    return summary


def line(r: dict) -> str:
    name = r["runner"]
    if r.get("status") == "does_not_fit":
        return f"  {name:9s} does not fit at {r.get('cap_gib')} GiB ({r.get('error', '')[:80]})"
    if r.get("status") == "cannot_run":
        return f"  {name:9s} cannot run here: {r.get('reason')}"
    if r.get("status") != "ok":
        return f"  {name:9s} failed: {r.get('error')}"
    m = f"{r['mfu'] * 100:.1f}%" if r.get("mfu") is not None else "n/a"
    return (f"  {name:9s} {r['tokens_per_s']:>10,.0f} tok/s  {r['tokens_per_step']:>8,} tok/step  "
            f"{r['step_s_median']:>6.2f} s/step  alloc {r['peak_allocated_gib']} GiB  "
            f"reserved {r['peak_reserved_gib']} GiB  MFU {m}")
