"""The merged folder, whole or not at all: weights, config, tokenizer and loft-manifest.json.

The work happens in <parent>/.<name>.partial-<pid>/ and is renamed into place at the end; a folder it replaces is
moved aside first and removed last. A kill -9 leaves only hidden folders, which the next merge to the same place
removes (training/lifecycle.py tells a dead writer's partial from a live one by its pid).
"""

import datetime
import hashlib
import json
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import yaml

from training.errors import as_os_error
from training.lifecycle import clear_stale
from training.merging.plan import DTYPES, ShardPlan, merged_shards, torch_dtype
from training.merging.sources import MergeJob
from training.versions import installed

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
MANIFEST = "loft-manifest.json"


def rejected_path(out: Path) -> Path:
    """Where a merge that failed verification is kept: beside --out, under a name nothing loads by accident."""
    return out.parent / f"{out.name}.REJECTED"


def clean_stale(out: Path) -> None:
    """Remove the hidden work dirs of merges that were killed (SIGKILL leaves no chance to clean up)."""
    clear_stale([*out.parent.glob(f".{out.name}.partial-*"), *out.parent.glob(f".{out.name}.old-*")])


@contextmanager
def partial_folder(out: Path) -> Iterator[Path]:
    """A hidden folder beside `out` to build the merge in; gone afterwards unless place() moved it."""
    out.parent.mkdir(parents=True, exist_ok=True)
    clean_stale(out)
    tmp = out.parent / f".{out.name}.partial-{os.getpid()}"
    try:
        tmp.mkdir()
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def place(tmp: Path, out: Path, passed: bool | None) -> Path:
    """Rename the finished folder to `out` (or, when verification failed, to `<out>.REJECTED`); return where."""
    final = rejected_path(out) if passed is False else out
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    if final.exists():
        final.rename(old)
    tmp.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final


def write_merged(tmp: Path, job: MergeJob, plan: ShardPlan) -> dict:
    """The merged shards (and index), config, generation config and tokenizer, into `tmp`."""
    from safetensors.torch import save_file  # looked up here: tests interrupt the merge by patching it

    weight_map, total = {}, 0
    for name, tensors in merged_shards(plan, torch_dtype(job.dtype), job.device, progress=job.progress):
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
    base_dir = job.base_dir
    if (base_dir / "model.safetensors.index.json").is_file():
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))

    config = json.loads((base_dir / "config.json").read_text())
    config["dtype"] = DTYPES[job.dtype]
    config.pop("torch_dtype", None)
    if plan.untie:
        config["tie_word_embeddings"] = False
    (tmp / "config.json").write_text(json.dumps(config, indent=2))
    if (base_dir / "generation_config.json").is_file():
        shutil.copy2(base_dir / "generation_config.json", tmp)
    # The tokenizer Axolotl saved with the adapter is the one training used (template included); else the base's.
    tok_src = job.adapter_dir if (job.adapter_dir / "tokenizer_config.json").is_file() else base_dir
    for name in TOKENIZER_FILES:
        if (tok_src / name).is_file():
            shutil.copy2(tok_src / name, tmp)
    return {"untied_embeddings": plan.untie, "shards": len(set(weight_map.values())),
            "bytes": total, "tokenizer_from": str(tok_src)}


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 24), b""):
            digest.update(block)
    return digest.hexdigest()


def versions() -> dict:
    return installed(("torch", "transformers", "peft", "safetensors", "bitsandbytes", "loft"))


def write_manifest(tmp: Path, job: MergeJob, written: dict) -> None:
    """loft-manifest.json: what went in (hashes of the base, adapter and recipe), with what, and what came out."""
    base_files = [p for p in sorted(job.base_dir.iterdir()) if p.is_file() and (p.suffix in (".safetensors", ".json"))]
    recipe = job.recipe_path
    manifest = {
        "tool": "loft merge",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "base": {"name": job.base_name, "path": str(job.base_dir), "sha256": {p.name: sha256(p) for p in base_files}},
        "adapter": {"path": str(job.adapter_dir.resolve()),
                    "sha256": {n: sha256(job.adapter_dir / n) for n in ADAPTER_FILES}},
        "recipe": ({"path": str(recipe), "sha256": sha256(recipe),
                    "config": yaml.safe_load(recipe.read_text(encoding="utf-8"))} if recipe else None),
        "dtype": job.dtype,
        "device": job.device,
        "versions": versions(),
        **written,
    }
    (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2))
