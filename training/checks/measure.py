"""`loft doctor RECIPE --measure`: the recipe's real peak memory, on a GPU, without downloading weights.

Memory does not depend on the weights' values, so a random-initialised model of the exact architecture
(training/archs/*.json or the base model's config.json) stands in for the base model. The recipe runs through
Axolotl unchanged except for: that model, a synthetic dataset of full-length rows (every micro-batch is
sequence_len tokens: the worst case the estimate assumes), a few steps, no eval, no checkpoints, and the health
guard, which writes peak allocated/reserved memory into health.json (training/plugins/peak.py: the whole process,
loading included, the same peak `loft bench speed` records). Everything lands in runs/doctor-measure/<name>/.

Prints, after the doctor's report:
  measured: peak allocated 6.08 GiB, reserved 6.51 GiB (NVIDIA H100 80GB HBM3, 4 steps; loading 5.33 GiB of it)
  estimate: peak allocated 6.00 GiB → error -1.3%; needs 6.86 GiB vs 6.51 reserved + CUDA context
"""

import json
import random
from pathlib import Path

import yaml

from training.axolotl import DROP, GUARD, SPECIALS, WORDS, launch, random_model, word_tokenizer
from training.errors import LoftError
from training.paths import RUNS, RunDir
from training.recipe import RecipeFacts


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LoftError("--measure needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
                        "drop --measure for the arithmetic estimate, or run it on the GPU host")


def preference_rows(path: Path, seq: int, rows: int) -> Path:
    """prompt + chosen ≈ prompt + rejected ≈ sequence_len tokens (about one token per word)."""
    rng = random.Random(0)
    text = lambda n: " ".join(f"w{rng.randrange(WORDS)}" for _ in range(n))  # noqa: E731
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"prompt": text(seq // 2 - 16), "chosen": text(seq // 2 - 16),
                                 "rejected": text(seq // 2 - 16)}) + "\n")
    return path


def measurement_recipe(cfg: dict, model_dir: Path, work: Path, steps: int) -> dict:
    run, folder = {k: v for k, v in cfg.items() if k not in DROP}, RunDir(work)
    facts = RecipeFacts.of(cfg)
    seq = facts.sequence_len
    batch = (cfg.get("micro_batch_size") or 1) * (cfg.get("gradient_accumulation_steps") or 1)
    rows = max(16, 2 * steps * batch)
    if facts.rl:
        data = preference_rows(work / "pairs.jsonl", seq, rows)
        run["datasets"] = [{"path": str(data), "split": "train", "type": "chatml.default"}]
    else:
        run["datasets"] = [{"path": "synthetic", "type": "_synthetic", "length": rows, "sequence_length": seq,
                            "max_input_id": len(SPECIALS) + WORDS - 1, "seed": 0}]
    plugins = [p for p in cfg.get("plugins") or [] if p != GUARD]
    run.update(base_model=str(model_dir), max_steps=steps, num_epochs=1, save_strategy="no", eval_strategy="no",
               output_dir=str(folder.measure_out), dataset_prepared_path=str(folder.prepared), logging_steps=1,
               plugins=plugins + [GUARD], loft_guard_min_improvement=0,
               loft_guard_action="warn", tokenizer_config=str(word_tokenizer()),
               chat_template="tokenizer_default")
    return run


def measure(recipe_path: Path, report, steps: int = 4) -> dict:
    from training import recipe as recipes
    from training.arch import find_arch
    from training.checks.memory import CUDA_CONTEXT_GIB, estimate_recipe

    cfg = recipes.load(recipe_path)
    arch = find_arch(cfg.get("base_model"))
    if arch is None:
        raise LoftError(f"--measure needs the architecture of `{cfg.get('base_model')}`: add its config.json to "
                        "training/archs/")
    work = RUNS / "doctor-measure" / recipes.default_run_name(Path(recipe_path))
    folder = RunDir(work)
    work.mkdir(parents=True, exist_ok=True)
    print(f"loft doctor --measure: random-initialised {arch.name} ({arch.params / 1e9:.2f} B) → {work}", flush=True)
    source = Path(arch.source)
    model_name = source.parent.name if source.stem == "config" else source.stem
    model_dir = random_model(model_name, json.loads(source.read_text()))
    run = measurement_recipe(cfg, model_dir, work, steps)
    resolved = folder.recipe
    resolved.write_text(f"# loft doctor --measure of {recipe_path}\n" + yaml.safe_dump(run, sort_keys=False))
    folder.measure_health.unlink(missing_ok=True)
    launch(resolved, folder.train_log)
    health = folder.measure_health
    mem = json.loads(health.read_text()).get("memory") if health.exists() else None
    if not mem:
        raise LoftError(f"the measurement run wrote no memory record ({health}); see {folder.train_log}")
    est = estimate_recipe(cfg, arch)
    # the whole process's peak (training/plugins/peak.py), loading included: the estimate's `allocated`
    err = 100 * (est.allocated - mem["peak_allocated_gib"]) / mem["peak_allocated_gib"]
    print(f"measured: peak allocated {mem['peak_allocated_gib']:.2f} GiB, reserved {mem['peak_reserved_gib']:.2f} GiB "
          f"({mem['device']}, {steps} steps; loading {mem['load_peak_allocated_gib']:.2f} GiB of it)")
    print(f"estimate: peak allocated {est.allocated:.2f} GiB → error {err:+.1f}%; needs {est.needed:.2f} GiB vs "
          f"{mem['peak_reserved_gib']:.2f} reserved + {CUDA_CONTEXT_GIB} CUDA context")
    result = {"measured": mem, "estimate_allocated_gib": round(est.allocated, 3), "error_pct": round(err, 1),
              "steps": steps, "recipe": str(recipe_path), "arch": model_name, "config": cfg}
    folder.measure_json.write_text(json.dumps(result, indent=2))
    report.memory = {**(report.memory or {}), "measured": result}
    return result
