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
import subprocess
import sys
from pathlib import Path

import yaml

from training.errors import LoftError
from training.paths import REPO, RUNS


def require_cuda() -> None:
    import torch

    if not torch.cuda.is_available():
        raise LoftError("--measure needs a CUDA GPU and this machine has none (torch.cuda.is_available() is False); "
                        "drop --measure for the arithmetic estimate, or run it on the GPU host")


# The stand-in tokenizer: one token per word `w0`..`w3999` plus ChatML's specials, so row lengths in tokens are
# exact and every id fits any model's vocabulary. It lives in its own folder: next to a config.json, AutoTokenizer
# would swap it for the model family's own class (Qwen2Tokenizer, ...), which re-splits the words.
SPECIALS = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>", "system", "user", "assistant"]
PAD_ID = 0
WORDS = 4000
CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def word_tokenizer() -> Path:
    out = RUNS / "random-models" / "word-tokenizer"
    if (out / "tokenizer.json").exists():
        return out
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, pad_token="<pad>", unk_token="<unk>", eos_token="<|im_end|>",
                                  additional_special_tokens=["<|im_start|>"], model_max_length=1 << 20)
    tok.chat_template = CHATML
    tok.save_pretrained(out)
    return out


def random_model(name: str, config: dict) -> Path:
    """A random-initialised bf16 model of `config` in runs/random-models/NAME, built once and shared by
    `loft doctor --measure` and `loft bench speed`. Built in a child process, so its GPU memory is freed before
    training starts; the stamp records the config it was built from and the parameter count."""
    config = {k: v for k, v in config.items() if k != "quantization_config"}  # describes weights we do not have
    out = RUNS / "random-models" / name
    stamp = out / "loft-random.json"
    if stamp.exists() and json.loads(stamp.read_text()).get("config") == config:
        return out
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    (out / "config.json").write_text(json.dumps(config))
    (out / "config.source.json").write_text(json.dumps(config))  # save_pretrained rewrites config.json
    print(f"random-initialising {name} -> {out}", flush=True)
    subprocess.run([sys.executable, "-c", f"from training.measure import _initialise; _initialise({str(out)!r})"],
                   cwd=REPO, check=True)
    return out


def _initialise(model_dir: str) -> None:
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(model_dir)
    with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(model_dir)
    Path(model_dir, "loft-random.json").write_text(json.dumps({
        "config": json.loads(Path(model_dir, "config.source.json").read_text()),
        "n_params": model.num_parameters()}))


# Keys that point at data, tokenizers, evaluation, checkpoints or trackers: --measure and `loft bench speed` replace
# or drop them and keep every compute key as the recipe has it.
DROP = ("datasets", "test_datasets", "pretraining_dataset", "chat_template", "chat_template_jinja", "special_tokens",
        "tokens", "added_tokens_overrides", "tokenizer_config", "tokenizer_type", "base_model_config", "eval_steps",
        "evals_per_epoch", "saves_per_epoch", "save_steps", "save_total_limit", "eval_strategy", "do_bench_eval",
        "hub_model_id", "push_to_hub", "use_wandb", "wandb_project", "wandb_name", "wandb_entity", "use_mlflow",
        "resume_from_checkpoint", "lora_model_dir", "num_epochs", "max_steps", "val_set_size", "eval_table_size")


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
    run = {k: v for k, v in cfg.items() if k not in DROP}
    seq = cfg.get("sequence_len") or 2048
    batch = (cfg.get("micro_batch_size") or 1) * (cfg.get("gradient_accumulation_steps") or 1)
    rows = max(16, 2 * steps * batch)
    if cfg.get("rl"):
        data = preference_rows(work / "pairs.jsonl", seq, rows)
        run["datasets"] = [{"path": str(data), "split": "train", "type": "chatml.default"}]
    else:
        run["datasets"] = [{"path": "synthetic", "type": "_synthetic", "length": rows, "sequence_length": seq,
                            "max_input_id": len(SPECIALS) + WORDS - 1, "seed": 0}]
    plugins = [p for p in cfg.get("plugins") or [] if p != "training.guard.HealthGuardPlugin"]
    run.update(base_model=str(model_dir), max_steps=steps, num_epochs=1, save_strategy="no", eval_strategy="no",
               output_dir=str(work / "out"), dataset_prepared_path=str(work / "prepared"), logging_steps=1,
               plugins=plugins + ["training.guard.HealthGuardPlugin"], loft_guard_min_improvement=0,
               loft_guard_action="warn", tokenizer_config=str(word_tokenizer()),
               chat_template="tokenizer_default")
    return run


def measure(recipe_path: Path, report, steps: int = 4) -> dict:
    from training import recipe as recipes
    from training.memory import CUDA_CONTEXT_GIB, estimate_recipe, find_arch
    from training.train import launch

    cfg = recipes.load(recipe_path)
    arch = find_arch(cfg.get("base_model"))
    if arch is None:
        raise LoftError(f"--measure needs the architecture of `{cfg.get('base_model')}`: add its config.json to "
                        "training/archs/")
    work = RUNS / "doctor-measure" / recipes.default_run_name(Path(recipe_path))
    work.mkdir(parents=True, exist_ok=True)
    print(f"loft doctor --measure: random-initialised {arch.name} ({arch.params / 1e9:.2f} B) → {work}", flush=True)
    source = Path(arch.source)
    model_name = source.parent.name if source.stem == "config" else source.stem
    model_dir = random_model(model_name, json.loads(source.read_text()))
    run = measurement_recipe(cfg, model_dir, work, steps)
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
    # the guard's peak is training's (from the trainer's start); loading's is estimated apart (est.loading)
    err = 100 * (est.training - mem["peak_allocated_gib"]) / mem["peak_allocated_gib"]
    print(f"measured: peak allocated {mem['peak_allocated_gib']:.2f} GiB, reserved {mem['peak_reserved_gib']:.2f} GiB "
          f"({mem['device']}, {steps} steps)")
    print(f"estimate: peak allocated {est.training:.2f} GiB → error {err:+.1f}%; needs {est.needed:.2f} GiB vs "
          f"{mem['peak_reserved_gib']:.2f} reserved + {CUDA_CONTEXT_GIB} CUDA context")
    result = {"measured": mem, "estimate_allocated_gib": round(est.training, 3), "error_pct": round(err, 1),
              "steps": steps, "recipe": str(recipe_path), "arch": model_name, "config": cfg}
    (work / "measure.json").write_text(json.dumps(result, indent=2))
    report.memory = {**(report.memory or {}), "measured": result}
    return result
