"""Every recipe under recipes/: Axolotl's own validation, a complete header, and real training steps on CPU.

  * validate (every file): axolotl.cli.config.load_cfg, the loader `axolotl train` runs first —
    validate_config against the capabilities of an Ampere GPU (the recipes' oldest target), then
    normalize_config and normalize_cfg_datasets. Two values change, both said here: base_model becomes a tiny
    local model of the same architecture (normalize_config reads the model's config.json and CI has no hub),
    output_dir a temp dir. A key Axolotl would silently drop fails the test.
  * header (every file): the parts a reader needs first, the measured-or-TODO line, TensorBoard on with the
    wandb switch shown, no empty keys, no pre-quantized base, and every coverage sum agrees with the keys.
  * train (one run per family × method): 2 optimizer steps of real Axolotl training on CPU, on a tiny random
    model of the recipe's architecture with the embedded SmolLM2 tokenizer, through training.recipe
    (overrides, resolved YAML) and Axolotl's train command, all runs in one process so that Axolotl's imports
    are paid once (tests/axolotl_runs.py; `loft train`'s launcher is run by the tests it names). Besides size
    (sequence_len 128, max_steps 2, micro-batch 2 × accum 1, a 16-row chat fixture, no eval set, no worker
    processes), only what a CPU cannot run is swapped: the Liger plugin and Axolotl's fused LoRA kernels
    (Triton GPU kernels), bf16/tf32 (fp32 on CPU). bitsandbytes 0.50 runs on CPU, so QLoRA trains as nf4 +
    double-quant QLoRA and the 8-bit recipe on LLM.int8, with paged_adamw_8bit as written (bitsandbytes falls
    back to unpaged 8-bit states on CPU); one exception, the precomputed-reference DPO run, is explained in
    cpu_overrides. Gradient checkpointing, LoRA shape, rsLoRA, modules_to_save, packing, DPO and its
    reference handling stay as written.
    Recipes whose 2-step run would be identical after those swaps share one run (SAME_RUN); the test checks
    that they differ only in schedule keys.
"""

import json
import math
import os
import re
from pathlib import Path

import pytest

import axolotl_runs
from training import recipe as recipes
from training.model import ensure_default_model
from training.paths import REPO, apply_private_env

apply_private_env()  # offline, no telemetry: set before anything imports axolotl or launches it

RECIPES_DIR = REPO / "recipes"
RECIPES = sorted(RECIPES_DIR.glob("**/*.yaml"))
IDS = [str(p.relative_to(RECIPES_DIR)) for p in RECIPES]
CHAT_FIXTURE = Path(__file__).parent / "fixtures" / "chat-16.jsonl"

# Hub ids the recipes train -> the architecture of the tiny stand-in (add a line with a new family).
ARCH = {"Qwen/Qwen2.5-7B-Instruct": "qwen2", "Qwen/Qwen2.5-32B-Instruct": "qwen2",
        "meta-llama/Llama-3.1-8B-Instruct": "llama"}

# The capabilities load_cfg would probe on the target card (this machine has none): bf16-capable Ampere.
TARGET_GPU = {"bf16": True, "fp8": False, "tf32": True, "n_gpu": 1, "compute_capability": "sm_80"}

