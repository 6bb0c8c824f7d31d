"""The L2xx checks of `loft doctor`: recipes that run, but waste the GPU hour.

  L201 pre-quantized base that will be merged      L206 DPO that loads a second full model
  L202 coverage below one epoch                    L207 vocabulary > 100K without a fused cross-entropy
  L203 learning rate 0, or mostly warm-up / ≈ 0    L208 trust_remote_code: true
  L204 a small dataset seen many times (overfit)   L209 flash attention requested but missing or ABI-broken
  L205 gradient clipping off                       L210 bitsandbytes / torchao / liger-kernel missing
  L211 a Loft plugin without what it works on (the padding lever without SDPA)
  L212 liger_rope that Axolotl's LoRA attention never calls (no FusedRopePlugin)

Each takes the raw recipe, the Report (its data stats fill coverage), and the architecture and memory estimate.
"""

import math
import re
import subprocess
import sys

from training.arch import quantized_name
from training.recipe import RecipeFacts

PADDING_PLUGIN = "training.plugins.padding.ContinuedPaddingPlugin"
ROPE_PLUGIN = "training.plugins.rope.FusedRopePlugin"


def effective_batch(cfg: dict) -> int:
    mb = cfg.get("micro_batch_size") if isinstance(cfg.get("micro_batch_size"), int) else 1
    ga = cfg.get("gradient_accumulation_steps") if isinstance(cfg.get("gradient_accumulation_steps"), int) else 1
    return max(1, mb) * max(1, ga)


def warmup_steps(cfg: dict, total: int) -> int:
    """Warm-up length in steps as Axolotl + transformers pick it: warmup_steps (a float below 1 is a ratio, as
    transformers 5 reads it), else warmup_ratio × total, else Axolotl's default min(3%, 100 steps)."""
    warmup = cfg.get("warmup_steps")
    if isinstance(warmup, (int, float)) and not isinstance(warmup, bool):
        return max(int(warmup * total) if 0 < warmup < 1 else int(warmup), 0)
    ratio = cfg.get("warmup_ratio")
    return max(int(ratio * total) if isinstance(ratio, (int, float)) else min(int(0.03 * total), 100), 0)


def lr_curve(cfg: dict, total: int) -> list[float]:
    """Learning-rate multiplier per step as Axolotl + transformers compute it (cosine/linear/constant)."""
    warmup = warmup_steps(cfg, total)
    kind = str(cfg.get("lr_scheduler") or "cosine")
    floor = cfg.get("cosine_min_lr_ratio") if isinstance(cfg.get("cosine_min_lr_ratio"), (int, float)) else 0.0
    out = []
    for step in range(total):
        if step < warmup:
            out.append(step / max(1, warmup))
            continue
        done = (step - warmup) / max(1, total - warmup)
        if kind == "cosine":
            out.append(floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * done)))
        elif kind == "linear":
            out.append(1 - done)
        else:
            out.append(1.0)
    return out


