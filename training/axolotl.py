"""How Loft runs Axolotl, and the stand-in model and tokenizer it runs on when real weights are not needed.

`launch` is the one way every caller starts Axolotl's trainer (`loft train`, `loft doctor --measure`,
`loft bench speed`, the recipe tests): `accelerate launch -m axolotl.cli.train` on a resolved recipe, with all
CPU threads on a CPU machine (accelerate defaults a non-CPU launch to one OpenMP thread) and a copy of Axolotl's
output in the run's log. The stand-in model and tokenizer let memory and speed be measured without downloading
weights: memory and throughput do not depend on the weights' values.
"""

import datetime
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

from training import lifecycle
from training.errors import LoftError
from training.launcher import Topology, command, environment
from training.paths import REPO, RUNS

GUARD = "training.plugins.guard.HealthGuardPlugin"


def launch(resolved: Path, log_path: Path | None = None, resume: bool = False,
           topo: Topology | None = None) -> None:
    """Run Axolotl on a resolved recipe, in one process or the processes of `topo` (training/launcher.py); its
    output is shown and kept in log_path (appended on resume; an earlier log is moved to train.log.1, .2, ...
    otherwise, never overwritten). Axolotl and accelerate run under the group supervisor, so a killed
    `loft train` takes them down instead of leaving a GPU busy."""
    env, cmd = environment(topo), command(resolved, topo)
    log = open_log(log_path, resume) if log_path else None
    proc = subprocess.Popen(lifecycle.supervised(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                            preexec_fn=lifecycle.die_with_parent())
    try:
        for line in proc.stdout:  # show Axolotl's own progress, keep a copy in train.log
            sys.stdout.write(line)
            if log:
                log.write(line)
        rc = proc.wait()
    finally:  # Ctrl-C reaches only us (the children have their own session): stop them before leaving
        lifecycle.stop(proc)
        if log:
            log.close()
    if rc != 0:
        where = f"; see {log_path}" if log_path else ""
        why = failure_reason(log_path) if log_path else None
        raise LoftError(f"Axolotl training failed (exit {rc}){f': {why}' if why else ''}{where}",
                        code=rc if 0 < rc < 128 else 1)


def open_log(path: Path, resume: bool):
    """train.log for appending (resume) or fresh, with an earlier log rotated to train.log.N, not overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not resume:
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.{n}"))
    log = open(path, "a")
    if resume:
        log.write(f"\n===== loft train --resume {datetime.datetime.now().isoformat(timespec='seconds')} =====\n")
    return log


# The lines that say why a run died, in the order worth reporting (a traceback's last line comes after them).
_REASONS = (r"No space left on device", r"CUDA out of memory|OutOfMemoryError", r"Permission denied|Read-only file",
            r"^\w*(Error|Exception)\b.*")


def failure_reason(log_path: Path) -> str | None:
    """The line of Axolotl's log that says why it failed (a full disk, out of memory, the exception), or None."""
    lines = [line.strip() for line in log_tail(log_path).splitlines() if line.strip()]
    for pattern in _REASONS:
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1][:240]
    return None


def log_tail(path: Path, size: int = 64 << 10) -> str:
    """The last `size` bytes of a log."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


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
    subprocess.run([sys.executable, "-c", f"from training.axolotl import _initialise; _initialise({str(out)!r})"],
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