# One training run per family × method; the value says what the run covers beyond SFT LoRA basics.
TRAINED = {
    "qwen2.5-7b/qlora-sft-8gb.yaml": "Qwen2 QLoRA SFT, chatml, seven projections, paged 8-bit AdamW",
    "qwen2.5-7b/qlora-sft-12gb.yaml": "Qwen2 QLoRA SFT with sample packing",
    "qwen2.5-7b/dpo-qlora-12gb.yaml": "Qwen2 DPO, adapter-disabled reference, rewards logged",
    "qwen2.5-7b/dpo-qlora-precompute-12gb.yaml": "DPO, reference log-probs precomputed (run as LoRA)",
    "llama-3.1-8b/qlora-style-32gb.yaml": "Llama SFT, r64, embed_tokens + lm_head saved in full",
    "llama-3.1-8b/lora-bf16-80gb.yaml": "Llama bf16 LoRA (run in fp32) with sample packing on SDPA",
    "llama-3.1-8b/lora-8bit-rslora-24gb.yaml": "LoRA on an LLM.int8 base, rsLoRA, six projections",
    "llama-3.1-8b/qlora-conservative-24gb.yaml": "Llama QLoRA SFT, seven projections, warmup_steps",
    "llama-3.1-8b/qlora-long-12gb.yaml": "Llama QLoRA SFT, packing, activation_offloading: hidden_states",
}
# Recipes whose CPU run would repeat a trained one: same family, method and adapter, other schedule.
SAME_RUN = {
    "qwen2.5-7b/qlora-sft-80gb.yaml": "qwen2.5-7b/qlora-sft-8gb.yaml",
    "llama-3.1-8b/qlora-aggressive-24gb.yaml": "llama-3.1-8b/qlora-conservative-24gb.yaml",
}
# Keys that only shape the schedule: they cannot change whether 2 CPU steps of a recipe work.
SCHEDULE_KEYS = {
    "learning_rate", "lr_scheduler", "warmup_steps", "warmup_ratio", "weight_decay", "max_grad_norm",
    "num_epochs", "eval_steps", "save_steps", "save_total_limit", "logging_steps", "seed",
}
# Trained elsewhere, end to end.
EXEMPT = {"smollm2-135m/lora-cpu.yaml": "the demo recipe: `loft demo` and its tests train it in full"}
# Multi-GPU recipes: validated and header-checked here like every recipe. Their launch path (`loft train --gpus 2`,
# accelerate + torchrun, 2 ranks on gloo) trains for real in tests/test_multigpu.py; FSDP2 and ZeRO need CUDA in
# Axolotl 0.19 (it builds FSDP2's device mesh on "cuda"), so those runs are benchmarks/gpu/multigpu.sh's, on 2 GPUs.
MULTI_GPU = {
    "llama-3.1-8b/lora-bf16-ddp-80gb.yaml": "DDP: as lora-bf16-80gb.yaml per rank; 2 CPU ranks in test_multigpu.py",
    "llama-3.1-8b/full-fsdp2-80gb.yaml": "FSDP2 full fine-tune: GPU only",
    "qwen2.5-32b/qlora-fsdp2-24gb.yaml": "FSDP2 QLoRA: GPU only",
    "qwen2.5-32b/qlora-fsdp1-24gb.yaml": "FSDP1 QLoRA with sharded 4-bit loading: GPU only",
}

HEADER_PARTS = ("For:", "GPU:", "Run:", "Data:", "Levers:", "Coverage:")
MEASURED = re.compile(r"measured \d{4}-\d{2}-\d{2}")  # "(measured 2026-11-30, torch …, axolotl …)"
TODO_MEASURE = "TODO(gpu-measure)"


# ---------------------------------------------------------------- helpers
def rel(path: Path) -> str:
    return str(path.relative_to(RECIPES_DIR))


def header(path: Path) -> str:
    """The comment block the file opens with."""
    lines = []
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.startswith("#"):
            break
        lines.append(line)
    return "\n".join(lines)


def number(text: str) -> float:
    return float(text.replace(",", ""))