def check(cfg: dict, report, arch, est):
    data = report.data
    rows = data.get("train_rows")
    lr = cfg.get("learning_rate")
    steps = cfg.get("max_steps") if isinstance(cfg.get("max_steps"), int) and cfg.get("max_steps") > 0 else None
    epochs = cfg.get("num_epochs") if isinstance(cfg.get("num_epochs"), (int, float)) else 1
    batch = effective_batch(cfg)
    per_step = batch
    facts = RecipeFacts.of(cfg)
    if cfg.get("sample_packing") and data.get("mean_tokens") and facts.sequence_len_set:
        per_step = batch * max(1.0, 0.95 * facts.sequence_len / data["mean_tokens"])  # rows packed per sequence
    adapter = facts.adapter

    # L201 pre-quantized base
    base = str(cfg.get("base_model") or "")
    if adapter and (quantized_name(base) or (arch and arch.quantized)):
        why = "its config.json has a quantization_config" if arch and arch.quantized else "its name says so"
        report.add("LOFT-L201", "warning", f"base_model `{base}` is pre-quantized ({why}): the adapter will be "
                   "merged (`loft merge`) onto a quantized copy, and the merged model loses precision",
                   "name the full-precision repo as base_model and keep `load_in_4bit: true`; Axolotl quantizes it "
                   "at load time and the merge uses the original weights", key="base_model")

    # L202 coverage / L204 many epochs
    if rows:
        seen = (steps * per_step / rows) if steps else epochs
        data["epochs"] = round(seen, 3)
        if seen < 1:
            need = math.ceil(rows / per_step)
            report.add("LOFT-L202", "warning", f"coverage {seen:.2f} epoch: {steps} steps × {per_step:.0f} rows per "
                       f"step ÷ {rows} rows — {100 * (1 - seen):.0f}% of the data is never seen",
                       f"set max_steps: {need} for one epoch, or trim the dataset to what the run will see",
                       key="max_steps" if steps else "num_epochs")
        elif seen > 3:
            report.add("LOFT-L204", "warning", f"{seen:.1f} epochs over {rows} rows: each row is seen {seen:.0f} "
                       "times, and a small dataset overfits well before that",
                       f"max_steps: {math.ceil(2 * rows / per_step)} (2 epochs) or more data; keep eval on "
                       "(test_datasets or val_set_size) so the guard can stop on overfitting",
                       key="max_steps" if steps else "num_epochs")

    # L203 learning-rate schedule
    if isinstance(lr, (int, float)) and lr == 0:
        report.add("LOFT-L203", "error", "learning_rate is 0: the weights never change",
                   "learning_rate: 2e-4 (QLoRA) or 1e-4 (LoRA) is a good start", key="learning_rate")
    total = steps or (math.ceil(epochs * rows / per_step) if rows else None)
    if total and total < 1_000_000 and isinstance(lr, (int, float)) and lr > 0:
        schedule(cfg, report, int(total), lr, steps, epochs, rows, per_step)

    # L205 clipping
    if cfg.get("max_grad_norm") == 0:
        report.add("LOFT-L205", "warning", "max_grad_norm: 0 turns gradient clipping off: one bad batch can blow "
                   "the adapter up, and the grad norm is no longer logged (the guard's grad check goes blind)",
                   "max_grad_norm: 1.0", key="max_grad_norm")

    # L206 DPO with a second model
    if facts.reference and not adapter:
        cost = f" (+{est.parts['weights']:.1f} GiB)" if est else ""
        report.add("LOFT-L206", "warning", f"rl: {facts.rl} without an adapter trains the whole model and loads a "
                   f"second full copy as the reference{cost}",
                   "adapter: qlora (or lora): the policy with its adapter disabled is the reference, no second model",
                   key="rl")

    # L207 large vocabulary without a fused cross-entropy
    if arch and arch.vocab > 100_000 and est and not est.setup.fused_ce:
        report.add("LOFT-L207", "warning", f"vocabulary {arch.vocab:,} and no fused cross-entropy: the logits take "
                   f"{est.parts['logits / loss']:.1f} GiB at sequence_len × micro_batch_size",
                   "plugins: [axolotl.integrations.liger.LigerPlugin] with liger_fused_linear_cross_entropy: true "
                   "(or axolotl.integrations.cut_cross_entropy.CutCrossEntropyPlugin)", key="plugins")

    # L208 remote code
    if cfg.get("trust_remote_code") is True:
        report.add("LOFT-L208", "warning", "trust_remote_code: true runs Python from the model repo on your machine",
                   "use a model transformers supports natively, or read the repo's modeling code and pin its revision",
                   key="trust_remote_code")

    # L209 / L210 packages
    flash = cfg.get("flash_attention") is True or "flash" in str(cfg.get("attn_implementation") or "")
    if flash:
        problem = flash_attn_problem()
        if problem:
            report.add("LOFT-L209", "error", f"flash attention is requested but {problem}",
                       "attn_implementation: sdpa (about as fast on recent GPUs), or install the flash-attn wheel "
                       "built for this exact torch and CUDA", key="flash_attention" if "flash_attention" in cfg
                       else "attn_implementation")
    # L211 the padding lever picks between Axolotl's two SDPA paths: under another attention it raises in Axolotl
    plugins = [str(x) for x in cfg.get("plugins") or []]
    if PADDING_PLUGIN in plugins and (flash or cfg.get("attn_implementation") not in (None, "sdpa")):
        report.add("LOFT-L211", "error", f"{PADDING_PLUGIN} needs attn_implementation: sdpa, and this recipe sets "
                   f"{'flash attention' if flash else 'attn_implementation: ' + str(cfg.get('attn_implementation'))}",
                   "attn_implementation: sdpa, or remove the plugin (flash_attention_2 already takes one-document "
                   "rows on its fast path)", key="plugins")
    # L212 Axolotl rewrites the attention for its LoRA kernels before LigerPlugin swaps in its RoPE: without the
    # plugin that points the rewrite at Liger's function, liger_rope does nothing (training/plugins/rope.py)
    if cfg.get("liger_rope") and facts.lora_qkv_kernel and ROPE_PLUGIN not in plugins:
        report.add("LOFT-L212", "warning", "liger_rope: true, but Axolotl's fused LoRA Q/K/V kernel rewrites the "
                   "attention before Liger's RoPE is swapped in: transformers' RoPE runs instead (~6% of the GPU "
                   "time of a profiled Llama-3.1-8B step)", f"add {ROPE_PLUGIN} to plugins", key="plugins")
    for package, why, key in needed_packages(cfg):
        if not importable(package):
            report.add("LOFT-L210", "error", f"{why} needs the `{package}` package, which is not installed",
                       f"pip install {package.replace('_', '-')} (or `make setup` with the GPU profile)", key=key)


