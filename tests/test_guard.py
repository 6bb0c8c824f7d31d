"""Health guard: real Axolotl training runs that go wrong the way real runs do, each stopped with a diagnosis.

Every run trains a tiny random Llama (hidden 64, 2 layers, the embedded SmolLM2 tokenizer) on real Shakespeare
chat rows for up to 60 steps with `plugins: [training.plugins.guard.HealthGuardPlugin]`. A not-learning run must be
stopped within the first tenth of its steps (by step 6). The clean run goes through the plain
`accelerate launch -m axolotl.cli.train` launcher (what a user runs without Loft); the others run one after
another in a single Python process (axolotl.cli.train.do_cli, the function that launcher calls) to pay for
Axolotl's imports once.

  clean     full fine-tune, lr 1e-2, 20 steps                         → status ok, loss falls, no alarm
  nan       a checkpoint whose fp16 copy overflowed (|w| > 65504 → inf)  → G001 non-finite, step 1
  gradzero  lora_dropout: 1.0 (every adapter input is zeroed)          → G002 grad norm 0, step 3
  starved   warmup_steps: 1000 copied onto a 60-step run               → G004 LR ≈ 0, step 6
  plateau   learning_rate: 1e-7                                        → G003 not learning, step 6
  overfit   8 rows, constant lr 1e-2, eval every 3 steps                → G005 eval rises, best step noted
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from training.model import ensure_default_model
from training.paths import REPO, apply_private_env

apply_private_env()

MAX_STEPS = 60
RUNNER = '''
import sys
if __name__ == "__main__":  # datasets may spawn workers that re-import this file
    from axolotl.cli.train import do_cli
    for config in sys.argv[1:]:
        try:
            do_cli(config=config)
        except Exception as err:
            print(f"RUN FAILED {config}: {err!r}", flush=True)
'''


def build_tiny(out: Path, overflow: bool = False) -> Path:
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(0)
    config = LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         num_key_value_heads=2, vocab_size=49152, tie_word_embeddings=True,
                         max_position_embeddings=2048, bos_token_id=1, eos_token_id=2, pad_token_id=2)
    model = AutoModelForCausalLM.from_config(config)
    if overflow:  # fine in fp32/bf16, inf once cast to fp16: the classic broken fp16 conversion
        with torch.no_grad():
            model.model.layers[0].mlp.down_proj.weight[:4] *= 4e6
        model = model.half()
    model.save_pretrained(out)
    tok = ensure_default_model(quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(tok / name, out / name)
    return out


def recipe(work: Path, name: str, base: Path, data: Path, **changes) -> Path:
    chat = {"ds_type": "json", "type": "chat_template", "field_messages": "messages",
            "roles_to_train": ["assistant"], "train_on_eos": "turn"}
    cfg = {
        "base_model": str(base), "chat_template": "tokenizer_default",
        "datasets": [{"path": str(data / "train64.jsonl"), **chat}],
        "dataset_prepared_path": str(work / "prepared"), "sequence_len": 192, "sample_packing": False,
        "adapter": "lora", "lora_r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "lora_target_linear": True,
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        "micro_batch_size": 2, "gradient_accumulation_steps": 1, "max_steps": MAX_STEPS,
        "learning_rate": 0.01, "lr_scheduler": "cosine", "warmup_steps": 3, "max_grad_norm": 1.0,
        "optimizer": "adamw_torch", "bf16": False, "fp16": False, "tf32": False, "seed": 42,
        "output_dir": str(work / name), "logging_steps": 1, "save_strategy": "no",
        "plugins": ["training.plugins.guard.HealthGuardPlugin"],
    }
    if changes.pop("eval", False):
        cfg["test_datasets"] = [{"path": str(data / "eval8.jsonl"), "split": "train", **chat}]
    cfg.update(changes)
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


@pytest.fixture(scope="session")
def runs(tmp_path_factory) -> dict[str, dict]:
    from training.demo import ensure_demo_data
    from training.axolotl import launch

    work = tmp_path_factory.mktemp("guard")
    src = ensure_demo_data()
    rows = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (work / "train64.jsonl").write_text("\n".join(rows[:64]) + "\n", encoding="utf-8")
    (work / "train8.jsonl").write_text("\n".join(rows[:8]) + "\n", encoding="utf-8")
    evals = (src / "eval.jsonl").read_text(encoding="utf-8").splitlines()
    (work / "eval8.jsonl").write_text("\n".join(evals[:8]) + "\n", encoding="utf-8")
    tiny, broken = build_tiny(work / "tiny"), build_tiny(work / "tiny-fp16-overflow", overflow=True)

    configs = [
        recipe(work, "nan", broken, work),
        recipe(work, "gradzero", tiny, work, lora_dropout=1.0),
        recipe(work, "starved", tiny, work, warmup_steps=1000),
        recipe(work, "plateau", tiny, work, learning_rate=1e-7),
        recipe(work, "overfit", tiny, work, adapter=None, learning_rate=0.01, lr_scheduler="constant", eval=True,
               eval_steps=3, datasets=[{**yaml.safe_load((work / "nan.yaml").read_text())["datasets"][0],
                                        "path": str(work / "train8.jsonl")}],
               dataset_prepared_path=str(work / "prepared-overfit")),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(os.cpu_count() or 1))}
    (work / "runner.py").write_text(RUNNER)
    proc = subprocess.run([sys.executable, str(work / "runner.py"), *map(str, configs)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=900)
    (work / "runner.log").write_text(proc.stdout + proc.stderr)
    clean = recipe(work, "clean", tiny, work, adapter=None, max_steps=20)
    launch(clean, work / "clean.log")  # accelerate launch -m axolotl.cli.train, as a user would

    out = {}
    for name in ("clean", "nan", "gradzero", "starved", "plateau", "overfit"):
        health = work / name / "health.json"
        assert health.exists(), f"{name}: no health.json; see {work / 'runner.log'}\n{proc.stdout[-3000:]}"
        out[name] = {**json.loads(health.read_text()), "log": (work / "runner.log").read_text()}
    out["clean"]["log"] = (work / "clean.log").read_text()
    return out


def stopped(run: dict, code: str, by_step: int) -> dict:
    problem = run["problem"]
    assert run["status"] == "stopped" and problem and problem["code"] == code, run["problem"]
    assert problem["step"] <= by_step and run["step"] == problem["step"], (problem["step"], run["step"])
    assert problem["causes"] and problem["fixes"]
    assert f"loft guard: {code} at step {problem['step']}" in run["log"]  # the diagnosis reached the console
    return problem


def test_clean_run_is_left_alone(runs):
    run = runs["clean"]
    assert run["status"] == "ok" and run["problem"] is None and run["step"] == 20
    assert sum(run["losses"][-3:]) / 3 < 0.9 * sum(run["losses"][:3]) / 3  # it did learn
    assert "loft guard:" not in run["log"]


def test_non_finite_loss_stops_at_once(runs):
    problem = stopped(runs["nan"], "G001", by_step=1)
    assert "nan" in problem["reason"] or "inf" in problem["reason"]


def test_zero_gradient_stops_after_k_steps(runs):
    problem = stopped(runs["gradzero"], "G002", by_step=MAX_STEPS // 10)
    assert "lora_dropout: 1.0" in " ".join(problem["causes"])


def test_starved_learning_rate_stops_by_a_tenth(runs):
    problem = stopped(runs["starved"], "G004", by_step=MAX_STEPS // 10)
    assert "warmup" in " ".join(problem["causes"] + problem["fixes"])


def test_flat_loss_stops_by_a_tenth(runs):
    problem = stopped(runs["plateau"], "G003", by_step=MAX_STEPS // 10)
    assert "less than 1% better" in problem["reason"]


def test_overfitting_stops_and_names_the_best_step(runs):
    run = runs["overfit"]
    problem = stopped(run, "G005", by_step=MAX_STEPS)
    evals = [e["eval_loss"] for e in run["evals"]]
    best = min(evals)
    assert evals[-1] > best and problem["best_step"] == run["evals"][evals.index(best)]["step"]
    assert "load_best_model_at_end" in run["note"] and f"max_steps: {problem['best_step']}" in run["note"]


# ---------------------------------------------------------------- the callback alone (no training)
def feed(losses, lr=1e-3, warmup=4, max_steps=40, **settings):
    from training.plugins.guard import HealthGuardCallback

    cb = HealthGuardCallback(settings, lr, "/nonexistent")
    cb.max_steps, cb.warmup_steps = max_steps, warmup
    cb._report = lambda args, state: None
    state, control = SimpleNamespace(global_step=0), SimpleNamespace(should_training_stop=False)
    for step, loss in enumerate(losses, 1):
        state.global_step = step
        cb.on_log(None, state, control, logs={"loss": loss, "grad_norm": 0.9,
                                               "learning_rate": lr * min(1, step / warmup)})
        if control.should_training_stop:
            return cb.problem
    return None


def test_noisy_real_lora_run_is_not_a_plateau():
    """The first 26 logged losses of the demo recipe (SmolLM2-135M LoRA, 2 CPU cores, 2026-11-22): noisy, slow."""
    demo = [3.897, 4.141, 4.091, 3.994, 3.925, 4.258, 3.203, 3.852, 4.03, 3.571, 3.917, 4.387, 3.832, 4.04, 4.215,
            3.538, 3.808, 3.786, 3.616, 3.515, 4.206, 3.956, 4.159, 3.323, 3.816, 3.718]
    assert feed(demo) is None


def test_thresholds_come_from_the_recipe():
    flat = [2.0 + 0.001 * (i % 2) for i in range(40)]
    assert feed(flat)["code"] == "G003"
    assert feed(flat, loft_guard_min_improvement=0) is None
    assert feed([5.0, 4.0, 3.0, 2.0] * 10, max_steps=400) is None  # judged only after 10% of 400 steps


def test_peak_memory_survives_axolotl_resets(monkeypatch, tmp_path):
    """Axolotl resets torch's peak counters at every memory log; the peaks must still be the run's (on the GPU host
    every --measure once read 5.42 GiB: the peak since Axolotl's last reset). The guard and `loft bench speed` read
    one probe, so both report the same peaks and the second to see training start does not restart it. Fake
    counters."""
    import torch

    from benchmarks.speed_probe import SpeedCallback
    from training.plugins.guard import HealthGuardCallback
    from training.plugins.peak import GIB, PROBE

    counters = {"alloc": 2 * GIB, "res": 3 * GIB}

    def reset(device=None):
        counters["alloc"], counters["res"] = GIB, GIB

    def use(alloc, res):
        counters["alloc"], counters["res"] = max(counters["alloc"], alloc * GIB), max(counters["res"], res * GIB)

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "fake GPU")
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda *a: counters["alloc"])
    monkeypatch.setattr(torch.cuda, "max_memory_reserved", lambda *a: counters["res"])
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(torch.cuda.memory, "reset_peak_memory_stats", reset)
    monkeypatch.setattr(PROBE, "folded", [0, 0])
    monkeypatch.setattr(PROBE, "load", None)

    PROBE.watch()  # the guard plugin's register(), before the model loads
    use(5, 6)  # loading's peak ...
    torch.cuda.reset_peak_memory_stats(0)  # ... then Axolotl logs memory after loading the model
    use(3, 6)
    guard = HealthGuardCallback({}, 1e-4, str(tmp_path))
    run = type("Run", (), {"max_steps": 10, "get_warmup_steps": lambda self, n: 0})()
    guard.on_train_begin(run, run, None)  # train begin: loading's peak is kept apart, training's counted from here
    assert PROBE.load == (5 * GIB, 6 * GIB) and counters["alloc"] == GIB
    use(4, 4)
    PROBE.start_training()  # the speed callback's train begin, in the same process: changes nothing
    assert PROBE.load == (5 * GIB, 6 * GIB) and counters["alloc"] == 4 * GIB
    use(9, 10)  # a training step's peak ...
    torch.cuda.reset_peak_memory_stats(0)  # ... then Axolotl's memory log resets the counters
    use(5, 5)

    mem = guard._memory()
    assert mem["device"] == "fake GPU"
    assert (mem["peak_allocated_gib"], mem["train_peak_allocated_gib"], mem["load_peak_allocated_gib"]) == (9, 9, 5)
    assert (mem["peak_reserved_gib"], mem["train_peak_reserved_gib"], mem["load_peak_reserved_gib"]) == (10, 10, 6)
    speed = SpeedCallback(tmp_path / "speed.json", "loft", pad_id=0).record()
    assert {k: speed[k] for k in mem} == mem  # one definition of "measured peak" for both