def coverage_checks(head: str, cfg: dict) -> int:
    """Recompute every coverage sum the header states from the recipe's keys; return how many were checked."""
    flat = re.sub(r"\n#\s+", " ", head)  # statements wrap across comment lines
    mbs, gas = cfg["micro_batch_size"], cfg["gradient_accumulation_steps"]
    epochs = cfg.get("num_epochs")
    checked = 0
    # "3 epochs × 2,000 rows ÷ (1 micro × 8 accum) = 750 optimizer steps"
    for e, rows, m, a, steps in re.findall(
        r"([\d.]+) epochs? × ([\d,]+) rows ÷ \((\d+) micro × (\d+) accum\) = ([\d,]+) optimizer steps", flat
    ):
        assert (number(e), int(m), int(a)) == (epochs, mbs, gas), f"coverage line disagrees with keys: {e}, {m}, {a}"
        assert number(steps) == math.ceil(number(e) * number(rows) / (int(m) * int(a))), f"{steps} steps is wrong"
        checked += 1
    # "effective batch = 2 micro × 16 accum = 32 rows" ... "⌈1.4 × 100,000 ÷ 32⌉ = 4,375 steps"
    for m, a, eff in re.findall(r"effective batch = (\d+) micro × (\d+) accum = (\d+) rows", flat):
        assert (int(m), int(a), int(eff)) == (mbs, gas, mbs * gas), f"effective batch {m} × {a} = {eff} is wrong"
        checked += 1
    for e, rows, eff, steps in re.findall(r"⌈([\d.]+) × ([\d,]+) ÷ (\d+)⌉ = ([\d,]+) steps", flat):
        assert (number(e), int(eff)) == (epochs, mbs * gas), f"⌈{e} × … ÷ {eff}⌉ disagrees with the keys"
        assert number(steps) == math.ceil(number(e) * number(rows) / int(eff)), f"{steps} steps is wrong"
        checked += 1
    for steps, eff, rows, seen in re.findall(r"check: ([\d,]+) × (\d+) ÷ ([\d,]+) = ([\d.]+) epochs", flat):
        assert abs(number(steps) * int(eff) / number(rows) - float(seen)) < 0.005, f"check sum {seen} is wrong"
        checked += 1
    # "40 steps × (2 micro × 2 accum) = 160 rows of 2,000 = 0.08 epoch"
    for s, m, a, rows, total, seen in re.findall(
        r"(\d+) steps × \((\d+) micro × (\d+) accum\) = ([\d,]+) rows of ([\d,]+) = ([\d.]+) epoch", flat
    ):
        assert (int(s), int(m), int(a)) == (cfg.get("max_steps"), mbs, gas), "coverage line disagrees with keys"
        assert number(rows) == int(s) * int(m) * int(a) and abs(number(rows) / number(total) - float(seen)) < 0.005
        checked += 1
    # "4 × 4,096 tokens × 2 accum = 32,768 tokens"
    for m, seq, a, tokens in re.findall(r"(\d+) × ([\d,]+) tokens × (\d+) accum = ([\d,]+) tokens", flat):
        assert (int(m), number(seq), int(a)) == (mbs, cfg["sequence_len"], gas), "token sum disagrees with keys"
        assert number(tokens) == int(m) * number(seq) * int(a), f"{tokens} tokens is wrong"
        checked += 1
    # DPO: "1 epoch × N pairs ÷ (1 micro × 8 accum)" ... "(20-pair sample: 3 steps; 5,000 pairs: 625 steps)"
    for e, m, a in re.findall(r"(\d+) epochs? × N pairs ÷ \((\d+) micro × (\d+) accum\)", flat):
        assert (int(e), int(m), int(a)) == (epochs, mbs, gas), "DPO coverage line disagrees with keys"
        checked += 1
        for pairs, steps in re.findall(r"([\d,]+)[- ]pairs?(?: sample)?: ([\d,]+) steps", flat):
            assert number(steps) == math.ceil(epochs * number(pairs) / (mbs * gas)), f"{pairs} pairs: {steps} steps?"
            checked += 1
    return checked


