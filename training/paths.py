"""Where Loft keeps things, and the offline/private environment every verb runs under.

Caches live outside the repo (the model and the llama.cpp build are shared by every clone):
  $LOFT_CACHE (default ~/.cache/loft)/
    models/smollm2-135m-instruct/   the embedded default model as an HF directory
    llama.cpp/<version>/bin/         llama-server, llama-quantize, llama-perplexity, llama-tokenize
    llama.cpp/<version>/src/         the vendored llama.cpp tree (convert_hf_to_gguf.py, gguf-py)
"""

import logging
import os
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
RECIPES = REPO / "recipes"
RUNS = REPO / "runs"
MERGED = REPO / "merged_models"


def cache_dir() -> Path:
    return Path(os.environ.get("LOFT_CACHE", Path.home() / ".cache" / "loft"))


# Private by default: no telemetry, no hub. `--online` on a verb (or LOFT_ONLINE=1) lifts the hub ban.
OFFLINE_ENV = {
    "AXOLOTL_DO_NOT_TRACK": "1",
    "DO_NOT_TRACK": "1",
    "HF_HUB_DISABLE_TELEMETRY": "1",
    "HF_HUB_OFFLINE": "1",
    "HF_DATASETS_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "WANDB_MODE": "offline",
    "TOKENIZERS_PARALLELISM": "false",
}


def apply_private_env(online: bool = False) -> None:
    """Set the offline/no-telemetry variables unless the user already chose a value."""
    online = online or os.environ.get("LOFT_ONLINE") == "1"
    for key, value in OFFLINE_ENV.items():
        if online and key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            continue
        os.environ.setdefault(key, value)
    quiet_import_noise()


# torchao (imported by Axolotl) ships CUDA-only kernels (_C_mxfp8, _C_cutlass_90a): where CUDA is missing, its import
# logs "Failed to load .../torchao/_C_*.so" for each, then torch logs a deprecation warning per torchao enum. Both
# are harmless and read like a broken install on every verb that imports Axolotl; their errors still show.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
