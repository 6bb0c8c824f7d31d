"""LOFT-M3xx of `loft doctor`: the memory estimate judged on a GPU profile and, where it does not fit, the cheapest
change that does (free changes first, then slower ones, then lower quality), as `--set` overrides to try."""

import json

from training.arch import Arch, find_arch
from training.checks.memory import PROFILES, Estimate, Setup, estimate, gpu_gib, optimizer_state_bytes
from training.checks.report import Report


def _liger(cfg: dict) -> dict:
    plugins = list(cfg.get("plugins") or [])
    if not any("liger" in str(p).lower() for p in plugins):
        plugins.append("axolotl.integrations.liger.LigerPlugin")
    return {"plugins": plugins, "liger_fused_linear_cross_entropy": True, "liger_rms_norm": True,
            "liger_glu_activation": True, "liger_rope": True}


def remedies(cfg: dict) -> list[tuple[str, dict]]:
    """Changes in order of cost to the run: free first, then slower, then lower quality."""
    s = Setup.from_recipe(cfg)
    out = []
    if not s.checkpointing:
        out.append(("enable gradient checkpointing (~20% slower)", {"gradient_checkpointing": True}))
    if s.reference and not s.chunked_logps:
        out.append(("Loft's DPO trainer: LM head in chunks over completion tokens, no full logits",
                    {"trainer_cls": "training.plugins.dpo.LoftDPOTrainer"}))
    if s.upcast_embeddings and s.quant == "4bit":
        out.append(("keep the embeddings in bf16 while loading", {"embeddings_skip_upcast": True}))
    if not s.fused_ce and not s.rl:
        out.append(("Liger kernels with fused linear cross-entropy (no full logits)", _liger(cfg)))
    if s.checkpointing and s.offload < 1:
        out.append(("offload the checkpointed layer inputs to CPU RAM (slower: copies each layer's input)",
                    {"activation_offloading": "hidden_states"}))
    if optimizer_state_bytes(s.optimizer) > 2:
        out.append(("paged 8-bit AdamW", {"optimizer": "paged_adamw_8bit"}))
    mb, ga = s.micro_batch, cfg.get("gradient_accumulation_steps") or 1
    while mb > 1:
        mb //= 2
        ga = ga * 2 if isinstance(ga, int) else ga
        out.append((f"micro-batch {mb} × grad-accum {ga} (same effective batch)",
                    {"micro_batch_size": mb, "gradient_accumulation_steps": ga}))
    if s.quant == "none":
        out.append(("4-bit QLoRA base (nf4)", {"adapter": "qlora", "load_in_4bit": True, "bf16": "auto"}))
    seq = s.seq
    while seq > 512:
        seq //= 2
        out.append((f"sequence_len {seq} (longer rows get dropped or truncated)", {"sequence_len": seq}))
    return out


def cheapest_fit(cfg: dict, arch: Arch, gpu: float, world: int = 1) -> tuple[list[str], dict, Estimate] | None:
    """The first single change that fits; else the shortest prefix of the list applied together."""
    options = remedies(cfg)
    for label, change in options:
        est = estimate(arch, Setup.from_recipe({**cfg, **change}, world))
        if est.verdict(gpu) == "fits":
            return [label], change, est
    merged, labels = {}, []
    for label, change in options:
        merged.update(change)
        labels.append(label)
        est = estimate(arch, Setup.from_recipe({**cfg, **merged}, world))
        if est.verdict(gpu) == "fits":
            return labels, merged, est
    return None


def check(cfg: dict, report: Report, gpu: str | None, world: int = 1) -> tuple[Arch | None, Estimate | None]:
    """The estimate into report.memory; a finding when it does not fit `gpu`. Returns what the lints use."""
    arch = find_arch(cfg.get("base_model")) if isinstance(cfg.get("base_model"), str) else None
    if not arch:
        report.add("LOFT-M303", "note", f"no architecture known for base_model `{cfg.get('base_model')}`: memory "
                   "not estimated", "copy the model's config.json into training/archs/<RepoName>.json",
                   key="base_model")
        return None, None
    est = estimate(arch, Setup.from_recipe(cfg, world))
    report.memory = {**est.to_dict(), "gpu": gpu, "world": world, "strategy": est.setup.parallel}
    if gpu:
        size = gpu_gib(gpu)
        verdict = est.verdict(size)
        report.memory.update(gpu_gib=size, verdict=verdict)
        if verdict != "fits":
            found = cheapest_fit(cfg, arch, size, world)
            if found:
                labels, change, after = found
                sets = " ".join(f"--set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in change.items())
                fix = f"{' + '.join(labels)} → {after.needed:.1f} GiB: {sets}"
                report.memory["cheapest_fit"] = {"changes": labels, "overrides": change, "needed_gib": round(after.needed, 2)}
            else:
                fix = "no combination of checkpointing, Liger, smaller batches, 4-bit and shorter sequences fits: " \
                      "use a bigger GPU or a smaller model"
            code, sev = ("LOFT-M301", "error") if verdict == "does not fit" else ("LOFT-M302", "warning")
            name = gpu if gpu in PROFILES else "this GPU"
            report.add(code, sev, f"needs about {est.needed:.1f} GiB on {name} ({size:g} GiB usable): {verdict}", fix)
    return arch, est
