"""More than one GPU: which strategy a recipe's Axolotl keys select, what each GPU then holds, and the
combinations Axolotl or DeepSpeed cannot run (refused by `loft doctor --gpus N` before any GPU time).

    keys in the recipe                              strategy   per GPU, of W ranks
    (none)                                          ddp        everything, plus a copy of the gradients (buckets)
    deepspeed: (zero_optimization.stage 1/2)        zero1/2    optimizer state (1), and gradients (2), ÷ W
    deepspeed: (stage 3)                            zero3      weights, gradients and optimizer state ÷ W
    fsdp_version: 2 + fsdp_config:                  fsdp2      as zero3; the optimizer state stays in the
                                                               weights' dtype (no fp32 master copy)

Sharded weights are gathered one decoder layer at a time (counted as two: the one computing and the one being
prefetched); embeddings, lm_head and norms sit in FSDP's root unit and are held whole during a step. DeepSpeed's
bf16 optimizer keeps fp32 master weights and fp32 moments for whatever trains (16 bytes per parameter of a full
fine-tune, before ÷ W). Offloading (offload_param / offload_params / offload_optimizer) moves those shards to CPU
RAM. Activations and logits are per GPU and never sharded here.
"""

import json
from pathlib import Path

from training.paths import REPO
from training.recipe import RecipeFacts

GIB = 1024**3

LABELS = {"ddp": "DDP", "zero1": "DeepSpeed ZeRO-1", "zero2": "DeepSpeed ZeRO-2", "zero3": "DeepSpeed ZeRO-3",
          "fsdp1": "FSDP1", "fsdp2": "FSDP2"}


def deepspeed_config(value) -> dict | None:
    """The recipe's `deepspeed:` value as a dict: inline, or a JSON file (repo-relative paths work from anywhere)."""
    if isinstance(value, dict):
        return value
    if not isinstance(value, str) or not value:
        return None
    path = Path(value)
    for candidate in (path, REPO / path):
        if candidate.is_file():
            try:
                data = json.loads(candidate.read_text())
            except (OSError, ValueError):
                return None
            return data if isinstance(data, dict) else None
    return None


def _offloaded(section) -> bool:
    return isinstance(section, dict) and str(section.get("device", "none")).lower() not in ("none", "")


def option(fsdp_options: dict, key: str):
    """An fsdp_config value, spelled `key` or Axolotl's older `fsdp_key`."""
    return fsdp_options.get(key) or fsdp_options.get(f"fsdp_{key}")


def strategy(cfg: dict, world: int = 1) -> tuple[str, bool, bool]:
    """(strategy, offload params, offload optimizer) the recipe's keys select for `world` processes."""
    facts = RecipeFacts.of(cfg)
    if facts.fsdp:
        offload = bool(option(facts.fsdp_options, "offload_params"))
        return f"fsdp{facts.fsdp_version}", offload, offload
    if facts.deepspeed:
        zero = (deepspeed_config(facts.deepspeed) or {}).get("zero_optimization") or {}
        stage = zero.get("stage", 0) if isinstance(zero.get("stage", 0), int) else 0
        if stage in (1, 2, 3):
            return (f"zero{stage}", stage == 3 and _offloaded(zero.get("offload_param")),
                    _offloaded(zero.get("offload_optimizer")))
    return ("ddp" if world > 1 else "none"), False, False


