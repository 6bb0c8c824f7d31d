"""`loft doctor`: one case per finding, each made from the demo recipe and its real Shakespeare rows with the one
change that provokes it (the way a user would get it wrong), plus the memory estimator against measured peaks.

Cases run the doctor in-process (Axolotl is imported once); two cases run the real command for exit codes.
The baseline — the demo recipe on 200 rows for exactly one epoch — must produce no finding at all.
"""

import copy
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from benchmarks import calibration
from training import arch, doctor
from training.checks import lints, memory
from training.checks.report import Finding, key_lines
from training.errors import LoftError
from training.paths import REPO, apply_private_env

apply_private_env()

DEMO = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"
QWEN7 = "Qwen/Qwen2.5-7B-Instruct"
LIGER = {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_fused_linear_cross_entropy": True}
DROP = object()


@pytest.fixture(scope="session")
def data(tmp_path_factory) -> Path:
    """The demo's Shakespeare rows (built by `make setup`), cut to the sizes the cases need."""
    from training.demo import ensure_demo_data

    src = ensure_demo_data()
    out = tmp_path_factory.mktemp("doctor-data")
    rows = (src / "train.jsonl").read_text(encoding="utf-8").splitlines()
    (out / "train200.jsonl").write_text("\n".join(rows[:200]) + "\n", encoding="utf-8")
    (out / "train32.jsonl").write_text("\n".join(rows[:32]) + "\n", encoding="utf-8")
    shutil.copy(src / "eval.jsonl", out / "eval.jsonl")
    # preference pairs: the real continuation is chosen, another passage's continuation rejected
    msgs = [json.loads(r)["messages"] for r in rows[:40]]
    with (out / "pairs.jsonl").open("w", encoding="utf-8") as fh:
        for m, other in zip(msgs, msgs[1:]):
            fh.write(json.dumps({"prompt": m[1]["content"], "chosen": m[2]["content"],
                                 "rejected": other[2]["content"]}) + "\n")
    return out


def make(tmp_path: Path, data: Path, rows: str = "train200.jsonl", **changes) -> Path:
    """The demo recipe on `rows` for exactly one epoch (200 rows ÷ 4 per step = 50 steps), with `changes`."""
    cfg = yaml.safe_load(DEMO.read_text())
    cfg["datasets"][0]["path"] = str(data / rows)
    cfg["test_datasets"][0]["path"] = str(data / "eval.jsonl")
    cfg["max_steps"] = 50
    for key, value in changes.items():
        if value is DROP:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return path


def findings(path: Path, gpu: str | None = None, data: bool = True) -> dict[str, list[Finding]]:
    out: dict[str, list[Finding]] = {}
    for f in doctor.diagnose(path, gpu, data=data).findings:
        out.setdefault(f.code, []).append(f)
    assert "LOFT-X001" not in out, out["LOFT-X001"][0].reason  # the doctor itself must never crash
    return out


def only(found: dict, code: str, severity: str) -> Finding:
    assert code in found, f"{code} missing; got {sorted(found)}"
    f = found[code][0]
    assert f.severity == severity and f.fix, f
    return f


# ---------------------------------------------------------------- baseline
def test_clean_recipe_has_no_findings(tmp_path, data):
    path = make(tmp_path, data)
    report = doctor.diagnose(path, "rtx5070-12gb")
    assert report.findings == [], [(f.code, f.reason) for f in report.findings]
    assert report.exit_code(strict=True) == 0
    assert report.data["train_rows"] == 200 and report.data["epochs"] == 1.0
    assert report.memory["verdict"] == "fits"


def test_demo_recipe_only_flags_its_deliberate_short_run():
    report = doctor.diagnose(DEMO)
    codes = {f.code for f in report.findings} | {f.code for f in report.suppressed}
    assert codes <= {"LOFT-L202"} and report.count("error") == 0


def test_ignore_comment_silences_a_code(tmp_path, data):
    path = make(tmp_path, data, max_steps=10)
    assert "LOFT-L202" in findings(path)
    path.write_text("# loft-doctor: ignore LOFT-L202 (a smoke run)\n" + path.read_text())
    report = doctor.diagnose(path)
    assert not report.findings and [f.code for f in report.suppressed] == ["LOFT-L202"]


# ---------------------------------------------------------------- E0xx schema
def test_yaml_syntax_error_names_file_and_line(tmp_path, data):
    path = make(tmp_path, data)
    lines = path.read_text().splitlines()
    lines[5] = "  bad: [unclosed"
    path.write_text("\n".join(lines))
    f = only(findings(path), "LOFT-E001", "error")
    assert f"{path}:" in f.reason and "YAML syntax error" in f.reason


def test_unknown_keys_get_the_closest_valid_key(tmp_path, data):
    path = make(tmp_path, data, lora_rr=16, liger_rms_norm=True)
    text = path.read_text().replace("field_messages:", "field_mesages:", 1)
    path.write_text(text)
    found = findings(path)
    fixes = {f.reason.split("`")[1]: f.fix for f in found["LOFT-E002"]}
    assert "lora_r" in fixes["lora_rr"] and "LigerPlugin" in fixes["liger_rms_norm"]
    e006 = only(found, "LOFT-E006", "error")
    assert "field_messages" in e006.fix and e006.where.startswith(f"{path}:")


def test_wrong_types_are_reported_per_key_with_line(tmp_path, data):
    found = findings(make(tmp_path, data, micro_batch_size="two", learning_rate=[1]))
    keys = {f.reason.split("`")[1]: f for f in found["LOFT-E003"]}
    assert set(keys) == {"micro_batch_size", "learning_rate"}
    assert "'two'" in keys["micro_batch_size"].reason and keys["micro_batch_size"].where.endswith(
        f":{key_lines(make(tmp_path, data, micro_batch_size='two').read_text())['micro_batch_size']}")


def test_axolotl_rules_come_through(tmp_path, data):
    f = only(findings(make(tmp_path, data, adapter="qlora"), data=False), "LOFT-E004", "error")
    assert "load_in_4bit" in f.reason


def test_unloadable_plugin(tmp_path, data):
    f = only(findings(make(tmp_path, data, plugins=["training.nope.Plugin"]), data=False), "LOFT-E005", "error")
    assert "training.nope.Plugin" in f.reason


def test_guard_keys_need_the_guard_plugin(tmp_path, data):
    keys = {"loft_guard_grad_zero_steps": 5}
    assert "LOFT-E002" in findings(make(tmp_path, data, plugins=DROP, **keys), data=False)
    with_plugin = make(tmp_path, data, plugins=["training.plugins.guard.HealthGuardPlugin"], **keys)
    assert findings(with_plugin, data=False) == {}


# ---------------------------------------------------------------- D1xx data
def test_missing_dataset_file(tmp_path, data):
    path = make(tmp_path, data)
    path.write_text(path.read_text().replace(str(data / "train200.jsonl"), str(data / "nope.jsonl")))
    assert "nope.jsonl" in only(findings(path), "LOFT-D101", "error").reason


def test_broken_jsonl_lines_are_numbered(tmp_path, data):
    rows = (data / "train200.jsonl").read_text().splitlines()
    rows[2] = rows[2][:50]  # a truncated line
    rows[6] = "{'messages': []}"  # Python repr, not JSON
    (tmp_path / "broken.jsonl").write_text("\n".join(rows) + "\n")
    path = make(tmp_path, data, rows=str(tmp_path / "broken.jsonl"))
    f = only(findings(path), "LOFT-D102", "error")
    assert "2 line(s)" in f.reason and "lines 3, 7" in f.reason


def test_empty_and_role_broken_conversations(tmp_path, data):
    rows = [json.loads(r) for r in (data / "train200.jsonl").read_text().splitlines()]
    rows[0]["messages"] = []
    rows[1]["messages"] = rows[1]["messages"][:2]  # the answer is missing
    rows[2]["messages"].insert(2, dict(rows[2]["messages"][1]))  # two user turns in a row
    (tmp_path / "roles.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    found = findings(make(tmp_path, data, rows=str(tmp_path / "roles.jsonl")))
    errors = " | ".join(f.reason for f in found["LOFT-D103"] if f.severity == "error")
    assert "empty conversation (line 1)" in errors and "no assistant turn" in errors and "(line 2)" in errors
    assert any(f.severity == "warning" and "two user" in f.reason and "line 3" in f.reason for f in found["LOFT-D103"])


def test_chat_template_that_cannot_render_the_rows(tmp_path, data):
    f = only(findings(make(tmp_path, data, chat_template="gemma")), "LOFT-D104", "error")
    assert "200 row(s)" in f.reason and "System role not supported" in f.reason


def test_rows_longer_than_sequence_len(tmp_path, data):
    f = only(findings(make(tmp_path, data, sequence_len=144)), "LOFT-D105", "warning")
    assert "longer than sequence_len 144" in f.reason and "dropped" in f.reason
    assert only(findings(make(tmp_path, data, sequence_len=96)), "LOFT-D105", "error")  # most rows lost


def test_masking_checked_with_axolotls_own_tokenization(tmp_path, data):
    f = only(findings(make(tmp_path, data, train_on_inputs=True)), "LOFT-D106", "warning")
    assert "includes the prompt" in f.reason
    cut = make(tmp_path, data, sequence_len=48, excess_length_strategy="truncate")
    assert "every token is masked after truncation" in only(findings(cut), "LOFT-D106", "error").reason


def test_dpo_rows_need_prompt_chosen_rejected(tmp_path, data):
    rows = [json.loads(r) for r in (data / "pairs.jsonl").read_text().splitlines()]
    del rows[4]["rejected"]
    rows[5]["chosen"] = rows[5]["rejected"]
    (tmp_path / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    path = make(tmp_path, data, rl="dpo", test_datasets=DROP, datasets=[
        {"path": str(tmp_path / "pairs.jsonl"), "split": "train", "type": "chatml.prompt_pairs"}])
    found = findings(path)
    assert any(f.severity == "error" and "`rejected`" in f.reason and "line 5" in f.reason for f in found["LOFT-D107"])
    assert any(f.severity == "warning" and "identical" in f.reason and "line 6" in f.reason for f in found["LOFT-D107"])


def test_tokenizer_fallback_and_hub_dataset_notes(tmp_path, data):
    path = make(tmp_path, data, base_model=QWEN7, **LIGER)
    path.write_text(path.read_text().replace(str(data / "eval.jsonl"), "tatsu-lab/alpaca"))
    found = findings(path)
    assert "SmolLM2" in only(found, "LOFT-D108", "note").reason
    assert "tatsu-lab/alpaca" in only(found, "LOFT-D109", "note").reason


# ---------------------------------------------------------------- L2xx lints
def test_prequantized_base_by_name_and_by_config(tmp_path, data):
    f = only(findings(make(tmp_path, data, base_model="unsloth/Qwen2.5-7B-Instruct-bnb-4bit", **LIGER), data=False),
             "LOFT-L201", "warning")
    assert "merged" in f.reason
    model = tmp_path / "quantized-model"  # a local checkpoint whose config.json carries quantization_config
    model.mkdir()
    conf = json.loads((arch.ARCHS / "Qwen2.5-0.5B-Instruct.json").read_text())
    conf["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (model / "config.json").write_text(json.dumps(conf))
    f = only(findings(make(tmp_path, data, base_model=str(model), **LIGER), data=False), "LOFT-L201", "warning")
    assert "quantization_config" in f.reason


def test_coverage_below_one_epoch(tmp_path, data):
    f = only(findings(make(tmp_path, data, max_steps=10)), "LOFT-L202", "warning")
    assert "0.20 epoch" in f.reason and "max_steps: 50" in f.fix


def test_learning_rate_schedule(tmp_path, data):
    assert "is 0" in only(findings(make(tmp_path, data, learning_rate=0.0)), "LOFT-L203", "error").reason
    f = only(findings(make(tmp_path, data, warmup_steps=1000, warmup_ratio=DROP)), "LOFT-L203", "warning")
    assert "warm-up (1000 steps) is as long as the whole 50-step run" in f.reason and "never reaches" in f.reason


@pytest.mark.parametrize("changes, expect", [
    # the learning rate peaks only at the end: most steps ramp up at a fraction of it
    ({"warmup_ratio": 0.95}, r"the warm-up takes 47 of the 50 steps \(94%\)"),
    ({"warmup_steps": 30, "warmup_ratio": DROP}, "reaches 0.001 only at step 30"),
    ({"warmup_steps": 0.8, "warmup_ratio": DROP}, "the warm-up takes 40 of the 50 steps"),  # a ratio, as transformers 5 reads it
    ({"warmup_steps": 50, "warmup_ratio": DROP}, "never reaches 0.001"),
    ({"learning_rate": 1e-7}, "below 1e-6: a LoRA adapter starts at zero"),
])
def test_schedules_that_waste_most_steps(tmp_path, data, changes, expect):
    import re

    found = findings(make(tmp_path, data, **changes), data=True)
    reasons = [f.reason for f in found.get("LOFT-L203", []) if f.severity == "warning"]
    assert any(re.search(expect, r) for r in reasons), reasons


def test_max_steps_beside_num_epochs_says_which_wins(tmp_path, data):
    f = only(findings(make(tmp_path, data, max_steps=200, num_epochs=1)), "LOFT-L203", "note")
    assert "max_steps 200 sets the run length and num_epochs 1 is ignored: 200 steps are 4.00 epochs" in f.reason


def test_sound_schedules_are_not_flagged(tmp_path, data):
    for changes in ({"warmup_ratio": 0.1}, {"lr_scheduler": "linear"}, {"lr_scheduler": "constant"},
                    {"warmup_steps": 5, "warmup_ratio": DROP}):
        assert "LOFT-L203" not in findings(make(tmp_path, data, **changes)), changes


def test_tiny_dataset_many_epochs(tmp_path, data):
    f = only(findings(make(tmp_path, data, rows="train32.jsonl", max_steps=40)), "LOFT-L204", "warning")
    assert "5.0 epochs over 32 rows" in f.reason


def test_gradient_clipping_off(tmp_path, data):
    only(findings(make(tmp_path, data, max_grad_norm=0.0), data=False), "LOFT-L205", "warning")


def test_dpo_without_adapter_loads_a_second_model(tmp_path, data):
    path = make(tmp_path, data, rl="dpo", adapter=DROP, test_datasets=DROP, datasets=[
        {"path": str(data / "pairs.jsonl"), "split": "train", "type": "chatml.prompt_pairs"}])
    assert "second full copy" in only(findings(path), "LOFT-L206", "warning").reason
    with_adapter = make(tmp_path, data, rl="dpo", test_datasets=DROP, datasets=[
        {"path": str(data / "pairs.jsonl"), "split": "train", "type": "chatml.prompt_pairs"}])
    assert "LOFT-L206" not in findings(with_adapter)


def test_large_vocabulary_without_fused_cross_entropy(tmp_path, data):
    f = only(findings(make(tmp_path, data, base_model=QWEN7), data=False), "LOFT-L207", "warning")
    assert "152,064" in f.reason and "LigerPlugin" in f.fix
    assert "LOFT-L207" not in findings(make(tmp_path, data, base_model=QWEN7, **LIGER), data=False)


def test_trust_remote_code(tmp_path, data):
    only(findings(make(tmp_path, data, trust_remote_code=True), data=False), "LOFT-L208", "warning")


def test_flash_attention_missing_or_abi_broken(tmp_path, data, monkeypatch):
    path = make(tmp_path, data, flash_attention=True)
    if lints.flash_attn_problem() is None:
        pytest.skip("flash-attn imports cleanly here")
    assert "flash_attn" in only(findings(path, data=False), "LOFT-L209", "error").reason
    # an ABI break: flash_attn's CUDA extension needs a symbol the installed torch does not export
    pkg = tmp_path / "site"
    (pkg / "flash_attn").mkdir(parents=True)
    (pkg / "flash_attn" / "__init__.py").write_text("__version__ = '2.8.3'\n")
    src = tmp_path / "ext.c"
    src.write_text('#include <Python.h>\nextern void _ZN3c1010TensorImpl4sizeEv(void);\n'
                   'static struct PyModuleDef m = {PyModuleDef_HEAD_INIT, "flash_attn_2_cuda"};\n'
                   'PyMODINIT_FUNC PyInit_flash_attn_2_cuda(void) { _ZN3c1010TensorImpl4sizeEv(); '
                   'return PyModule_Create(&m); }\n')
    import sysconfig

    so = pkg / ("flash_attn_2_cuda" + sysconfig.get_config_var("EXT_SUFFIX"))
    gcc = shutil.which("gcc") or shutil.which("cc")
    if gcc and subprocess.run([gcc, "-shared", "-fPIC", f"-I{sysconfig.get_paths()['include']}", str(src), "-o",
                               str(so)], capture_output=True).returncode == 0:
        monkeypatch.setenv("PYTHONPATH", f"{pkg}{os.pathsep}{os.environ.get('PYTHONPATH', '')}")
        f = only(findings(path, data=False), "LOFT-L209", "error")
        assert "ABI-incompatible" in f.reason and "_ZN3c1010TensorImpl4sizeEv" in f.reason
        assert "sdpa" in f.fix


def test_missing_quantization_and_kernel_packages(tmp_path, data, monkeypatch):
    path = make(tmp_path, data, base_model=QWEN7, adapter="qlora", load_in_4bit=True, optimizer="paged_adamw_8bit",
                **LIGER)
    real = lints.importable
    monkeypatch.setattr(lints, "importable", lambda p: p not in ("bitsandbytes", "liger_kernel") and real(p))
    found = findings(path, data=False)
    assert {f.reason.split("`")[1] for f in found["LOFT-L210"]} == {"bitsandbytes", "liger_kernel"}
    monkeypatch.setattr(lints, "importable", real)
    assert "LOFT-L210" not in findings(path, data=False)


def test_padding_lever_without_sdpa_is_one_error_naming_the_fix(tmp_path, data):
    plugins = ["axolotl.integrations.liger.LigerPlugin", lints.PADDING_PLUGIN]
    f = only(findings(make(tmp_path, data, plugins=plugins, attn_implementation="eager"), data=False),
             "LOFT-L211", "error")
    assert "attn_implementation: eager" in f.reason and "sdpa" in f.fix
    assert "LOFT-L211" not in findings(make(tmp_path, data, plugins=plugins, attn_implementation="sdpa"), data=False)


def test_liger_rope_under_axolotl_s_lora_attention_needs_the_rope_plugin(tmp_path, data):
    # the kernels left unset, as on a GPU recipe: Axolotl turns them on by itself for LoRA
    rope = {"plugins": ["axolotl.integrations.liger.LigerPlugin"], "liger_rope": True,
            "lora_mlp_kernel": DROP, "lora_qkv_kernel": DROP, "lora_o_kernel": DROP}
    f = only(findings(make(tmp_path, data, **rope), data=False), "LOFT-L212", "warning")
    assert lints.ROPE_PLUGIN in f.fix
    plugged = dict(rope, plugins=rope["plugins"] + [lints.ROPE_PLUGIN])
    assert "LOFT-L212" not in findings(make(tmp_path, data, **plugged), data=False)
    for off in ({"lora_qkv_kernel": False}, {"lora_mlp_kernel": True}, {"liger_rope": False}):
        assert "LOFT-L212" not in findings(make(tmp_path, data, **dict(rope, **off)), data=False), off


# ---------------------------------------------------------------- M3xx memory
def test_estimator_matches_measured_peaks():
    """Every Axolotl run committed from the GPU host within ±10%, at least 8 of them from
    `loft doctor --measure`; the TRL-only runs (another runner, row lengths not recorded) within 30%."""
    rows = calibration.calibration_table()
    for row in rows:
        limit = 30 if row["caveat"] else 10
        assert abs(row["error_pct"]) <= limit, row
    assert sum(row["source"].startswith("--measure") for row in rows) >= 8


def test_long_row_plugins_change_the_estimate_where_they_act():
    """The embedding offload takes the input embedding out of training's peak (not loading's); the tiled MLP counts
    one piece's MLP tensors, only on rows longer than it leaves untiled; DeepSpeed/FSDP switch both off."""
    llama = arch.find_arch("meta-llama/Llama-3.1-8B-Instruct")
    base = {"base_model": "meta-llama/Llama-3.1-8B-Instruct", "adapter": "qlora", "load_in_4bit": True, "bf16": True,
            "lora_r": 16, "lora_target_linear": True, "gradient_checkpointing": True,
            "activation_offloading": "hidden_states", "micro_batch_size": 1, "embeddings_skip_upcast": True}

    def parts(seq, *plugins, **extra):
        est = memory.estimate(llama, memory.Setup.from_recipe({**base, "sequence_len": seq, "plugins": list(plugins),
                                                               **extra}))
        return est.parts, est.loading

    table = llama.vocab * llama.hidden * 2 / 2**30
    plain, loading = parts(8192)
    offloaded, offloaded_loading = parts(8192, memory.EMBEDDING_OFFLOAD)
    assert offloaded["weights"] == pytest.approx(plain["weights"] - table)
    assert offloaded_loading == pytest.approx(plain["weights"] + plain["workspace"]) and loading == 0
    sharded = {**base, "fsdp_version": 2, "fsdp_config": {"offload_params": False}, "plugins": [memory.EMBEDDING_OFFLOAD,
                                                                                                memory.TILED_MLP]}
    assert not memory.Setup.from_recipe(sharded, world=2).embedding_offload
    assert not memory.Setup.from_recipe(sharded, world=2).mlp_tile
    assert memory.Setup.from_recipe({**sharded, "fsdp_version": None, "fsdp_config": None}).mlp_tile
    for seq, tiled in ((memory.MLP_UNTILED_UP_TO, False), (65536, True)):
        untiled_act, tiled_act = parts(seq)[0]["activations"], parts(seq, memory.TILED_MLP)[0]["activations"]
        assert (tiled_act < untiled_act) == tiled, seq


def test_memory_md_holds_the_current_calibration():
    text = (REPO / "benchmarks" / "MEMORY.md").read_text()
    for row in calibration.calibration_table():
        assert f"| {row['run']} | {row['estimate_gib']} | {row['measured_gib']} | {row['error_pct']:+.1f}% |" in text, \
            f"benchmarks/MEMORY.md is stale: regenerate it with `python -m benchmarks.calibration` ({row['run']})"


def test_architecture_lookup_by_name():
    for name in ("Qwen/Qwen2.5-7B", "Qwen/Qwen2.5-7B-Instruct", "unsloth/Qwen2.5-7B-Instruct-bnb-4bit"):
        found = arch.find_arch(name)
        assert found and found.hidden == 3584 and found.vocab == 152064 and not found.tied
    llama = arch.find_arch("meta-llama/Meta-Llama-3.1-8B-Instruct")
    assert llama.params == pytest.approx(8.03e9, rel=0.01)
    assert arch.find_arch("Qwen/Qwen2.5-7B-Instruct").params == pytest.approx(7.62e9, rel=0.01)
    assert arch.find_arch("runs/models/smollm2-135m-instruct").params == pytest.approx(134.5e6, rel=0.01)
    assert arch.find_arch("acme/unknown-7b") is None


def test_verdicts_and_the_cheapest_change_that_fits(tmp_path, data):
    qlora = dict(base_model=QWEN7, adapter="qlora", load_in_4bit=True, bf16=True, optimizer="paged_adamw_8bit",
                 sequence_len=1024, micro_batch_size=1, gradient_accumulation_steps=8, gradient_checkpointing=True,
                 embeddings_skip_upcast=True, **LIGER)
    fits = doctor.diagnose(make(tmp_path, data, **qlora), "rtx5070-12gb", data=False)
    assert fits.memory["verdict"] == "fits" and 5.5 < fits.memory["allocated_gib"] < 7
    assert fits.memory["loading_gib"] == 0
    # without embeddings_skip_upcast the fp32 embeddings peak while loading, above training (the 8 GB recipe's
    # first GPU run died there), and keeping them in bf16 is the cheapest fix
    upcast = doctor.diagnose(make(tmp_path, data, **{**qlora, "embeddings_skip_upcast": False}), "8", data=False)
    assert upcast.memory["allocated_gib"] == upcast.memory["loading_gib"] > 8 > fits.memory["allocated_gib"]
    assert upcast.memory["cheapest_fit"]["overrides"] == {"embeddings_skip_upcast": True}
    # bf16 LoRA, micro-batch 4, no checkpointing: far too big for 12 GB; one change is not enough
    big = make(tmp_path, data, **{**qlora, "adapter": "lora", "load_in_4bit": False, "micro_batch_size": 4,
                                  "gradient_checkpointing": False})
    report = doctor.diagnose(big, "rtx5070-12gb", data=False)
    f = [f for f in report.findings if f.code == "LOFT-M301"][0]
    assert f.severity == "error" and "--set" in f.fix
    change = report.memory["cheapest_fit"]["overrides"]
    assert change["load_in_4bit"] is True  # a 15 GiB bf16 base cannot fit 12 GB whatever else changes
    cfg = {**yaml.safe_load(big.read_text()), **change}
    assert memory.estimate_recipe(cfg).verdict(memory.PROFILES["rtx5070-12gb"]) == "fits"
    # on a 32 GB card the same recipe needs one free change only
    report = doctor.diagnose(big, "rtx5090-32gb", data=False)
    assert report.memory["cheapest_fit"]["changes"] == ["enable gradient checkpointing (~20% slower)"]
    tight = doctor.diagnose(make(tmp_path, data, **qlora), "7", data=False)  # a custom size in GiB
    assert tight.memory["verdict"] == "tight" and any(f.code == "LOFT-M302" for f in tight.findings)


def test_dpo_at_2048_on_12gb_needs_loft_dpo_trainer(tmp_path, data):
    """TRL's full-vocabulary logits (policy and reference) do not fit 12 GB at 2,048 tokens; the chunked LM head of
    training/plugins/dpo.py does (measured: 7.51 GiB training peak on the H100 at an 11 GiB cap,
    benchmarks/RESULTS.md)."""
    dpo = dict(base_model=QWEN7, adapter="qlora", load_in_4bit=True, bf16=True, optimizer="paged_adamw_8bit",
               rl="dpo", sequence_len=2048, micro_batch_size=1, gradient_checkpointing=True,
               embeddings_skip_upcast=True)
    report = doctor.diagnose(make(tmp_path, data, **dpo), "rtx5070-12gb", data=False)
    assert report.memory["verdict"] == "does not fit"
    assert report.memory["cheapest_fit"]["overrides"] == {"trainer_cls": "training.plugins.dpo.LoftDPOTrainer"}
    chunked = memory.estimate_recipe({**dpo, "trainer_cls": "training.plugins.dpo.LoftDPOTrainer"})
    assert chunked.allocated < 0.6 * report.memory["allocated_gib"]


def test_unknown_profile_and_unknown_architecture(tmp_path, data):
    with pytest.raises(LoftError, match="unknown GPU profile"):
        memory.gpu_gib("rtx9999")
    f = only(findings(make(tmp_path, data, base_model="acme/unknown-7b"), data=False), "LOFT-M303", "note")
    assert "training/archs" in f.fix


# ---------------------------------------------------------------- the command
def doctor_cmd(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.doctor", *map(str, args)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)


def test_command_exit_codes_and_json(tmp_path, data):
    path = make(tmp_path, data, max_steps=10, micro_batch_size="two")
    assert doctor.main([str(path), "--no-data"]) == 2
    path = make(tmp_path, data, max_steps=10)
    assert doctor.main([str(path)]) == 0
    proc = doctor_cmd(path, "--strict", "--json", "--gpu", "rtx5070-12gb")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr
    out = json.loads(proc.stdout)
    assert out["exit_code"] == 1 and [f["code"] for f in out["findings"]] == ["LOFT-L202"]
    assert out["memory"]["verdict"] == "fits"


def test_measure_needs_a_gpu(tmp_path, data):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: --measure runs for real (see training/checks/measure.py)")
    proc = doctor_cmd(make(tmp_path, data), "--measure")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("loft doctor: error: --measure needs a CUDA GPU")


def test_measure_recipe_is_one_axolotl_accepts(tmp_path):
    """--measure itself needs a GPU; the recipe it hands Axolotl for each shipped SFT and DPO recipe passes
    Axolotl's validation (a dropped save_steps once made every real recipe fail on the GPU host)."""
    from training import recipe as recipes
    from training.checks.measure import measurement_recipe

    for name in ("qwen2.5-7b/qlora-sft-8gb.yaml", "qwen2.5-7b/dpo-qlora-12gb.yaml", "llama-3.1-8b/lora-bf16-80gb.yaml"):
        cfg = recipes.load(REPO / "recipes" / name)
        run = measurement_recipe(cfg, tmp_path / "model", tmp_path, steps=3)
        assert run["max_steps"] == 3 and "training.plugins.guard.HealthGuardPlugin" in run["plugins"]
        assert run["datasets"][0]["path"] != cfg["datasets"][0]["path"]
        path = tmp_path / "measure.yaml"
        path.write_text(yaml.safe_dump(run))
        report = doctor.diagnose(path, data=False)
        assert report.count("error") == 0, (name, [(f.code, f.reason) for f in report.findings])
