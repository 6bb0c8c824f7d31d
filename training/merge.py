"""`loft merge`: fold a LoRA adapter into its full-precision base, shard by shard, then prove the result.

Why not `PeftModel.merge_and_unload()`: it holds the whole model in memory, and on a model with tied embeddings
(SmolLM2, Llama-3.2, Gemma) an adapter on lm_head is added into the matrix the input embeddings share, so the
merge silently changes the embeddings too (tests/test_merge.py shows it). Here each safetensors shard of the base
is read alone, scaling × B @ A is added in fp32 to the weights in it (PEFT's formula and PEFT's config), and the
shard is written in --dtype: peak RAM ≈ one shard + the adapter. Tied embeddings that the adapter touches are
written untied, so lm_head and embed_tokens each get exactly what PEFT's unmerged model computes.

Verification (default on): the merged directory, loaded as written, against the adapter on its training base in
PEFT, unmerged, fp32, on held-out rows (the recipe's test_datasets, else 8 built-in chats): per-token KL, top-1
agreement, perplexity on the assistant text. The bounds are the dtype's rounding floor (the base alone, rounded
and computed in the chosen dtype, against the base in fp32, on the same rows) plus an allowance for the merge:
bf16 rounding alone costs a 135M model ~1% of perplexity, which a fixed bound would blame on the merge.
A merge that fails is never deleted (it cost real time, and its report says why): it is kept, marked, as
`<out>.REJECTED/` (weights, merge-report.{json,md}) beside where it would have been, and nothing loads it as <out>.
For a QLoRA recipe (load_in_4bit) the report adds the QLoRA gap: which merge is closest to the NF4 training view.

Output: <out>/ weights + config + tokenizer, loft-manifest.json (hashes and versions), merge-report.{json,md}.
Nothing half-written: the work happens in <parent>/.<name>.partial-<pid>/, renamed into place at the end.
"""

import datetime
import hashlib
import json
import math
import os
import re
import shutil
import time
from pathlib import Path

import yaml

from training.arch import QUANT_NAME, quantized_name
from training.errors import LoftError, as_os_error, read_json, read_jsonl, read_safetensors_header
from training.lifecycle import clear_stale
from training.paths import MERGED, RECIPES, REPO, RunDir
from training.recipe import RecipeFacts
from training.versions import installed

HELP = "Merge a LoRA adapter into its full-precision base shard by shard, and verify the merge against PEFT."
EXAMPLE = "loft merge --adapter runs/smollm2-135m-lora-cpu/adapter --out merged_models/smollm2-shakespeare"

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}
MAX_ROWS, MAX_TOKENS = 8, 256  # held-out rows and tokens per row: enough to see a wrong merge, cheap on CPU

# Allowances per saved dtype, added to the measured rounding floor (see bounds()): the pass bound for KL mean is
# floor + 4e-3 in bf16, and so on. From SmolLM2-135M + the demo adapter on CPU (benchmarks/MERGE.md has the table).
# A correct merge measured: bf16 KL mean 1.0-1.5e-3, max <= 0.02, top-1 0.95-0.97 (bf16 *compute* is 90% of
# that: the same bf16 weights run in fp32 give KL 8e-5); fp16 KL 2.5e-5, top-1 0.998; fp32 KL 5e-8, top-1 1.
# Broken merges measured in bf16: down_proj left out KL 8e-3; layer 0 left out KL 0.015, max 0.3, top-1 0.90;
# scaling ×2 KL 0.21; onto an NF4-dequantised base KL 0.25, top-1 0.69; adapter not applied KL 0.41.
# The KL bounds sit 3-5× above the worst correct value; the smallest breakage measured still fails (on KL mean).
# The floor matters most for perplexity: bf16 alone moves a 135M model's answer perplexity by ~1%, so a fixed 1%
# bound rejected correct merges (a trained rank-4 adapter: 1.01%, its KL equal to a zero adapter's).
THRESHOLDS = {
    "bf16": {"kl_mean": 4e-3, "kl_max": 0.1, "top1_min": 0.90, "ppl_rel": 0.01},
    "fp16": {"kl_mean": 2e-4, "kl_max": 5e-3, "top1_min": 0.98, "ppl_rel": 0.005},
    "fp32": {"kl_mean": 1e-6, "kl_max": 1e-4, "top1_min": 0.995, "ppl_rel": 1e-4},
}

# Used when the recipe has no held-out split: short, varied chats whose answers give a perplexity.
BUILTIN_CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a haiku about the sea.",
     "Grey waves fold and break,\nsalt wind combs the dune grasses,\ngulls argue at dusk."),
    ("Explain what a prime number is.",
     "A prime number is a whole number above 1 whose only divisors are 1 and itself."),
    ("Give me three tips for sleeping better.",
     "Keep a regular bedtime, avoid screens late at night, and keep the room cool."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("What does a CPU do?", "A CPU runs a computer's instructions: it fetches, decodes and executes them."),
    ("Summarise the plot of Romeo and Juliet in one sentence.",
     ("Two young lovers from feuding families in Verona marry in secret, and a chain of misunderstandings "
     "ends in both their deaths.")),
    ("How many minutes are in a day?", "There are 24 × 60 = 1,440 minutes in a day."),
]

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
REFUSED_FEATURES = ("use_dora", "use_qalora", "target_parameters", "trainable_token_indices", "layer_replication")


