"""The shard plan: which adapter change lands on which base tensor, in which shard, and the merge of one tensor.

Built once per merge (reading the adapter, the base's shard headers and a meta-device model for module names and
types) and handed to everything that walks the shards: the writer, the QLoRA-gap study, the benchmark.
Each safetensors shard of the base is then read alone, scaling × B @ A is added in fp32 (PEFT's formula and PEFT's
config) and the result cast to the saved dtype: peak RAM ≈ one shard + the adapter.
"""

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from training.errors import LoftError, read_safetensors_header

DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def torch_dtype(name: str):
    """The torch dtype for a saved-dtype name (a key of DTYPES)."""
    import torch

    return getattr(torch, DTYPES[name])


@dataclass(frozen=True)
class ShardPlan:
    """A base checkpoint's shards and what the adapter changes in them, keyed as the base stores its tensors."""

    base_dir: Path
    shards: list[Path]
    n_tensors: int
    emb_in: str  # the input embedding's stored key
    emb_out: str  # lm_head's key (not stored when the base ties it to the embedding)
    untie: bool  # tied embeddings the adapter touches are written untied, each with its own change
    write_head: bool  # lm_head is not in the base's shards but must be written (untied)
    linear: frozenset  # nn.Linear weights, lm_head aside: what bitsandbytes quantizes in a QLoRA run
    deltas: dict  # {key: (kind, A, B, scaling)}: kind is linear, fan_in_fan_out, embedding or bias
    full: dict  # {key: tensor}: modules_to_save, which replace the base's module whole


def read_deltas(adapter_dir: Path) -> tuple[dict, dict]:
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
    deltas = {}
    for module, p in parts.items():
        # rank/alpha exactly as PEFT's LoraModel._create_and_replace picks them (patterns, then defaults)
        r = config.rank_pattern.get(get_pattern_key(config.rank_pattern.keys(), module), config.r)
        alpha = config.alpha_pattern.get(get_pattern_key(config.alpha_pattern.keys(), module), config.lora_alpha)
        scaling = alpha / math.sqrt(r) if config.use_rslora else alpha / r
        if "lora_embedding_A" in p:  # nn.Embedding: delta = (B @ A)^T
            deltas[module + ".weight"] = ("embedding", p["lora_embedding_A"], p["lora_embedding_B"], scaling)
        else:
            kind = "fan_in_fan_out" if config.fan_in_fan_out else "linear"
            deltas[module + ".weight"] = (kind, p["lora_A.weight"], p["lora_B.weight"], scaling)
            if "lora_B.bias" in p:
                deltas[module + ".bias"] = ("bias", None, p["lora_B.bias"], scaling)
    return deltas, full


def shards_of(base_dir: Path) -> list[Path]:
    index = base_dir / "model.safetensors.index.json"
    if index.is_file():
        names = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [base_dir / n for n in names]
    return sorted(base_dir.glob("*.safetensors"))


def layout(base_dir: Path, deltas: dict, full: dict) -> ShardPlan:
    """Shards, embedding keys, whether to untie, and the nn.Linear weights bitsandbytes would quantize; checks
    every change against the base's shapes before any tensor is written."""
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
    rename = {k: stored_as(k) for k in (*deltas, *full)}
    missing = sorted(k for k, s in rename.items() if s not in stored and not (tied and s == emb_out))
    if missing:
        raise LoftError(f"adapter changes {missing[0]} (+{len(missing) - 1} more) which the base {base_dir} does not "
                        "have: adapter and base are different architectures; pass the right --base")
    for key in (*deltas, *full):  # before any tensor is written: a wrong pairing fails in a second, not mid-merge
        want = delta_shape(deltas[key]) if key in deltas else tuple(full[key].shape)
        have = shapes.get(rename[key]) or (shapes.get(emb_in) if rename[key] == emb_out else None)
        if have is not None and want != have:
            raise LoftError(f"adapter {'changes' if key in deltas else 'replaces'} {key} with shape {want} but the "
                            f"base {base_dir} has {have}: the adapter was trained on a different model (or a resized "
                            "vocabulary); pass the --base it was trained on")
    # Tied embeddings that the adapter touches on either side are written untied, each with its own change.
    untie = tied and any(k in (emb_in, emb_out) for k in (*deltas, *full))
    return ShardPlan(base_dir=base_dir, shards=shards, n_tensors=len(stored), emb_in=emb_in, emb_out=emb_out,
                     untie=untie, write_head=untie and emb_out not in stored, linear=frozenset(linear),
                     deltas={rename[k]: v for k, v in deltas.items()}, full={rename[k]: v for k, v in full.items()})


def delta_shape(entry) -> tuple:
    """The shape of the base tensor a plan entry changes: scaling × B @ A, transposed for embeddings/Conv1D."""
    kind, a, b, _ = entry
    if kind == "bias":
        return tuple(b.shape)
    rows, cols = b.shape[0], a.shape[1]
    return (cols, rows) if kind in ("embedding", "fan_in_fan_out") else (rows, cols)


def merge_tensor(key: str, tensor, plan: ShardPlan, dtype, device: str, nf4=None):
    """W (optionally through the NF4 round trip) + scaling × B @ A in fp32, cast to dtype."""
    import torch

    if key in plan.full:
        if plan.full[key].shape != tensor.shape:
            raise LoftError(f"adapter replaces {key} with shape {tuple(plan.full[key].shape)} but the base has "
                            f"{tuple(tensor.shape)} (resized vocabulary?); merge it with `axolotl merge-lora`")
        return plan.full[key].to(dtype).clone()
    if key not in plan.deltas:
        out = nf4(tensor) if nf4 and key in nf4.keys else tensor
        return out.to(dtype).clone() if out.is_floating_point() else out
    if not tensor.is_floating_point():
        raise LoftError(f"base tensor {key} is {tensor.dtype}, not floating point: the base is quantized; "
                        "merge onto the full-precision original with --base")
    kind, a, b, scaling = plan.deltas[key]
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


def merged_shards(plan: ShardPlan, dtype, device: str = "cpu", nf4=None, progress=True):
    """Yield (shard file name, {key: merged tensor}) one shard at a time."""
    from safetensors import safe_open
    from tqdm import tqdm

    # `with`: an error closes the bar first, so its message is not printed inside the bar's line
    with tqdm(total=plan.n_tensors, unit="tensor", disable=not progress, desc="merge") as bar:
        for shard in plan.shards:
            out = {}
            bar.set_postfix_str(shard.name)
            with safe_open(shard, "pt") as f:
                for key in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    tensor = f.get_tensor(key)
                    out[key] = merge_tensor(key, tensor, plan, dtype, device, nf4)
                    if plan.write_head and key == plan.emb_in:  # lm_head: the base embedding plus its change
                        out[plan.emb_out] = merge_tensor(plan.emb_out, tensor, plan, dtype, device, nf4)
                    bar.update(1)
            yield shard.name, out