def empty_keys(node, prefix="") -> list[str]:
    found = []
    if isinstance(node, dict):
        for key, value in node.items():
            found += [f"{prefix}{key}"] if value is None else empty_keys(value, f"{prefix}{key}.")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            found += empty_keys(value, f"{prefix}{i}.")
    return found


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    """Random-initialised Qwen2 and Llama models (hidden 64, 2 layers, 4 heads, 2 KV heads) + SmolLM2 tokenizer.

    SmolLM2's tokenizer already has ChatML's <|im_start|>/<|im_end|>; the Llama one gets Llama 3's special
    tokens and Axolotl's llama3 template as its own, standing in for Meta's (recipes use tokenizer_default).
    """
    import torch
    from axolotl.utils.chat_templates import get_chat_template
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, Qwen2Config

    source = ensure_default_model(quiet=True)
    out = {}
    for arch, config_cls in (("qwen2", Qwen2Config), ("llama", LlamaConfig)):
        tok = AutoTokenizer.from_pretrained(source)
        if arch == "llama":
            specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>",
                        "<|eot_id|>", "<|finetune_right_pad_id|>"]
            tok.add_special_tokens({"additional_special_tokens": specials})
            tok.bos_token, tok.eos_token, tok.pad_token = "<|begin_of_text|>", "<|eot_id|>", None
            tok.chat_template = get_chat_template("llama3")
        config = config_cls(
            vocab_size=len(tok), hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            intermediate_size=128, max_position_embeddings=512, tie_word_embeddings=False,  # 7-8B: untied
            bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        )
        torch.manual_seed(0)
        path = tmp_path_factory.mktemp(f"tiny-{arch}")
        AutoModelForCausalLM.from_config(config).save_pretrained(path)
        tok.save_pretrained(path)
        out[arch] = path
    return out


LOFT_DPO = "loft-dpo-trainer"  # the 12 GB DPO recipe once more, with trainer_cls set to Loft's DPO trainer
LOFT_PADDING = "loft-padding"  # a packing recipe with the continued-padding plugin, through Axolotl's own trainer


@pytest.fixture(scope="session")
def trained(tiny_models, tmp_path_factory) -> dict[str, tuple[dict, Path]]:
    """Every TRAINED recipe and the LoftDPOTrainer run, 2 steps each, in one Axolotl process: name -> (config,
    run folder with adapter/ and train.log)."""
    root = tmp_path_factory.mktemp("trained")
    jobs = {name: (RECIPES_DIR / name, []) for name in sorted(TRAINED)}
    jobs[LOFT_DPO] = (RECIPES_DIR / "qwen2.5-7b/dpo-qlora-12gb.yaml",
                      ["trainer_cls=training.plugins.dpo.LoftDPOTrainer"])
    # the recipe's own plugins, Liger aside (GPU only)
    jobs[LOFT_PADDING] = (RECIPES_DIR / "llama-3.1-8b/lora-bf16-80gb.yaml",
                          ["plugins=[training.plugins.padding.ContinuedPaddingPlugin,"
                           " training.plugins.lean.LeanStepPlugin, training.plugins.rope.FusedRopePlugin]"])
    out, runs = {}, []
    for i, (name, (path, extra)) in enumerate(jobs.items()):
        run_dir = root / f"run{i}"
        cfg = recipes.apply_overrides(cpu_config(path, tiny_models, run_dir), extra)
        runs.append((recipes.write(cfg, run_dir, path), run_dir / "train.log"))
        out[name] = (cfg, run_dir)
    (root / "runner.log").write_text(axolotl_runs.train_all(runs, root))
    return out


@pytest.fixture
def restore_environ():
    """load_cfg exports optimizer/wandb variables into os.environ; keep them out of later tests."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def stand_in(cfg: dict, tiny: dict[str, Path]) -> list[str]:
    """The base_model override: the tiny model of the recipe's architecture (local paths are kept)."""
    base = cfg["base_model"]
    if base in ARCH:
        return [f"base_model={tiny[ARCH[base]]}"]
    assert (REPO / base).exists(), f"base_model {base} is neither a known hub id ({sorted(ARCH)}) nor a local path"
    return []