class MergeRejected(LoftError):
    """Verification failed; `.report` holds the numbers (also written beside the output)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message, code=3)
        self.report = report


# ---------------------------------------------------------------- inputs: adapter, base, recipe


def read_adapter(adapter_dir: Path) -> dict:
    if not (adapter_dir / "adapter_config.json").is_file():
        raise LoftError(f"{adapter_dir} has no adapter_config.json; pass the LoRA output folder, "
                        "e.g. runs/<run>/adapter")
    if not (adapter_dir / "adapter_model.safetensors").is_file():
        raise LoftError(f"{adapter_dir} has no adapter_model.safetensors (still training, or saved as .bin?); "
                        "wait for training to finish or re-save with save_safetensors: true")
    cfg = read_json(adapter_dir / "adapter_config.json", "it is PEFT's adapter_config.json, an object like "
                    '{"peft_type": "LORA", "r": 16, ...}: copy it again from the training run')
    read_safetensors_header(adapter_dir / "adapter_model.safetensors", "copy the adapter again from the training "
                            "run (or retrain: the file was cut short)")
    if cfg.get("peft_type") != "LORA":
        raise LoftError(f"{adapter_dir} is a {cfg.get('peft_type')} adapter; loft merge handles LoRA "
                        "(use axolotl merge-lora)")
    used = [key for key in REFUSED_FEATURES if cfg.get(key)]
    if used:
        raise LoftError(f"{adapter_dir} uses {', '.join(used)}, which loft merge does not handle; "
                        "merge it with `axolotl merge-lora` instead")
    return cfg


def guess_original(name: str) -> str:
    """unsloth/llama-3-8b-bnb-4bit -> unsloth/llama-3-8b: strip the quantization suffix (a guess)."""
    head, sep, last = name.rpartition("/")
    match = QUANT_NAME.search(last)
    return head + sep + last[: match.start()] if match else name


def quantized(name: str, config: dict | None) -> str | None:
    """Why `name` is a pre-quantized checkpoint (its config's quantization_config, else its name), or None."""
    quant = (config or {}).get("quantization_config") or {}
    method = quant.get("quant_method") or ("bitsandbytes" if quant.get("load_in_4bit") else None)
    if method:
        return f"pre-quantized ({method})"
    return "by its name pre-quantized" if quantized_name(name) else None


def refuse_quantized(name: str, config: dict | None) -> None:
    """A pre-quantized base carries quantization noise the adapter never saw in full precision: refuse it."""
    why = quantized(name, config)
    if why:
        raise LoftError(f"base {name} is {why}; merge onto the full-precision original instead, probably "
                        f"{guess_original(name)} (a guess from the name; check the model card), with --base ID_OR_DIR")


def locate(name: str) -> Path | None:
    """A local directory (repo-relative paths resolve against the repo root) or a hub id already in the HF cache."""
    for path in (Path(name).expanduser(), REPO / name):
        if (path / "config.json").is_file():
            return path.resolve()
    if Path(name).is_absolute() or name.count("/") != 1:
        return None
    try:  # honours HF_HUB_OFFLINE: offline (the default) this only looks in the cache
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(name, allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model", "*.txt"]))
    except Exception:  # noqa: BLE001 (not cached, offline, no such repo: all mean "not here")
        return None


def resolve_base(name: str) -> Path:
    refuse_quantized(name, None)
    path = locate(name)
    if path is None:
        raise LoftError(f"base {name} is neither a directory nor a cached hub model; pass --base DIR, "
                        "or rerun as `loft --online merge ...` to download it")
    refuse_quantized(name, read_json(path / "config.json", "restore the base model's config.json (copy or "
                                     "download the model again)"))
    if not list(path.glob("*.safetensors")):
        raise LoftError(f"base {path} has no *.safetensors weights; convert it once with "
                        "AutoModelForCausalLM.from_pretrained(...).save_pretrained(DIR) and pass --base DIR")
    return path


def find_recipe(adapter_dir: Path) -> Path | None:
    """The resolved recipe `loft train` wrote beside the adapter, else a recipe whose output_dir is this adapter."""
    for path in (adapter_dir.parent / RunDir.RECIPE, adapter_dir / RunDir.RECIPE, adapter_dir / "axolotl_config.yaml"):
        if path.is_file():
            return path
    for path in sorted(RECIPES.glob("**/*.yaml")):
        try:
            cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
        except yaml.YAMLError:  # a broken recipe is `loft train`'s to report, not ours
            continue
        out = cfg.get("output_dir") if isinstance(cfg, dict) else None
        if out and (REPO / out).resolve() == adapter_dir.resolve():
            return path
    return None


def rejected_path(out: Path) -> Path:
    """Where a merge that failed verification is kept: beside --out, under a name nothing loads by accident."""
    return out.parent / f"{out.name}.REJECTED"


def default_out(adapter_dir: Path) -> Path:
    name = adapter_dir.parent.name if adapter_dir.name == RunDir.ADAPTER else adapter_dir.name
    return MERGED / name


# ---------------------------------------------------------------- the merge plan: one delta per base tensor


def lora_plan(adapter_dir: Path, cfg: dict) -> tuple[dict, dict]:
    """Return ({base key: (kind, A, B, scaling)}, {base key: full tensor from modules_to_save})."""
    from peft import LoraConfig
    from peft.utils import load_peft_weights
    from peft.utils.other import get_pattern_key

    config = LoraConfig.from_pretrained(str(adapter_dir))
    state = load_peft_weights(str(adapter_dir), device="cpu")
    parts, full = {}, {}
    for key, tensor in state.items():
        name = key.removeprefix("base_model.model.")
        if ".base_layer." in name:  # PEFT saves the untouched embedding when it is a LoRA target: not a change
            continue
        match = re.match(r"(.+)\.(lora_A|lora_B|lora_embedding_A|lora_embedding_B)(\.weight|\.bias)?$", name)
        if not match:
            full[name] = tensor  # modules_to_save: the whole trained module replaces the base one
            continue
        module, part, suffix = match.groups()
        parts.setdefault(module, {})[part + (suffix or "")] = tensor
    plan = {}
    for module, p in parts.items():
        # rank/alpha exactly as PEFT's LoraModel._create_and_replace picks them (patterns, then defaults)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        if "lora_embedding_A" in p:  # nn.Embedding: delta = (B @ A)^T
            plan[module + ".weight"] = ("embedding", p["lora_embedding_A"], p["lora_embedding_B"], scaling)
        else:
            kind = "fan_in_fan_out" if config.fan_in_fan_out else "linear"
            plan[module + ".weight"] = (kind, p["lora_A.weight"], p["lora_B.weight"], scaling)
            if "lora_B.bias" in p:
                plan[module + ".bias"] = ("bias", None, p["lora_B.bias"], scaling)
    return plan, full


def merge_tensor(key: str, tensor, plan: dict, full: dict, dtype, device: str, nf4=None):
    """W (optionally through the NF4 round trip) + scaling × B @ A in fp32, cast to dtype."""
    import torch

    if key in full:
        if full[key].shape != tensor.shape:
            raise LoftError(f"adapter replaces {key} with shape {tuple(full[key].shape)} but the base has "
                            f"{tuple(tensor.shape)} (resized vocabulary?); merge it with `axolotl merge-lora`")
        return full[key].to(dtype).clone()
    if key not in plan:
        out = nf4(tensor) if nf4 and key in nf4.keys else tensor
        return out.to(dtype).clone() if out.is_floating_point() else out
    if not tensor.is_floating_point():
        raise LoftError(f"base tensor {key} is {tensor.dtype}, not floating point: the base is quantized; "
                        "merge onto the full-precision original with --base")
    kind, a, b, scaling = plan[key]
    w = tensor.to(device, torch.float32)
    if nf4 and key in nf4.keys:
        w = nf4(w)
    if kind == "bias":
        delta = b.to(device, torch.float32) * scaling
    else:
        delta = (b.to(device, torch.float32) @ a.to(device, torch.float32)) * scaling
        if kind in ("embedding", "fan_in_fan_out"):
            delta = delta.T
    if delta.shape != w.shape:
        raise LoftError(f"adapter delta for {key} has shape {tuple(delta.shape)}, the base has {tuple(w.shape)}: "
                        "this adapter was trained on a different architecture; pass the right --base")
    return (w + delta).to(dtype).cpu()


def shards_of(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / n for n in names]
    return sorted(base_dir.glob("*.safetensors"))


def layout(base_dir: Path, plan: dict, full: dict) -> dict:
    """Shards, embedding keys, whether to untie, and the nn.Linear weights bitsandbytes would quantize."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(base_dir))
    with torch.device("meta"):  # module names and types only, no memory
        model = AutoModelForCausalLM.from_config(config)
    names = {id(m): n for n, m in model.named_modules()}
    emb_in = names.get(id(model.get_input_embeddings()), "") + ".weight"
    emb_out = names.get(id(model.get_output_embeddings()), "") + ".weight"
    linear = {f"{n}.weight" for n, mod in model.named_modules()
              if isinstance(mod, torch.nn.Linear) and f"{n}.weight" != emb_out}
    shards = shards_of(base_dir)
    shapes = {}
    for shard in shards:
        if not shard.is_file():
            raise LoftError(f"{shard} is missing (named by {base_dir / 'model.safetensors.index.json'}); "
                            "copy or download the base model again")
        shapes.update({k: tuple(v["shape"]) for k, v in read_safetensors_header(
            shard, "copy or download the base model again").items()})
    stored = set(shapes)
    tied = bool(getattr(config, "tie_word_embeddings", False))
    # Checkpoints saved from the bare model drop the first prefix (GPT-2: `h.0...`, modules: `transformer.h.0...`).
    def stored_as(key: str) -> str:
        return key if key in stored or key.split(".", 1)[-1] not in stored else key.split(".", 1)[-1]

    emb_in, emb_out = stored_as(emb_in), stored_as(emb_out)
    rename = {k: stored_as(k) for k in (*plan, *full)}
    missing = sorted(k for k, s in rename.items() if s not in stored and not (tied and s == emb_out))
    if missing:
        raise LoftError(f"adapter changes {missing[0]} (+{len(missing) - 1} more) which the base {base_dir} does not "
                        "have: adapter and base are different architectures; pass the right --base")
    for key in (*plan, *full):  # before any tensor is written: a wrong pairing fails in a second, not mid-merge
        want = delta_shape(plan[key]) if key in plan else tuple(full[key].shape)
        have = shapes.get(rename[key]) or (shapes.get(emb_in) if rename[key] == emb_out else None)
        if have is not None and want != have:
            raise LoftError(f"adapter {'changes' if key in plan else 'replaces'} {key} with shape {want} but the "
                            f"base {base_dir} has {have}: the adapter was trained on a different model (or a resized "
                            "vocabulary); pass the --base it was trained on")
    # Tied embeddings that the adapter touches on either side are written untied, each with its own change.
    untie = tied and any(k in (emb_in, emb_out) for k in (*plan, *full))
    return {"shards": shards, "n_tensors": len(stored), "emb_in": emb_in, "emb_out": emb_out, "untie": untie,
            "write_head": untie and emb_out not in stored, "linear": linear,
            "plan": {rename[k]: v for k, v in plan.items()}, "full": {rename[k]: v for k, v in full.items()}}


def delta_shape(entry) -> tuple:
    """The shape of the base tensor a plan entry changes: scaling × B @ A, transposed for embeddings/Conv1D."""
    kind, a, b, _ = entry
    if kind == "bias":
        return tuple(b.shape)
    rows, cols = b.shape[0], a.shape[1]
    return (cols, rows) if kind in ("embedding", "fan_in_fan_out") else (rows, cols)


def merged_shards(base_dir: Path, plan: dict, full: dict, dtype, device: str = "cpu", nf4=None, progress=True):
    """Yield (shard file name, {key: merged tensor}) one shard at a time."""
    from safetensors import safe_open
    from tqdm import tqdm

    lay = layout(base_dir, plan, full)
    plan, full = lay["plan"], lay["full"]
    # `with`: an error closes the bar first, so its message is not printed inside the bar's line
    with tqdm(total=lay["n_tensors"], unit="tensor", disable=not progress, desc="merge") as bar:
        for shard in lay["shards"]:
            out = {}
            bar.set_postfix_str(shard.name)
            with safe_open(shard, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(key)
                    out[key] = merge_tensor(key, tensor, plan, full, dtype, device, nf4)
                    if lay["write_head"] and key == lay["emb_in"]:  # lm_head: the base embedding plus its change
                        out[lay["emb_out"]] = merge_tensor(lay["emb_out"], tensor, plan, full, dtype, device, nf4)
                    bar.update(1)
            yield shard.name, out


# ---------------------------------------------------------------- writing: temp dir, shards, config, manifest


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    return installed(("torch", "transformers", "peft", "safetensors", "bitsandbytes", "loft"))


def clean_stale(out: Path) -> None:
    """Remove the hidden work dirs of merges that were killed (SIGKILL leaves no chance to clean up)."""
    clear_stale([*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")])


def write_merged(tmp: Path, base_dir: Path, adapter_dir: Path, plan, full, dtype_name: str, device: str) -> dict:
    import torch
    from safetensors.torch import save_file

    dtype = getattr(torch, DTYPES[dtype_name])
    weight_map, total = {}, 0
    for name, tensors in merged_shards(base_dir, plan, full, dtype, device):
        try:
            save_file(tensors, str(tmp / name), metadata={"format": "pt"})
        except Exception as err:  # noqa: BLE001 (safetensors reports a full disk as SafetensorError)
            disk = as_os_error(err, tmp / name)
            if disk is None:
                raise
            raise disk from None
        weight_map.update({k: name for k in tensors})
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        del tensors
    if (base_dir / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = DTYPES[dtype_name]
    config.pop("torch_dtype", None)
    untied = layout(base_dir, plan, full)["untie"]
    if untied:
        config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", tmp)
    # The tokenizer Axolotl saved with the adapter is the one training used (template included); else the base's.
    tok_src = adapter_dir if (adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, tmp)
    return {"untied_embeddings": untied, "shards": len(set(weight_map.values())),
            "bytes": total, "tokenizer_from": str(tok_src)}


def manifest(base_name, base_dir, adapter_dir, recipe_path, dtype_name, device, written) -> dict:
    base_files = [p for p in sorted(base_dir.iterdir()) if p.is_file() and (p.suffix in (".safetensors", ".json"))]
    return {
        "tool": "loft merge",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": {"name": base_name, "path": str(base_dir), "sha256": {p.name: sha256(p) for p in base_files}},
        "adapter": {"path": str(adapter_dir.resolve()),
                    "sha256": {n: sha256(adapter_dir / n) for n in ADAPTER_FILES}},
        "recipe": ({"path": str(recipe_path), "sha256": sha256(recipe_path),
                    "config": yaml.safe_load(recipe_path.read_text(encoding="utf-8"))} if recipe_path else None),
        "dtype": dtype_name,
        "device": device,
        "versions": versions(),
        **written,
    }


# ---------------------------------------------------------------- verification: merged vs PEFT, on held-out rows


ROW_SHAPES = '{"messages": [...]} or {"text": "..."}'


def eval_rows(path: Path | None, recipe: dict) -> tuple[list, str]:
    """Chats (lists of messages) or plain texts; from --eval, the recipe's held-out split, or the built-in set."""
    field = "messages"
    if path is None:
        for ds in recipe.get("test_datasets") or []:
            candidate = REPO / str(ds.get("path", ""))
            if candidate.is_file():
                path, field = candidate, ds.get("field_messages", "messages")
                break
    if path is None:
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in BUILTIN_CHATS]
        return chats, "built-in"
    path = Path(path)
    if not path.is_file():
        raise LoftError(f"eval file {path} not found; pass a JSONL of {ROW_SHAPES} rows")
    rows = []
    for n, row in read_jsonl(path, f"each line must be one of {ROW_SHAPES}"):
        if isinstance(row.get(field), list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    for m in row[field]):
            rows.append(row[field])
        elif isinstance(row.get("text"), str):
            rows.append(row["text"])
        else:
            raise LoftError(f"{path}:{n}: no `{field}` list of {{\"role\", \"content\"}} messages and no `text` "
                            f"string; loft merge reads {ROW_SHAPES} rows")
    if not rows:
        raise LoftError(f"{path} has no rows")
    step = max(1, len(rows) // MAX_ROWS)  # spread over the file: held-out splits are often grouped by source
    return rows[::step][:MAX_ROWS], str(path)


def encode(tokenizer, rows) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token): perplexity is measured on the answer only."""
    out = []
    for row in rows:
        if isinstance(row, str):
            ids, start = tokenizer(row)["input_ids"], 1
        elif tokenizer.chat_template:
            ids = list(tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"])
            prompt = tokenizer.apply_chat_template(row[:-1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)
            start = len(prompt["input_ids"]) if row[-1].get("role") == "assistant" else 1
        else:  # no chat template (a base model): "role: content" lines
            lines = [f"{msg['role']}: {msg['content']}\n" for msg in row]
            ids, start = tokenizer("".join(lines))["input_ids"], len(tokenizer("".join(lines[:-1]))["input_ids"])
        ids = ids[:MAX_TOKENS]
        if len(ids) < 2:
            continue
        out.append((ids, max(1, min(start, len(ids) - 1))))
    if not out:
        raise LoftError("no held-out row has 2 or more tokens; pass --eval with real rows")
    return out


def logprobs(model, encoded, device: str) -> list:
    import torch

    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
                for ids, _ in encoded]


def compare(reference: list, candidate: list, encoded) -> dict:
    """Per-token KL(reference || candidate), top-1 agreement, and answer perplexity of both."""
    import torch

    kls, agree, nll_ref, nll_cand, n_answer = [], 0, 0.0, 0.0, 0
    for ref, cand, (ids, start) in zip(reference, candidate, encoded):
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)
        kls.append(kl)
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        targets = torch.tensor(ids[start:])
        pos = torch.arange(start - 1, len(ids) - 1)
        nll_ref -= float(ref[pos, targets].sum())
        nll_cand -= float(cand[pos, targets].sum())
        n_answer += len(targets)
    kl = torch.cat(kls)
    if not torch.isfinite(kl).all():
        kl = torch.full_like(kl, float("inf"))
    ppl_ref, ppl_cand = (math.exp(min(nll / max(n_answer, 1), 700)) for nll in (nll_ref, nll_cand))
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / len(kl),
            "ppl_reference": ppl_ref, "ppl_candidate": ppl_cand, "ppl_rel": abs(ppl_cand / ppl_ref - 1),
            "tokens": len(kl), "answer_tokens": n_answer}


def rounding_floor(base_dir: Path, dtype_name: str, device: str, encoded) -> dict | None:
    """What the chosen dtype costs a model that is not merged at all: the base in dtype against the base in fp32,
    on the same rows. A merge cannot be closer to its reference than this (at 135M in bf16 a zero adapter and a
    correct rank-4 one both sit at KL ~1.7e-3, ppl ~1%), so the bounds are this floor plus an allowance."""
    import gc

    import torch
    from transformers import AutoModelForCausalLM

    if dtype_name == "fp32":
        return None  # nothing is rounded
    full = logprobs(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device), encoded, device)
    gc.collect()
    rounded = logprobs(load_merged(base_dir, dtype_name, device), encoded, device)  # loaded as the merge is
    gc.collect()
    return compare(full, rounded, encoded)


def bounds(floor: dict | None, dtype_name: str) -> dict:
    """Pass bounds: the measured rounding floor plus the dtype's allowance (THRESHOLDS) for the merge itself."""
    allow = THRESHOLDS[dtype_name]
    if floor is None:
        return dict(allow)
    return {"kl_mean": floor["kl_mean"] + allow["kl_mean"], "kl_max": floor["kl_max"] + allow["kl_max"],
            "top1_min": min(allow["top1_min"], floor["top1"] - (1 - allow["top1_min"])),
            "ppl_rel": floor["ppl_rel"] + allow["ppl_rel"]}


def judge(metrics: dict, bounds: dict) -> list[str]:
    failures = []
    if not metrics["kl_mean"] <= bounds["kl_mean"]:
        failures.append(f"KL mean {metrics['kl_mean']:.3g} > {bounds['kl_mean']:g}")
    if not metrics["kl_max"] <= bounds["kl_max"]:
        failures.append(f"KL max {metrics['kl_max']:.3g} > {bounds['kl_max']:g}")
    if not metrics["top1"] >= bounds["top1_min"]:
        failures.append(f"top-1 agreement {metrics['top1']:.4f} < {bounds['top1_min']:g}")
    if not metrics["ppl_rel"] <= bounds["ppl_rel"]:
        failures.append(f"perplexity {metrics['ppl_candidate']:.3f} vs {metrics['ppl_reference']:.3f} "
                        f"differs by {metrics['ppl_rel']:.2%} > {bounds['ppl_rel']:.2%}")
    return failures


def peft_view(base_dir: Path, adapter_dir: Path, device: str, dtype_name: str = "fp32", nf4=None, bnb=None):
    """The adapter on a base in PEFT, unmerged.

    nf4: the base's linear weights replaced by bitsandbytes' NF4 round trip, computed in fp32: the QLoRA training
    view, exactly (bitsandbytes trains by dequantizing to the compute dtype and multiplying). bnb: the base loaded
    through bitsandbytes 4-bit as it serves (on CPUs with AVX512-BF16 its kernel computes in bf16 whatever the
    compute dtype, which is why the training view is not built this way).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = getattr(torch, DTYPES[dtype_name])
    if bnb:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb["quant_type"],
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=bnb["double_quant"])
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, quantization_config=quant,
                                                     device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    if nf4:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in nf4.keys:
                    param.copy_(nf4(param))
    return PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=False).to(device)


def load_merged(path: Path, dtype_name: str, device: str):
    import torch
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=getattr(torch, DTYPES[dtype_name])).to(device)


# ---------------------------------------------------------------- QLoRA gap: which merge matches NF4 training?


class NF4:
    """bitsandbytes' own NF4 quantize -> dequantize on the weights bitsandbytes would quantize (runs on CPU)."""

    def __init__(self, keys: set, quant_type: str = "nf4", double_quant: bool = True, blocksize: int = 64):
        self.keys, self.quant_type, self.double_quant, self.blocksize = keys, quant_type, double_quant, blocksize

    def __call__(self, w):
        import bitsandbytes.functional as bnb_f
        import torch

        flat = w.to(torch.float32).reshape(-1).contiguous()
        q, state = bnb_f.quantize_4bit(flat, blocksize=self.blocksize, quant_type=self.quant_type,
                                       compress_statistics=self.double_quant)
        return bnb_f.dequantize_4bit(q, state, quant_type=self.quant_type).reshape(w.shape).to(w.dtype)


def quant_settings(recipe: dict) -> dict | None:
    if RecipeFacts.of(recipe).bits != 4:
        return None
    kw = recipe.get("bnb_config_kwargs") or {}
    return {"quant_type": kw.get("bnb_4bit_quant_type", "nf4"),
            "double_quant": bool(kw.get("bnb_4bit_use_double_quant", True)), "blocksize": 64}


def in_memory_merge(base_dir: Path, plan, full, dtype_name: str, device: str, nf4):
    """The same shard merge, loaded into a model in memory instead of written (for the QLoRA candidates)."""
    import torch
    from transformers import AutoModelForCausalLM

    dtype = getattr(torch, DTYPES[dtype_name])
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype)  # real buffers (rotary) and layout
    if layout(base_dir, plan, full)["untie"]:
        head = model.get_output_embeddings()
        head.weight = torch.nn.Parameter(head.weight.detach().clone())
        model.config.tie_word_embeddings = False
    for _, tensors in merged_shards(base_dir, plan, full, dtype, device, nf4=nf4, progress=False):
        _, unexpected = model.load_state_dict(tensors, strict=False)
        if unexpected:
            raise LoftError(f"merged tensors {unexpected[:3]} do not fit {base_dir}'s architecture")
    return model.to(device)


