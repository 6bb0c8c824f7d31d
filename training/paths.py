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


def _file(name: str) -> property:
    return property(lambda self: self.path / name, doc=f"<run>/{name}")


class RunDir:
    """A run folder, runs/<name>/: the one place its file names are spelled. Every writer and reader asks here.

      recipe.yaml         the resolved recipe Axolotl trained (`loft train`, `loft doctor --measure`)
      train.log           Axolotl's console output
      adapter/            Axolotl's output_dir: the LoRA adapter, TensorBoard logs (adapter/runs/) and the guard's
                          health.json
      prepared/           Axolotl's tokenized dataset cache
      out/                `loft doctor --measure`'s output_dir (nothing in it is kept)
      measure.json        `loft doctor --measure`: measured vs estimated peak memory
      heldout.txt, gguf/  `loft demo`: held-out text for perplexity, the GGUF files
      merge-report.json   `loft merge`: fidelity of the merged model (also beside the merged model, with .md)
      export-report.json  `loft export`: GGUF files, sizes, perplexities (also in the GGUF folder)
      style.json, versus.json, faithfulness.json   `loft bench style|versus|faithfulness`
      pipeline.json       `loft demo`: seconds per stage
      report.md, report.html, report-figures/      `loft report`
    """

    RECIPE = "recipe.yaml"
    TRAIN_LOG = "train.log"
    ADAPTER = "adapter"
    PREPARED = "prepared"
    HEALTH = "health.json"  # inside Axolotl's output_dir, where the guard runs
    MEASURE_OUT = "out"
    MEASURE_JSON = "measure.json"
    HELDOUT = "heldout.txt"
    GGUF = "gguf"
    MERGE_JSON, MERGE_MD = "merge-report.json", "merge-report.md"
    EXPORT_JSON = "export-report.json"
    STYLE_JSON = "style.json"  # benchmarks.style.style_report(...) + "samples"
    VERSUS_JSON = "versus.json"  # {"tasks": {task: benchmarks.versus.head_to_head(...)}}
    FAITHFULNESS_JSON = "faithfulness.json"  # benchmarks.faithfulness.faithfulness_report(...)
    PIPELINE_JSON = "pipeline.json"
    REPORT_MD, REPORT_HTML, FIGURES = "report.md", "report.html", "report-figures"
    EVENTS_GLOB = f"{ADAPTER}/runs/**/events.out.tfevents.*"  # TensorBoard logs Axolotl writes while training

    def __init__(self, path: str | Path):
        self.path = Path(path)

    @classmethod
    def named(cls, name: str) -> "RunDir":
        return cls(RUNS / name)

    recipe = _file(RECIPE)
    train_log = _file(TRAIN_LOG)
    adapter = _file(ADAPTER)
    prepared = _file(PREPARED)
    health = _file(f"{ADAPTER}/{HEALTH}")
    measure_out = _file(MEASURE_OUT)
    measure_health = _file(f"{MEASURE_OUT}/{HEALTH}")
    measure_json = _file(MEASURE_JSON)
    heldout = _file(HELDOUT)
    gguf = _file(GGUF)
    merge_json = _file(MERGE_JSON)
    export_json = _file(EXPORT_JSON)
    style_json = _file(STYLE_JSON)
    versus_json = _file(VERSUS_JSON)
    faithfulness_json = _file(FAITHFULNESS_JSON)
    pipeline_json = _file(PIPELINE_JSON)
    report_md = _file(REPORT_MD)
    report_html = _file(REPORT_HTML)
    figures = _file(FIGURES)


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


def private_env(env: dict, online: bool = False) -> dict:
    """env with the offline/no-telemetry variables added wherever the user has not chosen a value."""
    online = online or env.get("LOFT_ONLINE") == "1"
    for key, value in OFFLINE_ENV.items():
        if online and key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
            continue
        env.setdefault(key, value)
    return env


def apply_private_env(online: bool = False) -> None:
    """Set the offline/no-telemetry variables in this process unless the user already chose a value."""
    private_env(os.environ, online)
    quiet_import_noise()


# torchao (imported by Axolotl) ships CUDA-only kernels (_C_mxfp8, _C_cutlass_90a): where CUDA is missing, its import
# logs "Failed to load .../torchao/_C_*.so" for each, then torch logs a deprecation warning per torchao enum. Both
# are harmless and read like a broken install on every verb that imports Axolotl; their errors still show.
NOISY_LOGGERS = ("torchao", "torch.utils._pytree")


def quiet_import_noise() -> None:
    for name in NOISY_LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