def cpu_overrides(cfg: dict, tiny: dict[str, Path], run_dir: Path) -> list[str]:
    """`--set` overrides that turn a GPU recipe into a 2-step CPU run (see the module docstring)."""
    values = {
        "sequence_len": 128, "max_steps": 2, "micro_batch_size": 2, "gradient_accumulation_steps": 1,
        "logging_steps": 1, "bf16": False, "fp16": False, "tf32": False,
        "dataset_num_proc": 1, "dataloader_num_workers": 0,  # no worker processes: they cost more than 16 rows
        "lora_mlp_kernel": False, "lora_qkv_kernel": False, "lora_o_kernel": False,
        "output_dir": str(run_dir / "adapter"), "dataset_prepared_path": str(run_dir / "prepared"),
    }
    if not cfg.get("rl"):  # SFT: the 16-row chat fixture; DPO keeps the recipe's own 20-pair sample
        values["datasets"] = [{**d, "path": str(CHAT_FIXTURE)} for d in cfg["datasets"]]
    if cfg.get("test_datasets"):  # evaluation is the demo's to test; here it would only double the time
        values["test_datasets"] = None
    if cfg.get("plugins"):  # Liger: Triton kernels, GPU only
        values["plugins"] = None
    if cfg.get("rl") and cfg.get("activation_offloading"):
        # with rl, Axolotl hands the setting to TRL, whose offloader asks torch.accelerator for the device: None
        # on a machine without one. A GPU memory lever; the CPU run checks the rest of the recipe.
        values["activation_offloading"] = None
    if cfg.get("load_in_4bit") and cfg.get("precompute_ref_log_probs"):
        # bitsandbytes 0.50 on an AVX512-BF16 CPU: the eval-mode reference pass makes Linear4bit.forward repack
        # the weights for CPU inference (packing_format_for_cpu), and the next training forward fails in
        # matmul_4bit's in-place `result += bias` (Qwen2's q/k/v have biases). A CPU-only quirk: run it as LoRA.
        values.update(load_in_4bit=False, adapter="lora")
    return stand_in(cfg, tiny) + [f"{key}={json.dumps(value)}" for key, value in values.items()]


def cpu_config(path: Path, tiny: dict[str, Path], run_dir: Path) -> dict:
    cfg = recipes.load(path)
    return recipes.apply_overrides(cfg, cpu_overrides(cfg, tiny, run_dir))