def qlora_gap(base_dir, adapter_dir, plan, full, dtype_name, device, quant, encoded, merged_lp, reference_lp) -> dict:
    """Three candidates against the NF4 training view (bitsandbytes NF4 base + adapter, fp32 compute)."""
    import gc

    nf4 = NF4(layout(base_dir, plan, full)["linear"], quant["quant_type"], quant["double_quant"], quant["blocksize"])
    training = logprobs(peft_view(base_dir, adapter_dir, device, nf4=nf4), encoded, device)
    gc.collect()
    candidates = {
        f"merge into full precision, W + BA ({dtype_name}, loft)": merged_lp,
        f"merge into dequantised NF4, deq(NF4(W)) + BA ({dtype_name})":
            logprobs(in_memory_merge(base_dir, plan, full, dtype_name, device, nf4), encoded, device),
        f"unmerged NF4 + adapter (bitsandbytes 4-bit, {dtype_name} compute)":
            logprobs(peft_view(base_dir, adapter_dir, device, dtype_name, bnb=quant), encoded, device),
    }
    gc.collect()
    result = {name: compare(training, lp, encoded) for name, lp in candidates.items()}
    closest = min(result, key=lambda n: result[n]["kl_mean"])
    ranked = sorted(result.values(), key=lambda m: m["kl_mean"])
    return {
        "training_view": f"base linears through bitsandbytes' {quant['quant_type']} round trip (double quant "
                         f"{quant['double_quant']}, blocksize {quant['blocksize']}) + adapter unmerged, fp32",
        "candidates": result,
        "closest": closest,
        "kl_ratio_next_to_closest": ranked[1]["kl_mean"] / max(ranked[0]["kl_mean"], 1e-12),
        "nf4_view_vs_full_precision_view": compare(reference_lp, training, encoded),
    }


