"""The QLoRA gap: a QLoRA adapter learned on NF4-rounded weights, so which merge comes closest to what it saw?

Three candidates, each scored against the training view (the base's linear weights through bitsandbytes' own NF4
round trip, the adapter unmerged, fp32 compute): the full-precision merge loft writes, a merge into the
dequantised NF4 weights, and the adapter served unmerged on bitsandbytes 4-bit. The report names the closest.
"""

import gc
from pathlib import Path

from training.errors import LoftError
from training.merging.plan import ShardPlan, merged_shards, torch_dtype
from training.merging.sources import MergeJob
from training.merging.verify import Views, compare, logprobs, peft_view


class NF4:
    """bitsandbytes' own NF4 quantize -> dequantize on the weights bitsandbytes would quantize (runs on CPU)."""

    def __init__(self, keys: set, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64):
        self.keys, self.quant_type, self.double_quant, self.blocksize = keys, quant_type, double_quant, blocksize

    def __call__(self, w):
        import bitsandbytes.functional as bnb_f
        import torch

        flat = w.to(torch.float32).reshape(-1).contiguous()
        q, state = bnb_f.quantize_4bit(flat, blocksize=self.blocksize, quant_type=self.quant_type,
                                       compress_statistics=self.double_quant)
        return bnb_f.dequantize_4bit(q, state, quant_type=self.quant_type).reshape(w.shape).to(w.dtype)


def in_memory_merge(plan: ShardPlan, dtype_name: str, device: str, nf4):
    """The same shard merge, loaded into a model in memory instead of written (for the QLoRA candidates)."""
    import torch
    from transformers import AutoModelForCausalLM

    base_dir: Path = plan.base_dir
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch_dtype(dtype_name))  # real buffers, layout
    if plan.untie:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for _, tensors in merged_shards(plan, torch_dtype(dtype_name), device, nf4=nf4, progress=False):
        _, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise LoftError(f"merged tensors {unexpected[:3]} do not fit {base_dir}'s architecture")
    return model.to(device)


def qlora_gap(job: MergeJob, plan: ShardPlan, views: Views) -> dict:
    """Three candidates against the NF4 training view (bitsandbytes NF4 base + adapter, fp32 compute)."""
    quant, dtype_name, device, encoded = job.quant, job.dtype, job.device, views.encoded
    nf4 = NF4(plan.linear, quant["quant_type"], quant["double_quant"], quant["blocksize"])
    training = logprobs(peft_view(job.base_dir, job.adapter_dir, device, nf4=nf4), encoded, device)
    gc.collect()
    candidates = {
        f"merge into full precision, W + BA ({dtype_name}, loft)": views.merged,
        f"merge into dequantised NF4, deq(NF4(W)) + BA ({dtype_name})":
            logprobs(in_memory_merge(plan, dtype_name, device, nf4), encoded, device),
        f"unmerged NF4 + adapter (bitsandbytes 4-bit, {dtype_name} compute)":
            logprobs(peft_view(job.base_dir, job.adapter_dir, device, dtype_name, bnb=quant), encoded, device),
    }
    gc.collect()
    result = {name: compare(training, lp, encoded) for name, lp in candidates.items()}
    closest = min(result, key=lambda n: result[n]["kl_mean"])
    ranked = sorted(result.values(), key=lambda m: m["kl_mean"])
    return {
        "training_view": f"base linears through bitsandbytes' {quant['quant_type']} round trip (double quant "
                         f"{quant['double_quant']}, blocksize {quant['blocksize']}) + adapter unmerged, fp32",
        "candidates": result,
        "closest": closest,
        "kl_ratio_next_to_closest": ranked[1]["kl_mean"] / max(ranked[0]["kl_mean"], 1e-12),
        "nf4_view_vs_full_precision_view": compare(views.reference, training, encoded),
    }
