"""Fewer host stalls per optimizer step: the Trainer's bookkeeping walks the whole PEFT model several times a step.

    plugins:
      - axolotl.integrations.liger.LigerPlugin
      - training.plugins.lean.LeanStepPlugin

Why: on full-length rows the GPU sat idle 86 ms of a 633 ms Llama-3.1-8B bf16 LoRA step, waiting for the host
(Unsloth: 5 ms; one profiled step each on an H200, 2026-11-30, benchmarks/results/vs-peers-2026-11-30-round2.json).
The trace of that step shows the longest wait, 22 ms, right after the backward pass: transformers' Trainer checks each
micro-batch's loss for NaN/Inf (`logging_nan_inf_filter`, which makes the host wait for the backward pass to end),
and then, with the GPU idle, counts the model's parameters for its FLOPs log (`floating_point_ops` calls
`num_parameters`, a walk over the PEFT model's ~2,700 modules: 18 ms on a 32-layer model on this project's CPU),
lists them again for gradient clipping, and again for `model.zero_grad()` after the optimizer step (~10 ms each).
Each step also begins with two more walks while the GPU has nothing queued: the Trainer's `model.train()` sets the
training flag on every module again, and Axolotl's `compute_loss` calls accelerate's `unwrap_model`, which looks
through every module for a compiled region (on this project's CPU, sampled with py-spy over 32 steps of a 32-layer
model: ~23 ms and ~11 ms a step).

What changes, none of it in what training computes:
- the parameter count behind the FLOPs log is taken once (Unsloth does the same, unsloth_zoo 2026.10.9,
  temporary_patches/misc.py `_cached_flops`: "num_parameters walks the whole model every step");
- gradient clipping and zeroing use the trainable parameters listed at the first step: the tensors the walks
  find (a frozen parameter never gets a gradient), in the same order;
- `model.train()` returns at once when every module is already in training mode (what the walk would leave);
  after `model.eval()` (evaluation) the next `train()` walks as before;
- the model `unwrap_model` finds inside the trainer's model is remembered (the wrappers do not change mid-run);
- `logging_nan_inf_filter` is off: each micro-batch's loss is added to the logged loss as it is, so a NaN or Inf
  reaches the log, where the health guard stops the run, instead of being replaced by the running average.
Left as they are where the trainable set changes during a run (LISA, ReLoRA) or where DeepSpeed or FSDP own
clipping.

Inside the step, with `sample_packing` and `attn_implementation: sdpa`, Axolotl's attention router asks the GPU in
every attention layer how many documents each row holds (`int(...)` on a GPU tensor), and for rows of several
documents where they start and how long the longest is (`nonzero()`, `int(max)`): a host sync per layer, twice per
layer under gradient checkpointing (71 `cudaStreamSynchronize` in one profiled Qwen2.5-7B step, 28 layers; Unsloth's
step: 5). Each sync lets the GPU run dry before the host can queue the next kernels. The answers depend only on the
batch's position ids, one tensor that every layer of a forward pass (and its recomputation) is handed, so they are
computed at the first layer and reused while that tensor is alive and unchanged: one sync per micro-batch.
"""

import types
import weakref

from training.plugins import lever

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


def sharded(trainer) -> bool:
    """True where DeepSpeed or FSDP hold the weights: they clip and zero through their own engines, and no rank
    sees a whole weight (LoftDPOTrainer's chunked LM head and fused kernels step aside there too)."""
    return bool(getattr(trainer, "is_deepspeed_enabled", False) or getattr(trainer, "is_fsdp_enabled", False))


def once_per_tensor(fn):
    """fn(position_ids), computed once for each position-ids tensor and reused while that tensor is alive and
    unchanged (a weak reference: a new batch's tensor is a new object; `_version` counts in-place writes)."""
    last = {}

    def cached(position_ids):
        ref = last.get("ids")
        if ref is not None and ref() is position_ids and last["version"] == position_ids._version:
            return last["answer"]
        answer = fn(position_ids)
        last.update(ids=weakref.ref(position_ids), version=position_ids._version, answer=answer)
        return answer

    cached.loft_once = True
    return cached


def with_int_lengths(prepare):
    """transformers' prepare_fa_kwargs_from_position_ids, its longest-document lengths as ints: the router calls
    int() on them in every layer, a host sync each time unless they already are ints."""
    def prepare_ints(position_ids):
        cu_seqlens, (max_q, max_k) = prepare(position_ids)
        return cu_seqlens, (int(max_q), int(max_k))

    return prepare_ints


PREPARE = "prepare_fa_kwargs_from_position_ids"  # the name the router's closure holds transformers' function by