# ---------------------------------------------------------------- the whole merge


def merge(adapter_dir, out_dir=None, base=None, dtype="bf16", force=False, verify=True, eval_path=None,
          device="cpu", progress=True) -> dict:
    """Merge, verify, and move into place; return the report (raise MergeRejected if verification fails)."""
    import gc

    if dtype not in DTYPES:
        raise LoftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    adapter_dir = Path(adapter_dir)
    adapter_cfg = read_adapter(adapter_dir)
    recorded = adapter_cfg.get("base_model_name_or_path") or ""
    if base is None and not recorded:
        raise LoftError(f"{adapter_dir}/adapter_config.json names no base model; pass --base ID_OR_DIR")
    base_name = str(base or recorded)
    base_dir = resolve_base(base_name)
    out = Path(out_dir) if out_dir else default_out(adapter_dir)
    out = out if out.is_absolute() else Path.cwd() / out
    if out.exists() and not force:
        raise LoftError(f"{out} already exists; pass --force to replace it, or choose another --out")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LoftError("--device cuda but torch sees no GPU; drop --device (CPU is the default)")

    recipe_path = find_recipe(adapter_dir)
    recipe = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}) if recipe_path else {}
    rows, source = eval_rows(Path(eval_path) if eval_path else None, recipe) if verify else ([], None)
    quant = quant_settings(recipe)
    # The training base is what the adapter learned on; if --base differs, verifying against it tests the pairing.
    training_dir, pairing_note = base_dir, None
    if base and base_name != recorded:
        found = locate(recorded) if recorded else None
        why = quantized(recorded, json.loads((found / "config.json").read_text()) if found else None)
        if why:
            # Trained on a pre-quantized copy of --base: check the arithmetic on --base; for bitsandbytes 4-bit
            # copies, the QLoRA gap measures the distance to the training view (NF4 of --base, as bnb makes them).
            if re.search(r"bitsandbytes|bnb|4bit|nf4", f"{why} {recorded}", re.IGNORECASE):
                quant = quant or {"quant_type": "nf4", "double_quant": True, "blocksize": 64}
            pairing_note = f"adapter trained on {why} {recorded}: merge checked against PEFT on {base_name}"
        elif found:
            training_dir = found
        else:
            pairing_note = f"training base {recorded or '(none recorded)'} not found: checked the merge arithmetic only"

    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    rejected = rejected_path(out)
    started = time.time()
    try:
        tmp.mkdir()
        plan, full = lora_plan(adapter_dir, adapter_cfg)
        print(f"loft merge: {adapter_dir} + {base_dir} -> {out} ({dtype}, {len(plan)} LoRA tensors, "
              f"{len(full)} full modules)", flush=True)
        written = write_merged(tmp, base_dir, adapter_dir, plan, full, dtype, device)
        merge_s = time.time() - started
        report = {"passed": None, "adapter": str(adapter_dir), "base": base_name, "base_dir": str(base_dir),
                  "training_base": str(training_dir), "pairing_note": pairing_note, "out": str(out), "dtype": dtype,
                  "recipe": str(recipe_path) if recipe_path else None, "merge_seconds": round(merge_s, 2), **written}
        if verify:
            report.update(verification(tmp, training_dir, adapter_dir, base_dir, plan, full, dtype, device,
                                       rows, source, quant))
            report["verify_seconds"] = round(time.time() - started - merge_s, 2)
        report["verified"] = bool(verify)
        (tmp / "loft-manifest.json").write_text(json.dumps(
            manifest(base_name, base_dir, adapter_dir, recipe_path, dtype, device, {**written, "verified": bool(verify),
                     "passed": report["passed"]}), indent=2))
        if report["passed"] is False:
            report["out"] = str(rejected)
        summary = summarize(report)
        print(summary, flush=True)
        (tmp / RunDir.MERGE_JSON).write_text(json.dumps(report, indent=2))
        (tmp / RunDir.MERGE_MD).write_text(summary + "\n")
        final = rejected if report["passed"] is False else out
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if final.exists():
            final.rename(old)
        tmp.rename(final)
        shutil.rmtree(old, ignore_errors=True)
        if report["passed"] is False:
            raise MergeRejected(f"verification failed ({'; '.join(report['failures'])}); the merged weights are kept, "
                                f"marked, in {rejected} (report: {rejected / RunDir.MERGE_MD}); check that --base "
                                "is the model the adapter was trained on", report)
        return report
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        gc.collect()


