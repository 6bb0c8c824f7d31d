"""`loft merge`: the shard merge equals PEFT's, verification passes right pairings and fails wrong ones,
the QLoRA gap is measured, interruptions leave nothing behind, pre-quantized bases are refused.

No training here: adapters are built with peft.get_peft_model on tiny random Llamas (SmolLM2's tokenizer and
chat template, 2 layers, sharded bf16 safetensors like a real checkpoint) with random LoRA B, so every delta
is non-zero. One test uses the real SmolLM2-135M base to hold the bf16 bounds to a real model.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from training import merge as m
from training.merging import sources, verify, write
from training.errors import LoftError
from training.model import ensure_default_model
from training.paths import REPO

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_base(path: Path, seed: int) -> Path:
    """A 2-layer Llama with SmolLM2's vocabulary and tied embeddings, saved in 2+ bf16 shards."""
    import torch
    from transformers import AutoModelForCausalLM, LlamaConfig

    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         tie_word_embeddings=True, initializer_range=0.2,  # peaked logits, like a trained model
                         bos_token_id=1, eos_token_id=2, pad_token_id=2)
    AutoModelForCausalLM.from_config(config).to(torch.bfloat16).save_pretrained(path, max_shard_size="3MB")
    src = ensure_default_model(quiet=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(src / name, path)
    return path


def make_adapter(base: Path, out: Path, seed: int = 0, b_std: float | None = None, **lora) -> Path:
    """A LoRA adapter on `base` with random A and B (init_lora_weights=False), recorded base = `base`."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name and b_std is not None:  # the size of a trained delta rather than PEFT's test init
                torch.nn.init.normal_(param, std=b_std)
            if "modules_to_save" in name:  # as if trained: the saved copy differs from the base
                param.add_(torch.randn_like(param) * 0.05)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    root = tmp_path_factory.mktemp("bases")
    return tiny_base(root / "tiny-a", seed=0), tiny_base(root / "tiny-b", seed=1)


@pytest.fixture(scope="module")
def linear_adapter(bases, tmp_path_factory):
    """All seven projections, rsLoRA, an alpha pattern (every scaling rule PEFT has for plain LoRA), and lm_head
    trained in full (modules_to_save) on a tied model."""
    return make_adapter(bases[0], tmp_path_factory.mktemp("run-linear") / "adapter", r=8, lora_alpha=16,
                        target_modules=ALL_LINEAR, use_rslora=True, alpha_pattern={"down_proj": 4},
                        modules_to_save=["lm_head"])


def quiet_merge(*args, **kwargs):
    return m.merge(*args, progress=False, **kwargs)


def partials(parent: Path) -> list[Path]:
    return [p for p in parent.iterdir() if ".partial-" in p.name]


def test_shard_merge_equals_peft_merge(bases, linear_adapter, tmp_path):
    import torch
    from peft import PeftModel
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    out = tmp_path / "merged"
    report = quiet_merge(linear_adapter, out, dtype="fp32")
    assert report["passed"] and report["shards"] >= 2

    base_model = AutoModelForCausalLM.from_pretrained(bases[0], dtype=torch.float32)
    expected = PeftModel.from_pretrained(base_model, linear_adapter).merge_and_unload().state_dict()
    ours = {}
    for shard in out.glob("*.safetensors"):
        ours.update(load_file(shard))
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours)
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)
    base = read_weights(bases[0])
    changed = [k for k in base if not torch.equal(ours[k], base[k])]
    assert len(changed) == 2 * len(ALL_LINEAR)  # every projection in both layers, nothing else
    assert set(ours) - set(base) == {"lm_head.weight"}  # trained in full, so written untied
    assert json.loads((out / "config.json").read_text())["tie_word_embeddings"] is False

    manifest = json.loads((out / "loft-manifest.json").read_text())
    weights_file = "adapter_model.safetensors"
    assert manifest["adapter"]["sha256"][weights_file] == write.sha256(linear_adapter / weights_file)
    assert manifest["base"]["sha256"]["config.json"] == write.sha256(bases[0] / "config.json")
    assert manifest["verified"] and manifest["dtype"] == "fp32"
    assert (out / "chat_template.jinja").is_file() and (out / "merge-report.md").read_text().count("PASS") == 1
    assert not partials(tmp_path)


def test_fan_in_fan_out_conv1d_matches_peft(tmp_path):
    """GPT-2 stores Conv1D weights transposed (fan_in_fan_out): the delta must be transposed too."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, GPT2Config

    torch.manual_seed(0)
    config = GPT2Config(vocab_size=256, n_embd=32, n_layer=2, n_head=2, n_positions=64)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "gpt2-tiny")
    adapter = make_adapter(tmp_path / "gpt2-tiny", tmp_path / "run" / "adapter", r=4, lora_alpha=8,
                           target_modules=["c_attn", "c_fc"], fan_in_fan_out=True)
    quiet_merge(adapter, tmp_path / "merged", dtype="fp32", verify=False)

    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tmp_path / "gpt2-tiny"), adapter)
    expected = peft.merge_and_unload().state_dict()
    ours = read_weights(tmp_path / "merged")
    key = "transformer.h.0.attn.c_attn.weight"
    assert not torch.equal(ours[key], read_weights(tmp_path / "gpt2-tiny")[key])
    for key, tensor in ours.items():
        torch.testing.assert_close(tensor, expected[key], rtol=0, atol=1e-6, msg=key)


