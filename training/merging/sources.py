"""What a merge is about: the adapter, the full-precision base it goes onto, the base it was trained on, the recipe.

All of it is found and checked before a weight is read, so a wrong pairing fails in a second with the fix, and the
rest of the merge gets one MergeJob instead of a dozen arguments.
"""

import json
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.arch import QUANT_NAME, quantized_name
from training.errors import LoftError, read_json, read_safetensors_header
from training.paths import MERGED, RECIPES, REPO, RunDir
from training.recipe import RecipeFacts

REFUSED_FEATURES = ("use_dora", "use_qalora", "target_parameters", "trainable_token_indices", "layer_replication")
# bitsandbytes' defaults, as Axolotl trains QLoRA unless the recipe's bnb_config_kwargs says otherwise
NF4_DEFAULTS = {"quant_type": "nf4", "double_quant": True, "blocksize": 64}


@dataclass(frozen=True)
class MergeJob:
    """One merge: what goes onto what, where it is written, and what it is checked against."""

    adapter_dir: Path
    base_name: str  # --base, else the base recorded in adapter_config.json
    base_dir: Path  # the full-precision weights the merge writes onto
    training_dir: Path  # the base the adapter learned on: verification's reference runs on it
    pairing_note: str | None  # why the reference is not simply the adapter on base_dir, when it is not
    recipe_path: Path | None
    recipe: dict
    quant: dict | None  # the NF4 settings training saw (a QLoRA run): the report adds the QLoRA gap
    out: Path
    dtype: str  # a key of plan.DTYPES
    device: str
    progress: bool = True


def find(adapter_dir: Path, base: str | None, out: Path | None, dtype: str, device: str,
         progress: bool = True) -> MergeJob:
    """The MergeJob for an adapter folder (and --base, --out when given); raise LoftError on a wrong input."""
    adapter_dir = Path(adapter_dir)
    recorded = read_adapter(adapter_dir).get("base_model_name_or_path") or ""
    if base is None and not recorded:
        raise LoftError(f"{adapter_dir}/adapter_config.json names no base model; pass --base ID_OR_DIR")
    base_name = str(base or recorded)
    base_dir = resolve_base(base_name)
    out = Path(out) if out else default_out(adapter_dir)
    recipe_path = find_recipe(adapter_dir)
    recipe = (yaml.safe_load(recipe_path.read_text(encoding="utf-8")) or {}) if recipe_path else {}
    training_dir, pairing_note, quant = base_dir, None, quant_settings(recipe)
    # The training base is what the adapter learned on; if --base differs, verifying against it tests the pairing.
    if base and base_name != recorded:
        found = locate(recorded) if recorded else None
        why = quantized(recorded, json.loads((found / "config.json").read_text()) if found else None)
        if why:
            # Trained on a pre-quantized copy of --base: check the arithmetic on --base; for bitsandbytes 4-bit
            # copies, the QLoRA gap measures the distance to the training view (NF4 of --base, as bnb makes them).
            if re.search(r"bitsandbytes|bnb|4bit|nf4", f"{why} {recorded}", re.IGNORECASE):
                quant = quant or dict(NF4_DEFAULTS)
            pairing_note = f"adapter trained on {why} {recorded}: merge checked against PEFT on {base_name}"
        elif found:
            training_dir = found
        else:
            pairing_note = f"training base {recorded or '(none recorded)'} not found: checked the merge arithmetic only"
    return MergeJob(adapter_dir=adapter_dir, base_name=base_name, base_dir=base_dir, training_dir=training_dir,
                    pairing_note=pairing_note, recipe_path=recipe_path, recipe=recipe, quant=quant,
                    out=out if out.is_absolute() else Path.cwd() / out, dtype=dtype, device=device, progress=progress)


def read_adapter(adapter_dir: Path) -> dict:
    sharded = adapter_dir / "pytorch_model_fsdp_0"
    if sharded.is_dir() and not (adapter_dir / "adapter_model.safetensors").is_file():
        # A checkpoint saved with fsdp_state_dict_type SHARDED_STATE_DICT: each rank's piece, no adapter file.
        # accelerate's own tool gathers it; the result is the adapter's weights under their PEFT names.
        raise LoftError(f"{adapter_dir} is an FSDP sharded checkpoint, not an adapter; gather it with `accelerate "
                        f"merge-weights {sharded} OUT`, rename OUT/model.safetensors to adapter_model.safetensors, "
                        "copy the run's adapter/adapter_config.json into OUT, then `loft merge --adapter OUT`")
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


def quant_settings(recipe: dict) -> dict | None:
    """The NF4 round trip a 4-bit recipe trained through (bitsandbytes' settings), or None for a 16-bit one."""
    if RecipeFacts.of(recipe).bits != 4:
        return None
    kw = recipe.get("bnb_config_kwargs") or {}
    return {"quant_type": kw.get("bnb_4bit_quant_type", NF4_DEFAULTS["quant_type"]),
            "double_quant": bool(kw.get("bnb_4bit_use_double_quant", NF4_DEFAULTS["double_quant"])),
            "blocksize": NF4_DEFAULTS["blocksize"]}


def default_out(adapter_dir: Path) -> Path:
    name = adapter_dir.parent.name if adapter_dir.name == RunDir.ADAPTER else adapter_dir.name
    return MERGED / name
