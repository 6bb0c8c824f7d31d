"""Model architectures: a base model's shape from its config.json, looked up without downloading anything.

A base is found as a local folder, in the Hugging Face cache, or by name among training/archs/*.json (see its
README); variants of one model (instruct, chat, 4-bit, ...) share the shipped file. This module also owns the one
list of words that mark a pre-quantized checkpoint's name, which the doctor, the estimator and `loft merge` read.
"""

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

from training.paths import REPO

ARCHS = Path(__file__).resolve().parent / "archs"

# Names of pre-quantized checkpoints: `-bnb-4bit`, `-4bit`, `-GPTQ`, `-AWQ`, `-int4` ... (unsloth, TheBloke, Qwen).
QUANT_WORDS = ("bnb", "4bit", "8bit", "gptq", "awq", "int4", "int8", "nf4", "fp4", "exl2")
QUANT_NAME = re.compile(rf"[-_.]({'|'.join(QUANT_WORDS)})(?=[-_.]|$)", re.IGNORECASE)


def quantized_name(name: str) -> bool:
    """Whether the last part of a model name or path says the checkpoint is pre-quantized."""
    return bool(QUANT_NAME.search(Path(str(name)).name))


@dataclass
class Arch:
    name: str
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab: int
    tied: bool
    source: str = ""
    quantized: dict | None = None  # the config's quantization_config (a pre-quantized checkpoint)

    @classmethod
    def from_config(cls, cfg: dict, name: str, source: str) -> "Arch":
        text = cfg.get("text_config") or cfg  # multimodal wrappers keep the LM in text_config
        heads = text["num_attention_heads"]
        hidden = text["hidden_size"]
        return cls(
            name=name,
            hidden=hidden,
            intermediate=text["intermediate_size"],
            layers=text["num_hidden_layers"],
            heads=heads,
            kv_heads=text.get("num_key_value_heads") or heads,
            head_dim=text.get("head_dim") or hidden // heads,
            vocab=text["vocab_size"],
            tied=bool(cfg.get("tie_word_embeddings", text.get("tie_word_embeddings", False))),
            source=source,
            quantized=cfg.get("quantization_config"),
        )

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(in, out) of each projection in one decoder layer."""
        q, kv, h, i = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.hidden, self.intermediate
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    @property
    def linear_params(self) -> int:
        return self.layers * sum(a * b for a, b in self.linear_shapes().values())

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden * (1 if self.tied else 2)

    @property
    def params(self) -> int:
        return self.linear_params + self.embed_params + (2 * self.layers + 1) * self.hidden


# ---------------------------------------------------------------- architecture lookup
VARIANT_WORDS = {"instruct", "it", "chat", "hf", "unsloth", "base", "dynamic", *QUANT_WORDS}


def normalize(name: str) -> str:
    """'unsloth/Meta-Llama-3.1-8B-Instruct-bnb-4bit' -> 'llama-3.1-8b' (variants share an architecture)."""
    base = name.rstrip("/").split("/")[-1].lower()
    base = base.removeprefix("meta-")
    return "-".join(w for w in base.split("-") if w not in VARIANT_WORDS)


def hub_cache_config(repo_id: str) -> Path | None:
    hub = Path(os.environ.get("HF_HUB_CACHE") or Path(os.environ.get("HF_HOME", Path.home() / ".cache" / "huggingface")) / "hub")
    snaps = hub / f"models--{repo_id.replace('/', '--')}" / "snapshots"
    found = sorted(snaps.glob("*/config.json")) if snaps.is_dir() else []
    return found[-1] if found else None


def find_arch(base_model: str) -> Arch | None:
    """The architecture of `base_model`: local folder, HF cache, then training/archs/ by name."""
    if not base_model or not isinstance(base_model, str):
        return None
    for root in (Path.cwd(), REPO):
        path = Path(base_model).expanduser()
        path = path if path.is_absolute() else root / path
        if (path / "config.json").is_file():
            return _load(path / "config.json", base_model)
    cached = hub_cache_config(base_model) if "/" in base_model else None
    if cached:
        return _load(cached, base_model)
    shipped = shipped_config(base_model)
    return _load(shipped, base_model) if shipped else None


def shipped_config(name: str) -> Path | None:
    """training/archs/<file>.json whose name matches `name` once variant words are dropped."""
    want = normalize(name)
    return next((file for file in sorted(ARCHS.glob("*.json")) if normalize(file.stem) == want), None)


def shipped_names() -> list[str]:
    return sorted(file.stem for file in ARCHS.glob("*.json"))


def _load(path: Path, name: str) -> Arch | None:
    try:
        return Arch.from_config(json.loads(path.read_text()), name, str(path))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