def route_once() -> list[str]:
    """Axolotl's SDPA router (axolotl.monkeypatch.attention.sdpa_varlen) reading a batch's documents once instead of
    once per layer; returns what was applied. Idempotent; a router of another shape is left alone."""
    try:
        from axolotl.monkeypatch.attention import sdpa_varlen
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
    except ImportError:
        return []
    applied = []
    if callable(getattr(sdpa_varlen, "_is_packed", None)):
        if not getattr(sdpa_varlen._is_packed, "loft_once", False):
            sdpa_varlen._is_packed = once_per_tensor(sdpa_varlen._is_packed)
        applied.append("documents per row read once per batch")
    router = ALL_ATTENTION_FUNCTIONS.get("sdpa") if hasattr(ALL_ATTENTION_FUNCTIONS, "get") else None
    code = getattr(router, "__code__", None)
    if getattr(router, "_axolotl_sdpa_original", None) is not None and code and PREPARE in code.co_freevars:
        cell = router.__closure__[code.co_freevars.index(PREPARE)]
        if not getattr(cell.cell_contents, "loft_once", False):
            cell.cell_contents = once_per_tensor(with_int_lengths(cell.cell_contents))
        applied.append("document starts and lengths read once per batch")
    return applied


def make_lean(trainer, trainable_set_changes: bool = False) -> list[str]:
    """Apply the changes above to a transformers Trainer; returns what was applied (for the log line)."""
    applied = []
    trainer.args.logging_nan_inf_filter = False
    applied.append("loss NaN/Inf filter off")

    counts = {}  # id(model) -> parameters without embeddings, as Trainer.floating_point_ops counts them
    stock_flops = trainer.floating_point_ops

    def floating_point_ops(inputs):
        model = trainer.model
        main = getattr(model, "main_input_name", "input_ids")
        if main not in inputs or not hasattr(model, "num_parameters") or not hasattr(inputs[main], "numel"):
            return stock_flops(inputs)
        if id(model) not in counts:
            counts[id(model)] = model.num_parameters(exclude_embeddings=True)
        return 6 * inputs[main].numel() * counts[id(model)]

    trainer.floating_point_ops = floating_point_ops
    applied.append("parameter count for the FLOPs log taken once")

    model = trainer.model
    modules = []  # listed at the first train(); the module tree does not change once training starts
    stock_train = model.train

    def train(self, mode: bool = True):
        if mode:
            if not modules:
                modules.extend(self.modules())
            if all(m.training for m in modules):  # a flat check: no recursion, no generator per module
                return self
        return stock_train(mode)

    model.train = types.MethodType(train, model)
    unwrapped = {}  # (id, flags) -> (model, what unwrap_model returned); the model is kept so its id stays unique
    stock_unwrap = trainer.accelerator.unwrap_model

    def unwrap_model(wrapped, keep_fp32_wrapper: bool = True, keep_torch_compile: bool = True):
        key = (id(wrapped), keep_fp32_wrapper, keep_torch_compile)
        if key not in unwrapped:
            unwrapped[key] = (wrapped, stock_unwrap(wrapped, keep_fp32_wrapper, keep_torch_compile))
        return unwrapped[key][1]

    trainer.accelerator.unwrap_model = unwrap_model
    applied.append("train mode and the unwrapped model kept between steps")
    if trainable_set_changes or sharded(trainer):
        return applied

    trainable = []

    def listed():
        if not trainable:
            trainable.extend(p for p in model.parameters() if p.requires_grad)
        return trainable

    stock_clip = trainer._clip_grad_norm

    def clip_grad_norm(wrapped):
        if wrapped is not model and getattr(wrapped, "module", None) is not model:
            return stock_clip(wrapped)
        return trainer.accelerator.clip_grad_norm_(listed(), trainer.args.max_grad_norm)

    def zero_grad(self, set_to_none: bool = True):
        for p in listed():
            if p.grad is None:
                continue
            if set_to_none:
                p.grad = None
                continue
            if p.grad.grad_fn is not None:  # as torch.nn.Module.zero_grad does
                p.grad.detach_()
            else:
                p.grad.requires_grad_(False)
            p.grad.zero_()

    trainer._clip_grad_norm = clip_grad_norm
    model.zero_grad = types.MethodType(zero_grad, model)
    applied.append("clipping and zeroing over the trainable parameters only")
    return applied


class LeanStepPlugin(BasePlugin):
    """`plugins: [training.plugins.lean.LeanStepPlugin]`: the Trainer's per-step bookkeeping without model walks."""

    def pre_model_load(self, cfg):
        # Axolotl installs its SDPA router (for packed rows only) before any plugin's pre_model_load
        if not cfg.get("sample_packing"):
            return
        lever("lean step", route_once, "; ".join, failed="attention routing left as it is")

    def post_trainer_create(self, cfg, trainer):
        changes = bool(cfg.get("lisa_n_layers") or cfg.get("relora"))
        lever("lean step", lambda: make_lean(trainer, trainable_set_changes=changes), "; ".join)