def schedule(cfg: dict, report, total: int, lr: float, steps, epochs, rows, per_step) -> None:
    """L203 on the whole schedule: every way the steps end up at a rate too low to teach anything."""
    curve = lr_curve(cfg, total)
    warmup = warmup_steps(cfg, total)
    warm_key = "warmup_steps" if "warmup_steps" in cfg else "warmup_ratio"
    fix_warmup = f"warmup_ratio: 0.05 (or warmup_steps: {max(1, total // 20)}), and no warmup_steps/warmup_ratio beside it"
    low = sum(m < 0.1 for m in curve) / len(curve)
    useful = sum(m >= 0.5 for m in curve) / len(curve)
    if warmup >= total:
        report.add("LOFT-L203", "warning", f"the warm-up ({warmup} steps) is as long as the whole {total}-step run: "
                   f"the learning rate never reaches {lr:g} (it ends at {100 * curve[-1]:.0f}% of it)",
                   fix_warmup, key=warm_key)
    elif warmup >= 0.5 * total:
        report.add("LOFT-L203", "warning", f"the warm-up takes {warmup} of the {total} steps ({100 * warmup / total:.0f}%): "
                   f"the learning rate reaches {lr:g} only at step {warmup}, and {100 * (1 - useful):.0f}% of the "
                   "steps run below half of it", fix_warmup, key=warm_key)
    elif low > 0.5:
        report.add("LOFT-L203", "warning", f"the learning rate is below 10% of {lr:g} for {100 * low:.0f}% of the "
                   f"{total} steps ({cfg.get('lr_scheduler') or 'cosine'}; it decays to ~0 early)",
                   "check warmup_ratio/warmup_steps, cosine_min_lr_ratio and max_steps against the real run length",
                   key="lr_scheduler")
    if RecipeFacts.of(cfg).adapter and lr < 1e-6:
        report.add("LOFT-L203", "warning", f"learning_rate {lr:g} is below 1e-6: a LoRA adapter starts at zero and at "
                   "this rate barely moves in any run length", "learning_rate: 2e-4 (QLoRA) or 1e-4 (LoRA) is a good start",
                   key="learning_rate")
    # max_steps wins over num_epochs in transformers: say so when the two describe very different runs
    if steps and "num_epochs" in cfg and rows and isinstance(epochs, (int, float)) and epochs > 0:
        seen = steps * per_step / rows
        if seen > 2 * epochs or 1 <= seen < epochs / 2:  # below one epoch is L202's
            report.add("LOFT-L203", "note", f"max_steps {steps} sets the run length and num_epochs {epochs:g} is "
                       f"ignored: {steps} steps are {seen:.2f} epochs of {rows} rows, and the schedule (warm-up, "
                       "decay) is spread over those steps",
                       f"drop max_steps to train {epochs:g} epochs, or set num_epochs to match", key="max_steps")


def needed_packages(cfg: dict) -> list[tuple[str, str, str]]:
    out = []
    optimizer = str(cfg.get("optimizer") or "")
    facts = RecipeFacts.of(cfg)
    if facts.bits < 16:
        out.append(("bitsandbytes", "4/8-bit loading", facts.quant_key))
    if ("8bit" in optimizer or "paged" in optimizer or "bnb" in optimizer) and not optimizer.startswith("ao_"):
        out.append(("bitsandbytes", f"optimizer {optimizer}", "optimizer"))
    if optimizer.startswith("ao_") or cfg.get("qat") or cfg.get("quantization"):
        out.append(("torchao", f"optimizer {optimizer}" if optimizer.startswith("ao_") else "QAT/quantization",
                    "optimizer" if optimizer.startswith("ao_") else "qat"))
    if facts.liger:
        out.append(("liger_kernel", "the Liger plugin", "plugins"))
    seen, unique = set(), []
    for item in out:
        if item[0] not in seen:
            seen.add(item[0])
            unique.append(item)
    return unique


def importable(package: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(package) is not None
    except (ImportError, ValueError):
        return False


def flash_attn_problem() -> str | None:
    """Import flash_attn in a child process (a broken build can crash the importer) and explain a failure."""
    code = "import flash_attn, flash_attn_2_cuda; print(flash_attn.__version__)"
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    except subprocess.TimeoutExpired:
        return "importing flash_attn hangs"
    if proc.returncode == 0:
        return None
    err = proc.stderr.strip().splitlines()
    last = err[-1] if err else f"exit {proc.returncode}"
    if "undefined symbol" in proc.stderr:
        symbol = re.search(r"undefined symbol: (\S+)", proc.stderr)
        return (f"flash_attn is ABI-incompatible with the installed torch (undefined symbol "
                f"{symbol.group(1) if symbol else '?'}): it was built against another torch/CUDA")
    if "No module named 'flash_attn" in proc.stderr:
        return "flash_attn is not installed"
    return f"importing flash_attn fails: {last[:200]}"
