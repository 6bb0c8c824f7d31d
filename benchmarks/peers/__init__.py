"""The runners `loft bench speed --vs` measures Loft against, and what every one of them records.

Each runner is a module run as a child process on the same rows, model folder, LoRA, tokens per optimizer step and
memory cap as the Loft run, measured by the same callback (benchmarks/speed_probe.py):

  naive    benchmarks/baseline_trl.py: TRL + PEFT as a first script is written (no packing, no Liger).
  trl      benchmarks/peers/trl_tuned.py: TRL + PEFT as TRL's docs advise for speed and memory.
  unsloth  benchmarks/peers/unsloth_runner.py: Unsloth's FastLanguageModel, as Unsloth's docs advise.

Torch-free on purpose: the harness imports it in the `loft` process, and a runner that cannot run writes its
one-line reason with it before importing anything heavy.
"""

import json
from pathlib import Path

from training.errors import LoftError
from training.versions import installed

# --vs name -> (results key, module). The naive runner keeps the key `baseline` that earlier results files use.
RUNNERS = {
    "naive": ("baseline", "benchmarks.baseline_trl"),
    "trl": ("trl", "benchmarks.peers.trl_tuned"),
    "unsloth": ("unsloth", "benchmarks.peers.unsloth_runner"),
}
ALIASES = {"baseline": "naive"}  # the spelling of earlier sessions' scripts
KEYS = {key: name for name, (key, _) in RUNNERS.items()}

# Whose versions every record carries (importlib.metadata only: nothing is imported to read them).
PACKAGES = ("torch", "transformers", "axolotl", "peft", "trl", "bitsandbytes", "liger-kernel", "accelerate",
            "unsloth", "unsloth-zoo", "cut-cross-entropy", "triton")


def parse_runners(text: str) -> list[str]:
    """`trl,unsloth,naive` -> results keys in the order given; one clear error for a name that is not a runner."""
    keys = []
    for name in (part.strip() for part in text.split(",")):
        name = ALIASES.get(name, name)
        if name not in RUNNERS:
            known = ", ".join(sorted(RUNNERS))
            raise LoftError(f"`{name}` is not a runner loft bench speed knows; --vs and --only take a "
                            f"comma-separated list of: {known} (e.g. --vs trl,unsloth,naive)")
        if RUNNERS[name][0] not in keys:
            keys.append(RUNNERS[name][0])
    return keys


def module_of(key: str) -> str:
    return RUNNERS[KEYS[key]][1]


def versions() -> dict:
    return installed(PACKAGES)


def cannot_run(path: str | Path, runner: str, reason: str, settings: dict | None = None) -> dict:
    """The record of a runner that could not start here (no GPU, a package missing): kept in the results, with
    its reason, so it never silently drops out of a comparison."""
    record = {"runner": runner, "status": "cannot_run", "reason": reason, "settings": settings or {},
              "versions": versions()}
    Path(path).write_text(json.dumps(record, indent=1))
    return record