def scalars(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """TensorBoard scalars the run logged (the recipes' default logger)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    found = {}
    for events in (run_dir / "adapter").rglob("events.out.tfevents.*"):
        acc = EventAccumulator(str(events))
        acc.Reload()
        for tag in acc.Tags()["scalars"]:
            found.setdefault(tag, []).extend((e.step, e.value) for e in acc.Scalars(tag))
    return found


# ---------------------------------------------------------------- (a) Axolotl's validation, every file
@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_axolotl_validates(path, tiny_models, tmp_path, monkeypatch, restore_environ):
    import torch
    from axolotl.cli import config as axolotl_config
    from axolotl.integrations.base import PluginManager

    monkeypatch.chdir(REPO)  # recipes name repo-relative paths
    monkeypatch.setattr(PluginManager, "_instance", None)  # plugins registered here (Liger) leave with the test
    env = {"torch_version": torch.__version__.split("+")[0]}
    monkeypatch.setattr(axolotl_config, "gpu_capabilities", lambda: (TARGET_GPU, env))
    raw = recipes.load(path)
    cfg = recipes.apply_overrides(dict(raw), stand_in(raw, tiny_models) + [f"output_dir={tmp_path / 'out'}"])
    resolved = recipes.write(cfg, tmp_path, path)

    validated = axolotl_config.load_cfg(str(resolved))

    dropped = sorted(key for key in raw if key not in validated)
    assert not dropped, f"{rel(path)}: Axolotl dropped {dropped} (unknown keys, or a plugin not listed)"
    expected = ARCH.get(raw["base_model"], "llama")
    assert validated.model_config_type == expected
    for key in ("adapter", "rl", "load_in_4bit", "load_in_8bit", "sample_packing", "peft_use_rslora"):
        if raw.get(key) is not None:
            assert str(validated[key]) == str(raw[key]) or validated[key] == raw[key], f"{key} changed in validation"


# ---------------------------------------------------------------- (b) headers, every file
@pytest.mark.parametrize("path", RECIPES, ids=IDS)
def test_header(path):
    head = header(path)
    cfg = recipes.load(path)
    name = rel(path)
    assert re.fullmatch(r"[a-z0-9.\-]+/[a-z0-9.\-]+\.yaml", name), f"{name}: use recipes/<model>/<method>-<target>.yaml"
    assert head.splitlines()[0].startswith("# ") and len(head.splitlines()[0]) > 20, f"{name}: open with a title line"
    for part in HEADER_PARTS:
        assert re.search(rf"^# {re.escape(part)}", head, re.M), f"{name}: header lacks `# {part}`"
    assert MEASURED.search(head) or ("not yet measured on GPU" in head and TODO_MEASURE in head), (
        f"{name}: give measured peak memory and tokens/s with a date, or 'not yet measured on GPU' + {TODO_MEASURE}"
    )
    run = head[head.index("# Run:"):].split("\n# Data:")[0]
    assert f"recipes/{name}" in run, f"{name}: the Run line must show the command for this file"
    assert cfg.get("use_tensorboard") is True, f"{name}: log to TensorBoard by default"
    assert "wandb" in path.read_text(encoding="utf-8"), f"{name}: show how to switch on wandb in a comment"
    assert not empty_keys(cfg), f"{name}: empty keys {empty_keys(cfg)}"
    assert not re.search(r"bnb-4bit|-4bit|gptq|awq", str(cfg["base_model"]), re.I), (
        f"{name}: never base a recipe on a pre-quantized checkpoint (recipes/README.md says why)"
    )
    assert coverage_checks(head, cfg) >= 1, f"{name}: the Coverage line has no sum the test can check"


def test_readme_indexes_every_recipe():
    readme = (RECIPES_DIR / "README.md").read_text(encoding="utf-8")
    for name in IDS:
        assert f"]({name})" in readme, f"recipes/README.md's index does not link {name}"
        assert re.search(rf"loft (--online )?train recipes/{re.escape(name)}", readme), f"README lacks the command for {name}"
    linked = set(re.findall(r"\(([a-z0-9.\-]+/[a-z0-9.\-]+\.yaml)\)", readme))
    assert linked <= set(IDS), f"recipes/README.md links missing recipes: {sorted(linked - set(IDS))}"


def test_readme_commands_parse():
    """Every `loft train` line in the README parses with loft's own CLI, names a recipe, and its --set keys exist."""
    from training.cli import build_parser

    readme = (RECIPES_DIR / "README.md").read_text(encoding="utf-8")
    commands = [line.split("#")[0].split() for line in readme.splitlines() if re.match(r"loft (--online )?train ", line)]
    assert len(commands) >= len(IDS)
    for argv in commands:
        args = build_parser().parse_args(argv[1:])
        assert (REPO / args.recipe).is_file(), f"README names a missing recipe: {args.recipe}"
        recipes.apply_overrides(recipes.load(REPO / args.recipe), args.overrides)  # raises on an unknown key


def test_dpo_sample_format():
    """The DPO sample the recipes name: one {system?, prompt, chosen, rejected} object per line."""
    for path in RECIPES:
        cfg = recipes.load(path)
        if cfg.get("rl") != "dpo":
            continue
        for ds in cfg["datasets"]:
            rows = [json.loads(l) for l in (REPO / ds["path"]).read_text(encoding="utf-8").splitlines()]
            assert len(rows) == 20, f"{ds['path']}: the header promises 20 pairs"
            for row in rows:
                assert {"prompt", "chosen", "rejected"} <= set(row) <= {"system", "prompt", "chosen", "rejected"}
                assert row["chosen"] != row["rejected"]


# ---------------------------------------------------------------- (c) 2 real training steps per family × method
def test_every_recipe_is_trained_or_grouped():
    assert set(TRAINED) | set(SAME_RUN) | set(EXEMPT) | set(MULTI_GPU) == set(IDS), \
        "add new recipes to TRAINED, SAME_RUN or MULTI_GPU"
    assert set(SAME_RUN.values()) <= set(TRAINED)


@pytest.mark.parametrize("name", sorted(SAME_RUN))
def test_same_run_differs_only_in_schedule(name, tiny_models, tmp_path):
    ours = cpu_config(RECIPES_DIR / name, tiny_models, tmp_path)
    theirs = cpu_config(RECIPES_DIR / SAME_RUN[name], tiny_models, tmp_path)
    differ = {k for k in set(ours) | set(theirs) if ours.get(k) != theirs.get(k)}
    assert differ <= SCHEDULE_KEYS, f"{name} needs its own CPU run: it differs from {SAME_RUN[name]} in {differ - SCHEDULE_KEYS}"


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(TRAINED), ids=sorted(TRAINED))
def test_two_steps_on_cpu(name, trained):
    cfg, run_dir = trained[name]
    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").exists(), f"no adapter written; see {run_dir / 'train.log'}"
    written = json.loads((adapter / "adapter_config.json").read_text())
    assert (written["r"], written["lora_alpha"]) == (cfg["lora_r"], cfg["lora_alpha"])
    assert set(written["target_modules"]) == set(cfg["lora_target_modules"])
    assert bool(written.get("use_rslora")) == bool(cfg.get("peft_use_rslora"))
    if cfg.get("lora_modules_to_save"):
        from safetensors import safe_open

        assert set(cfg["lora_modules_to_save"]) <= set(written["modules_to_save"] or [])
        with safe_open(adapter / "adapter_model.safetensors", "pt") as f:
            full = [k for k in f.keys() if "embed_tokens" in k or "lm_head" in k]
        assert len(full) >= 2, "embed_tokens and lm_head were not saved in full"

    log = (run_dir / "train.log").read_text(encoding="utf-8", errors="replace")
    quantized = bool(cfg.get("load_in_4bit") or cfg.get("load_in_8bit"))
    # Axolotl logs this line when it prepares a k-bit base (embeddings_skip_upcast patches name the function too)
    assert ("w/ prepare_model_for_kbit_training" in log) == quantized, "the 4-/8-bit base was not (or wrongly) loaded"

    logged = scalars(run_dir)
    losses = logged.get("train/loss", [])
    assert [step for step, _ in losses][-1:] == [2] and all(math.isfinite(v) for _, v in losses), logged.keys()
    if cfg.get("rl") == "dpo":
        for tag in ("train/rewards/chosen", "train/rewards/rejected", "train/rewards/margins"):
            assert logged.get(tag), f"DPO did not log {tag}; logged {sorted(logged)}"
        # Step 1 runs before any update: the policy is the base plus a zero LoRA update, so it must equal the
        # reference (the adapter-disabled base, per step or precomputed) and every reward is 0.
        first = {tag: dict(logged[tag])[1] for tag in ("train/rewards/chosen", "train/rewards/rejected")}
        assert all(abs(v) < 1e-3 for v in first.values()), f"policy ≠ reference before training: {first}"
        precomputed = "Computing reference log probs for train dataset" in log  # TRL's progress bar
        assert precomputed == bool(cfg.get("precompute_ref_log_probs")), "precompute_ref_log_probs not honoured"
        if cfg.get("trainer_cls") == "training.plugins.dpo.LoftDPOTrainer":
            # Axolotl's fused LoRA kernels, applied by the trainer once TRL has wrapped the model: on CPU the QKV and O
            # kernels on a plain base, none on nf4 (training/plugins/dpo_kernels.py), and before the reference pass
            kernels = "loft: LoftDPOTrainer, " + ("no fused LoRA kernels: 4bit" if quantized
                                                  else "Axolotl fused LoRA kernels: QKV on 2/2 layers, O on 2/2 layers")
            assert kernels in log, "the trainer's LoRA kernel line is missing"
            if precomputed:
                assert log.index(kernels) < log.index("Computing reference log probs for train dataset")


