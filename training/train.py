"""`loft train RECIPE`: doctor the recipe, resolve it into runs/<name>/, hand it to Axolotl with the guard.

Training is Axolotl's (`accelerate launch -m axolotl.cli.train`, run by training/axolotl.py); this verb only adds
the run folder, overrides that fail loudly on unknown keys, the private environment, and --resume.
"""

import json
import sys
from pathlib import Path

from training import recipe as recipes
from training.axolotl import GUARD, launch
from training.errors import LoftError
from training.paths import RunDir

HELP = "Doctor a recipe, then train it with Axolotl and the health guard into runs/<name>/ (--set key=value)."
EXAMPLE = "loft train recipes/smollm2-135m/lora-cpu.yaml --set max_steps=10 --name quick"


def train(recipe: Path, name: str | None = None, overrides: list[str] | None = None, check: bool = True,
          resume: bool = False) -> Path:
    """Doctor, then train with the health guard; return the run folder (adapter in run_dir/adapter).

    resume: continue from the newest runs/<name>/adapter/checkpoint-* (Axolotl's auto_resume_from_checkpoints),
    e.g. after a kill or a crash; train.log is appended to."""
    overrides = [*(overrides or []), *(["auto_resume_from_checkpoints=true"] if resume else [])]
    run_dir, cfg = recipes.resolve(recipe, name, overrides)
    run = RunDir(run_dir)
    if resume and not list(run.adapter.glob("checkpoint-*")):
        print(f"loft train: --resume: no checkpoint in {run.adapter} yet (the run saved none before it "
              "stopped); starting from step 0", file=sys.stderr)
    if GUARD not in (cfg.get("plugins") or []):
        cfg["plugins"] = [*(cfg.get("plugins") or []), GUARD]
    resolved = recipes.write(cfg, run_dir, recipe)
    if check:
        from training.doctor import diagnose, render

        report = diagnose(resolved)
        print(render(report, strict=False))
        if report.count("error"):
            raise LoftError(f"loft doctor found {report.count('error')} error(s) in {recipe} (above); "
                            "fix them, or pass --no-check to train anyway")
    print(f"loft train: {recipe} -> {run_dir}")
    launch(resolved, run.train_log, resume=resume)
    health = run.health
    if health.exists():
        status = json.loads(health.read_text())
        if status.get("status") == "stopped":
            problem = status.get("problem", {})
            raise LoftError(f"the health guard stopped the run at step {problem.get('step')}: "
                            f"{problem.get('reason')}; causes and fixes in {health}", code=3)
    if not (run.adapter / "adapter_config.json").exists():
        raise LoftError(f"training finished but wrote no adapter in {run.adapter}; see {run.train_log}")
    return run_dir


def add_arguments(parser) -> None:
    parser.add_argument("recipe", type=Path, help="an Axolotl recipe, e.g. recipes/smollm2-135m/lora-cpu.yaml")
    parser.add_argument("--name", help="run name (default: <model folder>-<recipe>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable; unknown keys are rejected)")
    parser.add_argument("--no-check", action="store_true", help="skip `loft doctor` before training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run --name (or the default name) from its newest saved checkpoint "
                             "(after a kill or crash); train.log is appended to")


def run(args) -> int:
    train(args.recipe, args.name, args.overrides, check=not args.no_check, resume=args.resume)
    return 0