def verification(tmp, training_dir, adapter_dir, base_dir, plan, full, dtype, device, rows, source, quant) -> dict:
    import gc

    from transformers import AutoTokenizer

    encoded = encode(AutoTokenizer.from_pretrained(str(tmp)), rows)
    reference = logprobs(peft_view(training_dir, adapter_dir, device), encoded, device)
    gc.collect()
    merged = logprobs(load_merged(tmp, dtype, device), encoded, device)
    gc.collect()
    metrics = compare(reference, merged, encoded)
    floor = rounding_floor(base_dir, dtype, device, encoded)
    limits = bounds(floor, dtype)
    failures = judge(metrics, limits)
    result = {"passed": not failures, "failures": failures, "eval_source": source, "rows": len(rows),
              "fidelity": metrics, "floor": floor, "thresholds": limits, "allowance": THRESHOLDS[dtype],
              "reference": "adapter on the training base in PEFT, unmerged, fp32",
              "floor_is": f"the base alone in {dtype} against the base in fp32 (no adapter): what rounding costs"}
    if quant:
        result["qlora_gap"] = qlora_gap(base_dir, adapter_dir, plan, full, dtype, device, quant, encoded,
                                        merged, reference)
    return result


def summarize(report: dict) -> str:
    lines = [f"# loft merge: {report['out']}", "",
             f"- adapter: {report['adapter']}", f"- base: {report['base']} ({report['base_dir']})",
             (f"- dtype: {report['dtype']}; merge {report['merge_seconds']} s; "
             f"embeddings {'untied' if report['untied_embeddings'] else 'as in the base'}")]
    if report.get("pairing_note"):
        lines.append(f"- note: {report['pairing_note']}")
    if not report["verified"]:
        return "\n".join(lines + ["- verification: skipped (--no-verify)"])
    m, t = report["fidelity"], report["thresholds"]
    f = report.get("floor") or {"kl_mean": 0.0, "kl_max": 0.0, "top1": 1.0, "ppl_rel": 0.0}
    lines += [(f"- verification ({report['rows']} rows from {report['eval_source']}, {m['tokens']} tokens; "
              f"reference: {report['reference']}): **{'PASS' if report['passed'] else 'FAIL'}**"),
              f"- rounding floor: {report.get('floor_is') or 'fp32: none'}; bound = floor + allowance", "",
              "| metric | merged | floor | bound |", "|---|---|---|---|",
              f"| KL mean | {m['kl_mean']:.3g} | {f['kl_mean']:.3g} | ≤ {t['kl_mean']:.3g} |",
              f"| KL max | {m['kl_max']:.3g} | {f['kl_max']:.3g} | ≤ {t['kl_max']:.3g} |",
              f"| top-1 agreement | {m['top1']:.4f} | {f['top1']:.4f} | ≥ {t['top1_min']:.4f} |",
              (f"| answer perplexity | {m['ppl_candidate']:.3f} (reference {m['ppl_reference']:.3f}, "
               f"{m['ppl_rel']:.2%} off) | {f['ppl_rel']:.2%} off | ± {t['ppl_rel']:.2%} |")]
    for failure in report["failures"]:
        lines.append(f"- FAIL: {failure}")
    gap = report.get("qlora_gap")
    if gap:
        lines += ["", f"QLoRA gap, against the training view ({gap['training_view']}):", "",
                  "| candidate | KL mean | KL max | top-1 | answer ppl |", "|---|---|---|---|---|"]
        for name, c in gap["candidates"].items():
            lines.append(f"| {name} | {c['kl_mean']:.3g} | {c['kl_max']:.3g} | {c['top1']:.4f} | "
                         f"{c['ppl_candidate']:.3f} |")
        training_ppl = next(iter(gap["candidates"].values()))["ppl_reference"]
        lines.append(f"\ntraining view answer perplexity {training_ppl:.3f}; closest to it: {gap['closest']} "
                     f"({gap['kl_ratio_next_to_closest']:.1f}× lower KL than the next)")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--adapter", required=True, type=Path, help="LoRA output folder (adapter_config.json inside)")
    parser.add_argument("--base", help="full-precision base, hub id or dir (default: the adapter's recorded base)")
    parser.add_argument("--out", type=Path, help="output dir (default: merged_models/<run name>)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="saved dtype (default bf16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--eval", type=Path, help="held-out JSONL for verification (default: the recipe's test split)")
    parser.add_argument("--no-verify", action="store_true", help="skip the fidelity check (the manifest says so)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge and verify")


def run(args) -> int:
    merge(args.adapter, args.out, base=args.base, dtype=args.dtype, force=args.force, verify=not args.no_verify,
          eval_path=args.eval, device=args.device)
    return 0