def read_weights(base: Path) -> dict:
    import torch
    from safetensors.torch import load_file

    tensors = {}
    for shard in base.glob("*.safetensors"):
        tensors.update({k: v.to(torch.float32) for k, v in load_file(shard).items()})
    return tensors


def test_tied_embeddings_are_untied_and_match_unmerged_peft(bases, tmp_path):
    """LoRA on lm_head and embed_tokens of a tied model: PEFT's own merge_and_unload adds both deltas into the
    one shared matrix; loft writes each side separately and verification holds it to unmerged PEFT."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    adapter = make_adapter(bases[0], tmp_path / "run" / "adapter", r=4, lora_alpha=8,
                           target_modules=["q_proj", "lm_head", "embed_tokens"])
    report = quiet_merge(adapter, tmp_path / "merged", dtype="bf16")
    assert report["passed"] and report["untied_embeddings"]
    config = json.loads((tmp_path / "merged" / "config.json").read_text())
    assert config["tie_word_embeddings"] is False and config["dtype"] == "bfloat16"

    ids = torch.tensor([[1, 520, 3000, 42, 7]])
    peft = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(bases[0], dtype=torch.float32), adapter)
    with torch.no_grad():
        unmerged = peft(ids).logits
        peft_merged = peft.merge_and_unload()(ids).logits
        ours = AutoModelForCausalLM.from_pretrained(tmp_path / "merged", dtype=torch.float32)(ids).logits
    assert (ours - unmerged).abs().max() < 0.05 * (peft_merged - unmerged).abs().max()


def test_wrong_base_fails_verification_and_the_merge_is_kept_marked(bases, linear_adapter, tmp_path):
    out = tmp_path / "merged"
    with pytest.raises(verify.MergeRejected) as err:
        quiet_merge(linear_adapter, out, base=str(bases[1]))
    assert not out.exists() and not partials(tmp_path)
    kept = tmp_path / "merged.REJECTED"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.REJECTED"]
    rejected = json.loads((kept / "merge-report.json").read_text())
    assert "FAIL" in (kept / "merge-report.md").read_text()
    assert rejected["passed"] is False and rejected["training_base"] == str(bases[0]) and rejected["out"] == str(kept)
    assert rejected["fidelity"]["kl_mean"] > 10 * rejected["thresholds"]["kl_mean"]
    assert json.loads((kept / "loft-manifest.json").read_text())["passed"] is False
    assert list(kept.glob("*.safetensors")), "the weights the user paid for are kept"
    assert "KL mean" in str(err.value) and str(kept) in str(err.value)

    # the kept merge is the real thing, loadable for a look; a rerun that fails again replaces it, never --out
    from transformers import AutoModelForCausalLM

    assert AutoModelForCausalLM.from_pretrained(kept).config.tie_word_embeddings is False
    with pytest.raises(verify.MergeRejected):
        quiet_merge(linear_adapter, out, base=str(bases[1]))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["merged.REJECTED"]


def test_qlora_gap_measures_three_candidates(linear_adapter, tmp_path):
    """fp32, so rounding cannot hide anything: the dequantised-NF4 merge must equal the training view (bitsandbytes'
    own NF4 round trip), and the full-precision merge must sit the whole NF4 noise away from it. (The unmerged
    bitsandbytes model computes in bf16 on CPUs with AVX512-BF16 whatever the compute dtype: only "closer".)"""
    run = tmp_path / "run"
    shutil.copytree(linear_adapter, run / "adapter")
    (run / "recipe.yaml").write_text("adapter: qlora\nload_in_4bit: true\n")
    report = quiet_merge(run / "adapter", tmp_path / "merged", dtype="fp32")
    gap = report["qlora_gap"]
    assert len(gap["candidates"]) == 3

    def candidate(prefix):
        return next(c for name, c in gap["candidates"].items() if name.startswith(prefix))

    full, deq, unmerged = (candidate(p) for p in ("merge into full precision", "merge into dequantised NF4",
                                                 "unmerged NF4"))
    assert deq["kl_mean"] < 1e-5  # the NF4 round trip is bitsandbytes' own, exactly
    assert full["kl_mean"] > 100 * deq["kl_mean"] and unmerged["kl_mean"] < full["kl_mean"]
    assert not gap["closest"].startswith("merge into full precision")
    assert gap["nf4_view_vs_full_precision_view"]["kl_mean"] == pytest.approx(full["kl_mean"], rel=0.5)


def test_interrupted_merge_leaves_nothing_and_rerun_succeeds(linear_adapter, tmp_path, monkeypatch):
    import safetensors.torch

    out = tmp_path / "merged"
    real_save, calls = safetensors.torch.save_file, []

    def ctrl_c_on_second_shard(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real_save(*args, **kwargs)

    monkeypatch.setattr(safetensors.torch, "save_file", ctrl_c_on_second_shard)
    with pytest.raises(KeyboardInterrupt):
        quiet_merge(linear_adapter, out, verify=False)
    monkeypatch.undo()
    assert len(calls) == 2 and not out.exists() and not partials(tmp_path)

    # SIGKILL gets no cleanup: the partial dir stays hidden, never at --out, and the next run removes it.
    child = (f"import os, signal, safetensors.torch as st\n"
             f"real = st.save_file\n"
             f"def save(*a, **k):\n    real(*a, **k)\n    os.kill(os.getpid(), signal.SIGKILL)\n"
             f"st.save_file = save\n"
             f"from training.merge import merge\nmerge({str(linear_adapter)!r}, {str(out)!r}, verify=False)\n")
    proc = subprocess.run([sys.executable, "-c", child], cwd=REPO, capture_output=True, text=True, check=False)
    assert proc.returncode == -signal.SIGKILL
    assert not out.exists() and len(partials(tmp_path)) == 1
    report = quiet_merge(linear_adapter, out, verify=False)
    assert report["verified"] is False and (out / "config.json").is_file()
    assert not partials(tmp_path)


def test_existing_output_needs_force(linear_adapter, tmp_path):
    out = tmp_path / "merged"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    with pytest.raises(LoftError, match="--force"):
        quiet_merge(linear_adapter, out, verify=False)
    assert (out / "keep.txt").read_text() == "mine"
    quiet_merge(linear_adapter, out, verify=False, force=True)
    assert not (out / "keep.txt").exists() and (out / "config.json").is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["merged"]  # no .old-/.partial- dirs left beside it


def test_prequantized_base_is_refused_in_one_line(bases, linear_adapter, tmp_path):
    quantized = tmp_path / "llama-tiny-bnb-4bit"
    shutil.copytree(bases[0], quantized)
    config = json.loads((quantized / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_4bit": True}
    (quantized / "config.json").write_text(json.dumps(config))
    adapter = tmp_path / "adapter"
    shutil.copytree(linear_adapter, adapter)
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(quantized)
    (adapter / "adapter_config.json").write_text(json.dumps(cfg))

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run([sys.executable, "-m", "training.cli", "merge", "--adapter", str(adapter),
                           "--out", str(tmp_path / "out")], cwd=REPO, capture_output=True, text=True, env=env,
                          check=False)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in proc.stderr
    assert "pre-quantized" in lines[0] and str(tmp_path / "llama-tiny") in lines[0] and "--base" in lines[0]
    assert not (tmp_path / "out").exists()

    # The fix the message names: --base the full-precision original. The pairing is then a QLoRA one.
    report = quiet_merge(adapter, tmp_path / "out", base=str(bases[0]), dtype="fp32")
    assert report["passed"] and "pre-quantized" in report["pairing_note"] and "qlora_gap" in report

    with pytest.raises(LoftError, match=r"probably unsloth/llama-3-8b \(a guess"):
        sources.resolve_base("unsloth/llama-3-8b-bnb-4bit")
    with pytest.raises(LoftError, match="probably TheBloke/Llama-2-7B "):
        sources.resolve_base("TheBloke/Llama-2-7B-GPTQ")


def test_bf16_bounds_sit_on_the_rounding_floor(tmp_path):
    """A zero adapter (B = 0: the merge is the base, rounded) and a correct rank-4 adapter in bf16 both pass, and
    both sit near the floor: the base alone in bf16 against fp32. The bounds are that floor plus an allowance, so
    bf16 rounding of the base is never blamed on the merge; a wrong merge still lands far above them."""
    base = ensure_default_model(quiet=True)
    results = {}
    for name, b_std in (("zero", 0.0), ("rank-4", 0.01)):
        adapter = make_adapter(base, tmp_path / name / "adapter", b_std=b_std, r=4, lora_alpha=8,
                               target_modules=ALL_LINEAR)
        results[name] = quiet_merge(adapter, tmp_path / f"merged-{name}", dtype="bf16")
        assert results[name]["passed"], results[name]["failures"]
    zero, rank4 = results["zero"], results["rank-4"]
    floor = zero["floor"]
    assert floor["kl_mean"] > 0 and floor["ppl_rel"] >= 0, "bf16 costs something even with nothing merged"
    assert rank4["floor"] == pytest.approx(floor), "the floor is the base's, whatever the adapter"
    assert zero["fidelity"]["kl_mean"] == pytest.approx(floor["kl_mean"], rel=1e-4), "a merge that changes nothing"
    for r in (zero, rank4):
        assert r["thresholds"]["kl_mean"] == pytest.approx(floor["kl_mean"] + verify.THRESHOLDS["bf16"]["kl_mean"])
        assert r["thresholds"]["ppl_rel"] == pytest.approx(floor["ppl_rel"] + verify.THRESHOLDS["bf16"]["ppl_rel"])
        assert r["fidelity"]["kl_mean"] < 3 * floor["kl_mean"] + 1e-4, "a correct merge is rounding, not error"
    assert rank4["eval_source"] == "built-in" and rank4["rows"] == len(verify.BUILTIN_CHATS)
    assert "rounding floor" in (tmp_path / "merged-rank-4" / "merge-report.md").read_text()
