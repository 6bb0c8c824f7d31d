"""The memory estimator's evidence: every peak measured on the GPU host, beside the estimate for the same settings.

`python -m benchmarks.calibration` prints the table benchmarks/MEMORY.md holds; tests/test_doctor.py fails when that
file and the estimator disagree, and when a run's error passes its bound. The measured peaks come from
training/plugins/peak.py (the whole process's, which the estimator calls `allocated`) except the first hand-copied
points, which are training's alone (Axolotl's per-step memory log, TRL's scripts: the estimate's `training`).
"""

import json

from training import recipe as recipes
from training.arch import find_arch
from training.checks.memory import Setup, estimate
from training.paths import REPO

QWEN7, LLAMA8 = "Qwen/Qwen2.5-7B-Instruct", "meta-llama/Llama-3.1-8B-Instruct"
_QLORA = {"adapter": "qlora", "load_in_4bit": True, "bf16": True, "lora_r": 16, "lora_target_linear": True,
          "lora_dropout": 0.05, "gradient_checkpointing": True, "optimizer": "paged_adamw_8bit",
          "micro_batch_size": 1, "gradient_accumulation_steps": 8, "sample_packing": True}
_LIGER = {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True,
          "liger_rms_norm": True, "liger_glu_activation": True, "liger_rope": True}
# (label, recipe, measured peak allocated GiB, what the estimator leaves out); the peaks are training's alone
# (Axolotl's per-step memory log, TRL's scripts), not the whole process's
CALIBRATION = [
    ("Qwen2.5-7B QLoRA r16, seq 1024, mb 1, packing", {"base_model": QWEN7, **_QLORA, "sequence_len": 1024}, 7.52, ""),
    ("Qwen2.5-7B QLoRA r16, seq 1024, mb 1, packing + Liger", {"base_model": QWEN7, **_QLORA, **_LIGER, "sequence_len": 1024}, 6.11, ""),
    ("Qwen2.5-7B bf16 LoRA r16 + Liger, seq 2048, mb 4", {"base_model": QWEN7, **_QLORA, **_LIGER, "adapter": "lora",
     "load_in_4bit": False, "sequence_len": 2048, "micro_batch_size": 4, "gradient_accumulation_steps": 2}, 18.1, ""),
    ("Llama-3.1-8B QLoRA r16 + Liger, seq 8192, mb 1", {"base_model": LLAMA8, **_QLORA, **_LIGER, "sequence_len": 8192}, 9.26, ""),
    ("Llama-3.1-8B QLoRA r16 + Liger, seq 16384, mb 1", {"base_model": LLAMA8, **_QLORA, **_LIGER, "sequence_len": 16384}, 12.84, ""),
    ("Qwen2.5-7B DPO QLoRA r16, seq 1024, ref = adapter disabled (TRL)", {"base_model": QWEN7, **_QLORA, "rl": "dpo",
     "sample_packing": False, "sequence_len": 1024}, 8.34, "TRL DPOTrainer, not Axolotl; row lengths not recorded"),
    ("Qwen2.5-7B DPO QLoRA r16, seq 1024, ref = second 4-bit model (TRL)", {"base_model": QWEN7, **_QLORA, "rl": "dpo",
     "sample_packing": False, "sequence_len": 1024, "_separate_reference": True}, 13.52,
     "TRL DPOTrainer with a PEFT model and a separate 4-bit reference"),
    ("Qwen2.5-7B QLoRA r16, seq 1024, no packing (TRL SFTTrainer)", {"base_model": QWEN7, **_QLORA, "sample_packing": False,
     "sequence_len": 1024}, 8.71, "TRL also computes entropy and token accuracy over the full logits"),
]

RESULTS = REPO / "benchmarks" / "results"
# `loft bench speed` runs besides the recipe-* ones whose config the current recipes + their overrides still
# reproduce (runs of a recipe that changed since are left out)
SPEED_RUNS = {"t1-qwen7b-qlora-cap12-peak", "t2-llama8b-lora-bf16-nogc", "t4-llama8b-qlora-16k-plain",
              "t4-llama8b-qlora-16k-offload", "t4-llama8b-qlora-16k-offload-cap12", "t4-llama8b-qlora-18k-offload-cap12",
              "t4-llama8b-qlora-20k-hidden-cap12", "t4-llama8b-qlora-24k-hidden-cap12",
              "t4-llama8b-qlora-32k-hidden-cap12", "t2-llama8b-lora-bf16-vs-baseline",
              "t2-llama8b-lora-bf16-full-vs-baseline", "t4-llama8b-long-vs-baseline-24576",
              "t4-llama8b-long-vs-baseline-4096", "t4-llama8b-long-vs-baseline-2048",
              "t1-qwen7b-qlora-12gb-full-vs-baseline", "t4-llama8b-long-vs-baseline-32768",
              "t4-llama8b-long-vs-baseline-10240", "t1-qwen7b-qlora-12gb-vs-baseline"}