@pytest.mark.slow
def test_continued_padding_plugin_runs_inside_axolotl(trained):
    """`plugins: [training.plugins.padding.ContinuedPaddingPlugin]` on a packing recipe: Axolotl loads it, its
    collator is wrapped, rows ending in padding get continued positions, and the run trains and saves as before."""
    _, run_dir = trained[LOFT_PADDING]
    logged = scalars(run_dir)
    assert [step for step, _ in logged.get("train/loss", [])][-1:] == [2], f"see {run_dir / 'train.log'}"
    assert (run_dir / "adapter" / "adapter_model.safetensors").exists()
    log = (run_dir / "train.log").read_text(errors="replace")
    found = re.search(r"loft padding: first batch, (\d+) of (\d+) rows end in a segment with nothing to learn", log)
    assert found and 0 < int(found[1]) <= int(found[2]), "the plugin's collator did not run"
    # the lean step's routing cache, installed inside Axolotl's process (training/plugins/lean.py)
    assert "loft lean step: documents per row read once per batch" in log


# ---------------------------------------------------------------- (d) Loft's DPO trainer (trainer_cls)
def test_loft_dpo_trainer_skips_axolotl_per_step_cleanup(monkeypatch):
    """AxolotlDPOTrainer runs gc.collect() + empty_cache() after every micro-batch; LoftDPOTrainer goes straight
    to the next class's step. If Axolotl drops that cleanup upstream, the second assert says so."""
    from axolotl.core.trainers.dpo import trainer as axolotl_dpo

    from training.plugins.dpo import LoftDPOTrainer

    calls = []
    monkeypatch.setattr(axolotl_dpo.gc, "collect", lambda *a: calls.append("gc.collect"))
    monkeypatch.setattr(axolotl_dpo.torch.cuda, "empty_cache", lambda: calls.append("empty_cache"))
    mro = LoftDPOTrainer.__mro__
    after = mro[mro.index(axolotl_dpo.AxolotlDPOTrainer) + 1]
    monkeypatch.setattr(after, "training_step", lambda self, model, inputs, n=None: "loss", raising=False)
    trainer = object.__new__(LoftDPOTrainer)
    assert trainer.training_step(None, {}) == "loss" and calls == []
    assert axolotl_dpo.AxolotlDPOTrainer.training_step(trainer, None, {}) == "loss"
    assert calls == ["gc.collect", "empty_cache"]