def per_gpu(parts: dict, arch, s, weights: float, other: float, state: float, notes: list,
            state_per_param: float = 4.0) -> float:
    """Turn the single-GPU parts (bytes; changed in place) into one rank's share under s.parallel over s.world
    ranks. `other` is the embeddings/norms part of `weights`, `state` the optimizer state inside the trainable
    part (0 when paged), `state_per_param` the optimizer's bytes per trained weight. Returns the weights one rank
    holds while the model loads (bytes)."""
    w, key, total = s.world, "trainable (params+grads+optimizer)", weights
    rest = parts[key] - state
    grads = rest / 2 if s.adapter else rest  # adapter: fp32 weights + fp32 grads; full: the grads (weights above)
    own = rest - grads
    layer = (weights - other) / arch.layers
    label = LABELS.get(s.parallel, s.parallel)
    if s.parallel == "ddp":
        parts["DDP gradient buckets"] = grads  # DDP all-reduces a bucketed copy of every gradient
        notes.append(f"per GPU, {label} over {w} ranks: each GPU holds the whole model; only the batch is split")
        return weights
    sharded = lambda x: 0.0 if s.offload_params else x / w  # noqa: E731
    if s.parallel.startswith("zero"):
        stage = int(s.parallel[-1])
        if s.adapter:
            master, opt = own, state
        else:  # DeepSpeed's bf16 optimizer: fp32 master weights and fp32 moments of every trained weight
            master, opt = arch.params * 4.0, arch.params * state_per_param
        held = 0.0 if s.offload_optimizer else (master + opt) / w
        grads = grads / w if stage >= 2 else grads
        own = sharded(own) if stage == 3 else own
        if stage == 3:
            weights = sharded(weights - other) + 2 * layer + other
    else:  # FSDP: everything that is a parameter is sharded; offload_params moves shards and optimizer to the CPU
        held = 0.0 if s.offload_params else state / w
        # Accumulating over several micro-batches, accelerate turns FSDP's gradient sync off until the last one
        # (set_requires_gradient_sync(False)): until then every rank keeps whole, unsharded gradients. Measured:
        # Llama-3.1-8B full FSDP2 on 2 GPUs, 2 micro-batches, peaked 46.82 GiB where sharded gradients give 38.6.
        accumulating = s.grad_accum > 1 and not s.offload_params
        grads, own = (grads if accumulating else sharded(grads)), sharded(own)
        if accumulating and grads >= 2**30:
            notes.append(f"gradient accumulation: FSDP holds whole gradients ({grads / GIB:.2f} GiB) until the last "
                         "micro-batch syncs them; a larger micro_batch_size with fewer accumulation steps avoids it")
        weights = sharded(weights - other) + 2 * layer + other
    parts["weights"] = weights
    parts[key] = own + grads + held
    offload = " (shards offloaded to CPU RAM)" if s.offload_params or s.offload_optimizer else ""
    notes.append(f"per GPU, {label} over {w} ranks{offload}: decoder layers sharded, two gathered at a time "
                 f"({2 * layer / GIB:.2f} GiB); embeddings and lm_head held whole")
    if s.parallel.startswith("fsdp") and s.quant != "none":
        # fully_shard then copies each rank's shards while the whole quantized model is still there. Measured:
        # Qwen2.5-32B QLoRA FSDP2 on 2 GPUs ran out of a 24 GiB cap inside fully_shard at 23.96 GiB allocated,
        # with 17.89 GiB of quantized weights: the whole model alone fits, whole model plus shards does not.
        loading = total * (1 + 1 / w)
        notes.append(f"loading: each rank quantizes the whole model on its own GPU ({total / GIB:.2f} GiB of "
                     f"weights), then FSDP copies its shards before freeing it ({loading / GIB:.2f} GiB)")
        return loading
    return parts["weights"]


# ---------------------------------------------------------------- combinations that cannot run (loft doctor)
def _bnb_optimizer(name) -> bool:
    """bitsandbytes' optimizers (adamw_bnb_8bit, paged_adamw_8bit, …), not torchao's adamw_torch_8bit/_4bit."""
    name = str(name or "").lower()
    return ("8bit" in name or name.startswith("paged_")) and "torch" not in name