# Recipe lines that changed after a results file's runs: the overrides that give back the recipe as it ran then.
# The long recipe of 2026-11-22 had neither the tiled MLP nor the embedding offload (the other plugins added since
# change no memory the estimator counts).
AS_RUN = {("speed-2026-11-22.json", "recipes/qwen2.5-7b/qlora-sft-12gb.yaml"): ["activation_offloading=null"],
          ("speed-2026-11-22.json", "recipes/llama-3.1-8b/qlora-long-12gb.yaml"):
              ["plugins=[axolotl.integrations.liger.LigerPlugin]"]}
# `loft bench speed --vs` runs of the recipes as they ship now (Loft's runner): the long recipe with all its plugins
# at its longest rows, and the DPO recipe with the trainer's chunked log-probs
PEER_RUNS = {("vs-peers-2026-12-01.json", "vs-llama8b-long-loft-69632"),
             ("vs-peers-2026-12-01-round6.json", "vs-llama8b-long-loft-73728"),
             ("vs-peers-2026-12-01-round6.json", "vs-qwen7b-dpo-2048-cap11")}


def process_peak(memory: dict) -> float:
    """The whole process's peak allocated GiB of a guard or speed record. Records written before the probe was
    shared (benchmarks/results/measure-2026-11-22.json) kept training's peak under peak_allocated_gib and loading's
    apart; the larger of the two is the process's in either form."""
    return max(memory["peak_allocated_gib"], memory.get("load_peak_allocated_gib") or 0)


def calibration_points() -> list[tuple[str, str, dict, float, bool, str]]:
    """(run, source, recipe config, measured peak allocated GiB, whether that peak is the whole process's, caveat):
    the shared H100 points above (training's peak), and the probe's whole-process peak (training/plugins/peak.py) of
    every `loft doctor --measure` run and every recipe run of `loft bench speed` committed in benchmarks/results/."""
    points = [(label, "shared/gpu-host README", cfg, measured, False, caveat)
              for label, cfg, measured, caveat in CALIBRATION]
    for path in sorted(RESULTS.glob("measure-*.json")):
        for run in json.loads(path.read_text())["runs"]:
            points.append((run["name"], f"--measure, {path.name}", run["config"],
                           round(process_peak(run["measured"]), 2), True, ""))
    for path in sorted([*RESULTS.glob("speed-*.json"), *RESULTS.glob("vs-peers-*.json")]):
        for name, run in json.loads(path.read_text())["runs"].items():
            loft = run["runners"].get("loft") or {}
            wanted = (path.name, name) in PEER_RUNS if path.name.startswith("vs-peers") else (
                name.startswith("recipe-") or name in SPEED_RUNS)
            if wanted and loft.get("status") == "ok":
                then = AS_RUN.get((path.name, run["recipe"]), [])
                cfg = recipes.apply_overrides(recipes.load(REPO / run["recipe"]), then + run["overrides"])
                points.append((name, f"bench speed, {path.name}", cfg, process_peak(loft), True, ""))
    return points


def calibration_table() -> list[dict]:
    rows = []
    for label, source, cfg, measured, whole_process, caveat in calibration_points():
        s = Setup.from_recipe(cfg)
        s.separate_reference = s.separate_reference or cfg.get("_separate_reference", False)  # TRL only
        est = estimate(find_arch(cfg["base_model"]), s)
        value = est.allocated if whole_process else est.training
        rows.append({"run": label, "source": source, "estimate_gib": round(value, 2), "measured_gib": measured,
                     "error_pct": round(100 * (value - measured) / measured, 1), "caveat": caveat})
    return rows


if __name__ == "__main__":
    print("| run | estimate GiB | measured GiB | error | source | not modelled |\n|---|---|---|---|---|---|")
    for row in calibration_table():
        print(f"| {row['run']} | {row['estimate_gib']} | {row['measured_gib']} | {row['error_pct']:+.1f}% | "
              f"{row['source']} | {row['caveat']} |")
