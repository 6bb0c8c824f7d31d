"""`loft doctor RECIPE --measure`: the recipe's real peak memory, on a GPU, without downloading weights.

Memory does not depend on the weights' values, so a random-initialised model of the exact architecture
(training/archs/*.json or the base model's config.json) stands in for the base model. The recipe runs through
Axolotl unchanged except for: that model, a synthetic dataset of full-length rows (every micro-batch is
sequence_len tokens: the worst case the estimate assumes), a few steps, no eval, no checkpoints, and the health
guard, which writes peak allocated/reserved memory into health.json. Everything lands in runs/doctor-measure/<name>/.

Prints, after the doctor's report:
  measured: peak allocated 6.08 GiB, reserved 6.51 GiB (NVIDIA H100 80GB HBM3, 4 steps)
  estimate: peak allocated 6.00 GiB → error -1.3%; needs 6.86 GiB vs 6.51 reserved + CUDA context
"""

import json
import random
import shutil
from pathlib import Path

import yaml

from training.errors import LoftError
from training.paths import RUNS

WORDS = "the of and to in a is that for it as was with be by on not he this are or his from at which but".split()


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LoftError("--measure needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
                        "drop --measure for the arithmetic estimate, or run it on the GPU host")


def tokenizer_dir(base_model: str) -> Path:
    """The base model's own tokenizer when it is on disk, else the embedded SmolLM2 one (ids < 49152)."""
    from training.datacheck import resolve
    from training.model import ensure_default_model

    local = resolve(base_model) if isinstance(base_model, str) else None
    if local and (local / "tokenizer.json").exists():
        return local
    return ensure_default_model(quiet=True)


def build_model(arch, out: Path, tok_dir: Path) -> Path:
    """Random-initialised bf16 model of `arch` in `out`, with the tokenizer files of `tok_dir`."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    source = json.loads(Path(arch.source).read_text())
    stamp = out / "loft-arch.json"
    if stamp.exists() and json.loads(stamp.read_text()) == source:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    source.pop("quantization_config", None)  # a pre-quantized config describes weights we do not have
    (out / "config.json").write_text(json.dumps(source))
    config = AutoConfig.from_pretrained(out)
    with torch.device("cuda"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(out)
    del model
    torch.cuda.empty_cache()
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tok_dir / name).exists():
            shutil.copy(tok_dir / name, out / name)
    stamp.write_text(json.dumps(source))
    return out


def preference_rows(path: Path, seq: int, rows: int) -> Path:
    """prompt + chosen ≈ prompt + rejected ≈ sequence_len tokens (about one token per word)."""
    rng = random.Random(0)
    text = lambda n: " ".join(rng.choice(WORDS) for _ in range(n))  # noqa: E731
    with path.open("w") as fh:
        for _ in range(rows):
            fh.write(json.dumps({"prompt": text(seq // 2 - 16), "chosen": text(seq // 2 - 16),
                                 "rejected": text(seq // 2 - 16)}) + "\n")
    return path


def measurement_recipe(cfg: dict, model_dir: Path, work: Path, steps: int, vocab: int) -> dict:
    run = dict(cfg)
    seq = cfg.get("sequence_len") or 2048
    batch = (cfg.get("micro_batch_size") or 1) * (cfg.get("gradient_accumulation_steps") or 1)
    rows = max(16, 2 * steps * batch)
    if cfg.get("rl"):
        data = preference_rows(work / "pairs.jsonl", seq, rows)
        run["datasets"] = [{"path": str(data), "split": "train", "type": "chatml.prompt_pairs"}]
    else:
        run["datasets"] = [{"path": "synthetic", "type": "_synthetic", "length": rows, "sequence_length": seq,
                            "max_input_id": min(vocab, 49152) - 1, "seed": 0}]
    for key in ("test_datasets", "val_set_size", "eval_steps", "evals_per_epoch", "tokenizer_config",
                "hub_model_id", "resume_from_checkpoint", "wandb_project", "use_wandb", "use_tensorboard"):
        run.pop(key, None)
    plugins = [p for p in cfg.get("plugins") or [] if p != "training.guard.HealthGuardPlugin"]
    run.update(base_model=str(model_dir), max_steps=steps, num_epochs=1, save_strategy="no", eval_strategy="no",
               output_dir=str(work / "out"), dataset_prepared_path=str(work / "prepared"), logging_steps=1,
               plugins=plugins + ["training.guard.HealthGuardPlugin"], loft_guard_min_improvement=0,
               loft_guard_action="warn", chat_template=cfg.get("chat_template") or "chatml")
    return run


def measure(recipe_path: Path, report, steps: int = 4) -> dict:
    from training import recipe as recipes
    from training.memory import CUDA_CONTEXT_GIB, estimate_recipe, find_arch, normalize
    from training.train import launch

    cfg = recipes.load(recipe_path)
    arch = find_arch(cfg.get("base_model"))
    if arch is None:
        raise LoftError(f"--measure needs the architecture of `{cfg.get('base_model')}`: add its config.json to "
                        "training/archs/")
    work = RUNS / "doctor-measure" / recipes.default_run_name(Path(recipe_path))
    work.mkdir(parents=True, exist_ok=True)
    print(f"loft doctor --measure: random-initialised {arch.name} ({arch.params / 1e9:.2f} B) → {work}", flush=True)
    tok = tokenizer_dir(cfg.get("base_model"))
    model_dir = build_model(arch, RUNS / "doctor-measure" / "models" / normalize(arch.name), tok)
    run = measurement_recipe(cfg, model_dir, work, steps, arch.vocab)
    resolved = work / "recipe.yaml"
    resolved.write_text(f"# loft doctor --measure of {recipe_path}\n" + yaml.safe_dump(run, sort_keys=False))
    if (work / "out" / "health.json").exists():
        (work / "out" / "health.json").unlink()
    launch(resolved, work / "train.log")
    health = work / "out" / "health.json"
    mem = json.loads(health.read_text()).get("memory") if health.exists() else None
    if not mem:
        raise LoftError(f"the measurement run wrote no memory record ({health}); see {work / 'train.log'}")
    est = estimate_recipe(cfg, arch)
    err = 100 * (est.allocated - mem["peak_allocated_gib"]) / mem["peak_allocated_gib"]
    print(f"measured: peak allocated {mem['peak_allocated_gib']:.2f} GiB, reserved {mem['peak_reserved_gib']:.2f} GiB "
          f"({mem['device']}, {steps} steps)")
    print(f"estimate: peak allocated {est.allocated:.2f} GiB → error {err:+.1f}%; needs {est.needed:.2f} GiB vs "
          f"{mem['peak_reserved_gib']:.2f} reserved + {CUDA_CONTEXT_GIB} CUDA context")
    if arch.vocab < 49152 and tok.name == "smollm2-135m-instruct":
        print(f"note: the stand-in tokenizer has 49152 ids and this model {arch.vocab}: Axolotl may resize the "
              "embeddings, so the measurement runs slightly high")
    result = {"measured": mem, "estimate_allocated_gib": round(est.allocated, 3), "error_pct": round(err, 1),
              "steps": steps, "recipe": str(recipe_path)}
    (work / "measure.json").write_text(json.dumps(result, indent=2))
    report.memory = {**(report.memory or {}), "measured": result}
    return result
