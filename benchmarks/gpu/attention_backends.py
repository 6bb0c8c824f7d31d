"""Which fused attention PyTorch's SDPA runs for the 7-8B recipes' shapes, and what each costs (GPU host only).

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu/attention_backends.py > $OUT/attention-backends.json

Why: profiled on one H200 (benchmarks/results/vs-peers-2026-11-30.json), Loft's attention ran PyTorch's own
FlashAttention-2 port while TRL and Unsloth ran cuDNN's Hopper kernels, ~40% faster in the backward pass. Moving
cuDNN first in SDPA's priority order did not change Loft's speed. One reading: with no mask, transformers hands
grouped-query K/V to SDPA with `enable_gqa=True` (its `use_gqa_in_sdpa`), and a backend that cannot take grouped
heads is skipped; with a mask (TRL, Unsloth) it repeats K/V to the query heads first. This times forward and
forward+backward of causal attention at the recipes' shapes, both ways, under each backend order, and names the
kernel that ran (from the profiler), so the lever is decided by a measurement, not by that reading.
"""

import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

# (name, batch, tokens, query heads, key/value heads, head size): the configs of the speed cases.
SHAPES = [("qwen2.5-7b 1x8192", 1, 8192, 28, 4, 128), ("llama-3.1-8b 2x4096", 2, 4096, 32, 8, 128),
          ("llama-3.1-8b 1x32768", 1, 32768, 32, 8, 128)]
ORDERS = {
    "default": None,
    "cudnn-first": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION,
                    SDPBackend.MATH],
    "flash-only": [SDPBackend.FLASH_ATTENTION],
    "cudnn-only": [SDPBackend.CUDNN_ATTENTION],
}


def attention(q, k, v, groups: int, repeat: bool):
    if repeat:  # what transformers' repeat_kv does when it will not pass enable_gqa
        k = k.repeat_interleave(groups, dim=1)
        v = v.repeat_interleave(groups, dim=1)
        return sdpa(q, k, v, is_causal=True)
    return sdpa(q, k, v, is_causal=True, enable_gqa=True)


def timed(fn, iters: int = 10) -> float:
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return round(start.elapsed_time(end) / iters, 3)


def kernels(fn) -> list[str]:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    names = {e.key for e in prof.key_averages()}
    return sorted(n[:90] for n in names if any(w in n.lower() for w in ("flash", "cudnn", "fmha", "attention",
                                                                         "sdpa", "efficient")))


def case(shape, order_name: str, repeat: bool) -> dict:
    name, b, s, hq, hkv, d = shape
    q = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(b, hq, s, d, device="cuda", dtype=torch.bfloat16)
    order = ORDERS[order_name]

    def forward():
        return attention(q, k, v, hq // hkv, repeat)

    def both():
        forward().backward(grad)

    row = {"shape": name, "kv": "repeated" if repeat else "enable_gqa", "order": order_name}
    try:
        if order is None:
            row.update(fwd_ms=timed(forward), fwd_bwd_ms=timed(both), kernels=kernels(both))
        else:
            with sdpa_kernel(order, set_priority=True):
                row.update(fwd_ms=timed(forward), fwd_bwd_ms=timed(both), kernels=kernels(both))
    except RuntimeError as err:  # no backend in this order takes these inputs
        row["error"] = str(err).splitlines()[0][:200]
    torch.cuda.empty_cache()
    return row


def main() -> None:
    rows = []
    for shape in SHAPES:
        for repeat in (False, True):
            for order in ORDERS:
                row = case(shape, order, repeat)
                rows.append(row)
                print(json.dumps({k: v for k, v in row.items() if k != "kernels"}), file=sys.stderr, flush=True)
    print(json.dumps({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                      "cudnn": torch.backends.cudnn.version(), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
