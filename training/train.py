"""`loft train RECIPE`: doctor the recipe, resolve it into runs/<name>/, hand it to Axolotl with the guard.

Training is Axolotl's (`accelerate launch -m axolotl.cli.train`); this verb only adds the run folder,
overrides that fail loudly on unknown keys, the private environment, and all CPU threads on a CPU machine
(accelerate defaults a non-CPU launch to one OpenMP thread).
"""

import datetime
import json
import os
import re
import subprocess
import sys
from pathlib import Path

from training import lifecycle
from training import recipe as recipes
from training.errors import LoftError
from training.paths import REPO

HELP = "Doctor a recipe, then train it with Axolotl and the health guard into runs/<name>/ (--set key=value)."
EXAMPLE = "loft train recipes/smollm2-135m/lora-cpu.yaml --set max_steps=10 --name quick"


def launch(resolved: Path, log_path: Path | None = None, resume: bool = False) -> None:
    """Run Axolotl on a resolved recipe; its output is shown and kept in log_path (appended on resume; an
    earlier log is moved to train.log.1, .2, ... otherwise, never overwritten). Axolotl and accelerate run
    under the group supervisor, so a killed `loft train` takes them down instead of leaving a GPU busy."""
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(os.cpu_count() or 1))
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "-m", "axolotl.cli.train", str(resolved)]
    log = open_log(log_path, resume) if log_path else None
    proc = subprocess.Popen(lifecycle.supervised(cmd), cwd=REPO, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, errors="replace", start_new_session=True,
                            preexec_fn=lifecycle.die_with_parent())
    try:
        for line in proc.stdout:  # show Axolotl's own progress, keep a copy in train.log
            sys.stdout.write(line)
            if log:
                log.write(line)
        rc = proc.wait()
    finally:  # Ctrl-C reaches only us (the children have their own session): stop them before leaving
        lifecycle.stop(proc)
        if log:
            log.close()
    if rc != 0:
        where = f"; see {log_path}" if log_path else ""
        why = failure_reason(log_path) if log_path else None
        raise LoftError(f"Axolotl training failed (exit {rc}){f': {why}' if why else ''}{where}",
                        code=rc if 0 < rc < 128 else 1)


def open_log(path: Path, resume: bool):
    """train.log for appending (resume) or fresh, with an earlier log rotated to train.log.N, not overwritten."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and not resume:
        n = 1
        while path.with_name(f"{path.name}.{n}").exists():
            n += 1
        path.rename(path.with_name(f"{path.name}.{n}"))
    log = open(path, "a")
    if resume:
        log.write(f"\n===== loft train --resume {datetime.datetime.now().isoformat(timespec='seconds')} =====\n")
    return log


# The lines that say why a run died, in the order worth reporting (a traceback's last line comes after them).
_REASONS = (r"No space left on device", r"CUDA out of memory|OutOfMemoryError", r"Permission denied|Read-only file",
            r"^\w*(Error|Exception)\b.*")


def failure_reason(log_path: Path) -> str | None:
    """The line of Axolotl's log that says why it failed (a full disk, out of memory, the exception), or None."""
    lines = [line.strip() for line in log_tail(log_path).splitlines() if line.strip()]
    for pattern in _REASONS:
        found = [line for line in lines if re.search(pattern, line)]
        if found:
            return found[-1][:240]
    return None


def log_tail(path: Path, size: int = 64 << 10) -> str:
    """The last `size` bytes of a log."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, 2) - size))
            return fh.read().decode(errors="replace")
    except OSError:
        return ""


GUARD = "training.guard.HealthGuardPlugin"


def train(recipe: Path, name: str | None = None, overrides: list[str] | None = None, check: bool = True,
          resume: bool = False) -> Path:
    """Doctor, then train with the health guard; return the run folder (adapter in run_dir/adapter).

    resume: continue from the newest runs/<name>/adapter/checkpoint-* (Axolotl's auto_resume_from_checkpoints),
    e.g. after a kill or a crash; train.log is appended to."""
    overrides = [*(overrides or []), *(["auto_resume_from_checkpoints=true"] if resume else [])]
    run_dir, cfg = recipes.resolve(recipe, name, overrides)
    if resume and not list((run_dir / "adapter").glob("checkpoint-*")):
        print(f"loft train: --resume: no checkpoint in {run_dir / 'adapter'} yet (the run saved none before it "
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
    launch(resolved, run_dir / "train.log", resume=resume)
    health = run_dir / "adapter" / "health.json"
    if health.exists():
        status = json.loads(health.read_text())
        if status.get("status") == "stopped":
            problem = status.get("problem", {})
            raise LoftError(f"the health guard stopped the run at step {problem.get('step')}: "
                            f"{problem.get('reason')}; causes and fixes in {health}", code=3)
    if not (run_dir / "adapter" / "adapter_config.json").exists():
        raise LoftError(f"training finished but wrote no adapter in {run_dir / 'adapter'}; see {run_dir / 'train.log'}")
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
