"""What causal attention's forward and backward hold on the GPU at long-row lengths, per kernel (GPU host only).

    CUDA_VISIBLE_DEVICES=0 python3 benchmarks/gpu/attention_memory.py > $OUT/attention-memory.json

Why: the longest Llama-3.1-8B QLoRA rows under a 12 GiB cap failed on one allocation of 32 KB a token (1.88 GiB at
61,440 tokens) for Loft and Unsloth alike. This measures, at Llama-3.1-8B's attention shape (32 query heads, 8 K/V
heads, 128 wide), the peak memory above the inputs and the largest single allocation of forward + backward for:
SDPA as transformers calls it (grouped K/V, cuDNN on Hopper), SDPA with K/V repeated, SDPA forced to
FlashAttention-2, and training/plugins/long_attention.py (cuDNN once per K/V head). The same script checks that
the last one's gradients match SDPA's on a shorter row.
"""

import json
import sys

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.functional import scaled_dot_product_attention as sdpa

from training.plugins.long_attention import STATE, long_causal

HQ, HKV, D = 32, 8, 128


def variants():
    def stock(q, k, v):
        return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    def repeated(q, k, v):
        return sdpa(q, k.repeat_interleave(HQ // HKV, 1), v.repeat_interleave(HQ // HKV, 1), is_causal=True)

    def flash(q, k, v):
        with sdpa_kernel([SDPBackend.FLASH_ATTENTION]):
            return sdpa(q, k, v, is_causal=True, enable_gqa=True)

    return {"sdpa-gqa (cuDNN)": stock, "sdpa-repeated": repeated, "sdpa-flash-gqa": flash,
            "grouped-cudnn (long_attention)": long_causal}


def largest_allocation(fn) -> int:
    torch.cuda.memory._record_memory_history(max_entries=100000)
    try:
        fn()
        torch.cuda.synchronize()
        snap = torch.cuda.memory._snapshot()
    finally:
        torch.cuda.memory._record_memory_history(enabled=None)
    sizes = [e["size"] for trace in snap["device_traces"] for e in trace if e["action"] == "alloc"]
    return max(sizes, default=0)


def measure(name, fn, s: int) -> dict:
    q = torch.randn(1, HQ, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(1, HKV, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(1, HKV, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    grad = torch.randn(1, HQ, s, D, device="cuda", dtype=torch.bfloat16)

    def step():
        fn(q, k, v).backward(grad)
        q.grad = k.grad = v.grad = None

    row = {"variant": name, "tokens": s}
    try:
        step()  # warm-up: kernels chosen, workspaces sized
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        step()
        end.record()
        torch.cuda.synchronize()
        row.update(fwd_bwd_ms=round(start.elapsed_time(end), 1),
                   peak_above_inputs_gib=round((torch.cuda.max_memory_allocated() - base) / 2**30, 3),
                   largest_allocation_gib=round(largest_allocation(step) / 2**30, 3))
        row["kb_per_token"] = round(row["peak_above_inputs_gib"] * 2**30 / s / 1024, 1)
    except RuntimeError as err:
        row["error"] = str(err).splitlines()[0][:200]
    del q, k, v, grad
    torch.cuda.empty_cache()
    return row


def gradients_match(s: int = 8192) -> dict:
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, h, s, D, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for h in (HQ, HKV, HKV))
    grad = torch.randn(1, HQ, s, D, device="cuda", dtype=torch.bfloat16)
    out = {}
    for name, fn in (("sdpa", lambda: sdpa(q, k, v, is_causal=True, enable_gqa=True)),
                     ("long", lambda: long_causal(q, k, v))):
        o = fn()
        o.backward(grad)
        out[name] = [o.detach().float(), q.grad.float(), k.grad.float(), v.grad.float()]
        q.grad = k.grad = v.grad = None
    rel = [((a - b).norm() / b.norm()).item() for a, b in zip(out["long"], out["sdpa"])]
    return {"tokens": s, "relative_error": dict(zip(["out", "dq", "dk", "dv"], [round(r, 5) for r in rel])),
            "match": all(r < 2e-2 for r in rel)}


def main() -> None:
    report = {"device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "cudnn": torch.backends.cudnn.version(), "shape": f"1 x S x {HQ}/{HKV} heads x {D}"}
    try:
        report["gradients"] = gradients_match()
    except RuntimeError as err:
        report["gradients"] = {"error": str(err).splitlines()[0][:200]}
    print(json.dumps(report["gradients"]), file=sys.stderr, flush=True)
    rows = []
    for s in [int(a) for a in sys.argv[1:]] or [65536]:
        for name, fn in variants().items():
            rows.append(measure(name, fn, s))
            print(json.dumps(rows[-1]), file=sys.stderr, flush=True)
    report["rows"] = rows
    report["long_attention_refused"] = STATE["refused"]  # set if a cuDNN call refused and SDPA stood in
    print(json.dumps(report, indent=1))


if __name__ == "__main__":
    main()