def check(cfg: dict, report, gpus: int = 1, nodes: int = 1) -> None:
    """LOFT-P4xx findings for the launch `loft train --gpus gpus --nodes nodes` would make."""
    world = max(1, gpus) * max(1, nodes)
    kind, _, offload_optimizer = strategy(cfg, world)
    facts = RecipeFacts.of(cfg)
    fsdp = facts.fsdp_options
    label = LABELS.get(kind, kind)
    if facts.deepspeed and facts.fsdp:
        report.add("LOFT-P401", "error", "deepspeed: and fsdp_config: are both set: one run shards with one engine "
                   "(Axolotl would silently take FSDP)", "remove one of them: ZeRO via deepspeed: "
                   "recipes/deepspeed/zero3.json, or FSDP2 via fsdp_version: 2 + fsdp_config:", key="deepspeed")
    if facts.deepspeed and not facts.fsdp:
        conf = deepspeed_config(facts.deepspeed)
        stage = ((conf or {}).get("zero_optimization") or {}).get("stage")
        if conf is None:
            report.add("LOFT-P402", "error", f"deepspeed: {facts.deepspeed!r} is not a readable DeepSpeed JSON file",
                       "point it at one of recipes/deepspeed/zero2.json, zero3.json, zero3-offload.json (paths are "
                       "relative to the repository root)", key="deepspeed")
        elif stage not in (0, 1, 2, 3):
            report.add("LOFT-P402", "error", f"{facts.deepspeed} sets no zero_optimization.stage (0-3)",
                       "add \"zero_optimization\": {\"stage\": 2} (or 3), as recipes/deepspeed/zero2.json does",
                       key="deepspeed")
    if facts.bits == 8 and kind in ("zero3", "fsdp1", "fsdp2"):
        report.add("LOFT-P403", "error", f"load_in_8bit with {label}: bitsandbytes' 8-bit weights cannot be sharded "
                   "(only 4-bit weights stored as bf16 can)", "use adapter: qlora + load_in_4bit: true, or ZeRO-2 / "
                   "DDP (deepspeed: recipes/deepspeed/zero2.json), which keep the whole 8-bit model on each GPU",
                   key="load_in_8bit")
    if kind == "fsdp1" and facts.adapter == "qlora":
        need = [k for k in ("cpu_ram_efficient_loading", "sync_module_states") if not option(fsdp, k)]
        if need:
            report.add("LOFT-P404", "error", f"QLoRA under FSDP1 needs fsdp_config {' and '.join(need)}: true (each "
                       "rank must receive rank 0's quantized weights)", "set fsdp_version: 2 (Axolotl's current FSDP; "
                       "see recipes/qwen2.5-32b/qlora-fsdp2-24gb.yaml), or add " + ", ".join(f"{k}: true" for k in need),
                       key="fsdp_config")
    if kind == "fsdp2" and facts.bits == 4 and option(fsdp, "cpu_ram_efficient_loading"):
        report.add("LOFT-P405", "error", "FSDP2 with 4-bit weights and cpu_ram_efficient_loading: true: only rank 0 "
                   "quantizes, the other ranks wait for shards of another shape (Axolotl 0.19 refuses it)",
                   "set fsdp_config.cpu_ram_efficient_loading: false", key="fsdp_config")
    if kind.startswith("fsdp") and _bnb_optimizer(cfg.get("optimizer")):
        report.add("LOFT-P406", "error", f"optimizer {cfg.get('optimizer')} is bitsandbytes' and {label} hands it "
                   "sharded DTensor weights it cannot step", "optimizer: adamw_torch_fused (or torchao's "
                   "adamw_torch_8bit for 8-bit state)", key="optimizer")
    if kind.startswith("zero") and offload_optimizer and _bnb_optimizer(cfg.get("optimizer")):
        report.add("LOFT-P407", "error", f"offload_optimizer runs the optimizer step on the CPU, and "
                   f"{cfg.get('optimizer')} is a GPU-only bitsandbytes optimizer", "optimizer: adamw_torch (or drop "
                   "offload_optimizer from the DeepSpeed JSON)", key="optimizer")
    if world == 1 and kind not in ("none", "ddp"):
        report.add("LOFT-P408", "note", f"{label} on one GPU shards over a single rank: nothing is saved, some speed "
                   "is lost", "train with --gpus N (the number of GPUs), or drop the sharding keys for one GPU")
