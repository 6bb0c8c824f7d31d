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
from training.recipe import RecipeFacts, closest

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
    if s.parallel == "fsdp1" and s.quant != "none":
        # QLoRA under FSDP1 loads with cpu_ram_efficient_loading (LOFT-P404 insists): rank 0 keeps the quantized
        # model in CPU RAM, the others start empty, and each GPU receives only its shards. Not measured yet.
        notes.append("loading: rank 0 holds the quantized model in CPU RAM, each GPU receives only its shards "
                     "(cpu_ram_efficient_loading; not measured yet)")
    if s.parallel == "fsdp2" and s.quant != "none":
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
    if kind == "fsdp1" and facts.adapter == "qlora" and not option(fsdp, "cpu_ram_efficient_loading"):
        # It runs, but every rank then quantizes the whole model on its own GPU before FSDP1 shards it: the
        # loading peak that kept the FSDP2 recipe out of 24 GiB. Sharded loading is FSDP1's only reason to be
        # here (sync_module_states needs no key: transformers turns it on for FSDP1 by default).
        report.add("LOFT-P404", "error", "QLoRA under FSDP1 without fsdp_config.cpu_ram_efficient_loading: every "
                   "rank loads the whole quantized model on its GPU before sharding, as FSDP2 does", "add "
                   "cpu_ram_efficient_loading: true and qlora_sharded_model_loading: true (see recipes/qwen2.5-32b/"
                   "qlora-fsdp1-24gb.yaml), or use fsdp_version: 2, Axolotl's current FSDP", key="fsdp_config")
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
    if facts.fsdp or cfg.get("qlora_sharded_model_loading"):
        fsdp_settings(cfg, facts, report)
    if world == 1 and kind not in ("none", "ddp"):
        report.add("LOFT-P408", "note", f"{label} on one GPU shards over a single rank: nothing is saved, some speed "
                   "is lost", "train with --gpus N (the number of GPUs), or drop the sharding keys for one GPU")


# ---------------------------------------------------------------- FSDP settings Axolotl 0.19 takes but cannot run
# Axolotl validates fsdp_config with its own schema, transformers turns it into accelerate's FSDP plugin, and each
# of the three reads it differently: these are the settings that pass Axolotl's schema and then fail (or do nothing)
# later, once the model is loaded and GPU time is spent.
FSDP1_ONLY = ("use_orig_params", "sync_module_states")  # transformers passes them to accelerate under FSDP1 only


def fsdp_keys() -> set[str]:
    """The fsdp_config keys Axolotl's schema keeps (it drops any other without a word)."""
    from axolotl.utils.schemas.fsdp import FSDPConfig

    return set(FSDPConfig.model_fields) | {"version"}


def fsdp_settings(cfg: dict, facts: RecipeFacts, report) -> None:
    fsdp, version = facts.fsdp_options, facts.fsdp_version
    plain = {str(k).removeprefix("fsdp_") if k != "fsdp_version" else k: v for k, v in fsdp.items()}
    known = fsdp_keys()
    for key in sorted(set(plain) - known):
        strategy_fix = ("under FSDP1 leave it out for FULL_SHARD or set top-level `fsdp: [shard_grad_op]`; under "
                        "FSDP2 use reshard_after_forward: false") if key == "sharding_strategy" else None
        close = closest(key, known)
        report.add("LOFT-P410", "error", f"fsdp_config.{key} is not an Axolotl 0.19 FSDP setting: its schema drops "
                   "it silently", strategy_fix or (f"did you mean `{close}`?" if close else "remove it; Axolotl takes "
                   + ", ".join(sorted(known - {"version", "fsdp_version"}))), key="fsdp_config")
    if version == 1 and "reshard_after_forward" in plain:
        # Axolotl's schema takes only true/false; transformers hands FSDP1 the word ("true") as a sharding
        # strategy name, and accelerate fails on it (KeyError: 'TRUE') when the trainer starts, after loading.
        report.add("LOFT-P409", "error", f"fsdp_config.reshard_after_forward: {plain['reshard_after_forward']!r} "
                   "under FSDP1: accelerate reads it as a sharding strategy name and stops when the trainer starts, "
                   "after the model has loaded (Axolotl 0.19's schema takes only true/false there)",
                   "remove reshard_after_forward: FSDP1 then shards fully (FULL_SHARD, transformers' default); for "
                   "SHARD_GRAD_OP set top-level `fsdp: [shard_grad_op]`", key="fsdp_config")
    if version == 2:
        for key in [k for k in FSDP1_ONLY if k in plain]:
            report.add("LOFT-P411", "error", f"fsdp_config.{key} is an FSDP1 setting: under FSDP2 transformers never "
                       "passes it on, so it does nothing", f"remove {key} (FSDP2 always uses the original "
                       "parameters and builds every rank's shards itself)", key="fsdp_config")
        for key in ("state_dict_type", "final_state_dict_type"):
            if str(plain.get(key, "")).upper() == "LOCAL_STATE_DICT":
                when = "when the trainer starts" if key == "state_dict_type" else "at the final save, after training"
                report.add("LOFT-P412", "error", f"fsdp_config.{key}: LOCAL_STATE_DICT under FSDP2: accelerate "
                           f"refuses it {when}", f"{key}: FULL_STATE_DICT (one ordinary file, gathered on rank 0)",
                           key="fsdp_config")
    sharded_quant = facts.adapter == "qlora" and version == 1 and bool(option(fsdp, "cpu_ram_efficient_loading"))
    if cfg.get("qlora_sharded_model_loading") and not sharded_quant:
        # Axolotl's loader acts on it only for QLoRA under FSDP with cpu_ram_efficient_loading, which FSDP2
        # refuses with 4-bit weights: anywhere else every rank quantizes the whole model as if it were unset.
        report.add("LOFT-P413", "error", "qlora_sharded_model_loading: true does nothing here: Axolotl 0.19 uses it "
                   "only for adapter: qlora under fsdp_version: 1 with fsdp_config.cpu_ram_efficient_loading: true",
                   "set fsdp_version: 1 and cpu_ram_efficient_loading: true (as recipes/qwen2.5-32b/"
                   "qlora-fsdp1-24gb.yaml does), or remove qlora_sharded_model_loading", key="qlora_sharded_model_loading")
    final = str(plain.get("final_state_dict_type") or plain.get("state_dict_type") or "").upper()
    if version == 1 and facts.adapter and final == "SHARDED_STATE_DICT" and str(cfg.get("save_strategy")) == "no":
        # Under FSDP1 the trainer's final save writes nothing for a sharded state dict; Axolotl then rebuilds the
        # adapter from the last checkpoint, and with save_strategy "no" there is none.
        report.add("LOFT-P414", "error", "FSDP1 with a SHARDED_STATE_DICT final save and save_strategy: no: no "
                   "adapter is ever written (Axolotl rebuilds it from the last checkpoint, and there is none)",
                   "fsdp_config.state_dict_type: FULL_STATE_DICT (rank 0 writes an ordinary adapter), or save "
                   "checkpoints (save_strategy: steps)", key="fsdp_config")