def test_loft_dpo_trainer_steps_inside_the_activation_offloading_context(monkeypatch):
    """`activation_offloading` reaches DPO: LoftDPOTrainer carries Axolotl's ActivationOffloadingMixin (whose
    __init__ builds the context from the recipe's key) and runs each step inside it."""
    from contextlib import contextmanager

    from axolotl.core.trainers.dpo import trainer as axolotl_dpo
    from axolotl.core.trainers.mixins.activation_checkpointing import ActivationOffloadingMixin

    from training.plugins.dpo import LoftDPOTrainer

    assert issubclass(LoftDPOTrainer, ActivationOffloadingMixin)
    state = {"inside": False}

    @contextmanager
    def offloading():
        state["inside"] = True
        yield
        state["inside"] = False

    mro = LoftDPOTrainer.__mro__
    after = mro[mro.index(axolotl_dpo.AxolotlDPOTrainer) + 1]
    monkeypatch.setattr(after, "training_step", lambda self, model, inputs, n=None: state["inside"], raising=False)
    trainer = object.__new__(LoftDPOTrainer)
    trainer.activation_offload_context = offloading()
    assert trainer.training_step(None, {}) is True and state["inside"] is False


@pytest.mark.slow
def test_loft_dpo_trainer_trains_the_dpo_recipe(trained):
    """`trainer_cls: training.plugins.dpo.LoftDPOTrainer` on the 12 GB DPO recipe: 2 real steps on CPU through Axolotl,
    rewards logged, the chunked log-probs in use (tests/test_dpo.py checks them against TRL's)."""
    _, run_dir = trained[LOFT_DPO]
    logged = scalars(run_dir)
    assert [step for step, _ in logged.get("train/loss", [])][-1:] == [2], f"see {run_dir / 'train.log'}"
    assert logged.get("train/rewards/margins")
    log = (run_dir / "train.log").read_text(errors="replace")
    assert "loft: LoftDPOTrainer" in log, "trainer_cls not used"
    assert "LM head in chunks of" in log, "the chunked log-probs (training/plugins/dpo.py) fell back to TRL's"
