"""`loft train RECIPE`: doctor the recipe, resolve it into runs/<name>/, hand it to Axolotl with the guard.

Training is Axolotl's (`accelerate launch -m axolotl.cli.train`, run by training/axolotl.py); this verb only adds
the run folder, overrides that fail loudly on unknown keys, the private environment, --resume, and the topology
(training/launcher.py: one process, or --gpus N / --nodes M through accelerate).
"""

import json
import shlex
import sys
from pathlib import Path

from training import recipe as recipes
from training.axolotl import GUARD, launch
from training.errors import LoftError
from training.launcher import DEFAULT_PORT, Topology, check_devices, command
from training.paths import REPO, RunDir

HELP = "Doctor a recipe, then train it with Axolotl and the health guard into runs/<name>/ (--set key=value)."
EXAMPLE = ("loft train recipes/smollm2-135m/lora-cpu.yaml --set max_steps=10 --name quick\n"
           "         loft train recipes/llama-3.1-8b/lora-bf16-ddp-80gb.yaml --gpus 2")
CPU_RANKS = "training.plugins.cpu_ranks.CPURanksPlugin"


def train(recipe: Path, name: str | None = None, overrides: list[str] | None = None, check: bool = True,
          resume: bool = False, topo: Topology | None = None, print_only: bool = False) -> Path:
    """Doctor, then train with the health guard; return the run folder (adapter in run_dir/adapter).

    resume: continue from the newest runs/<name>/adapter/checkpoint-* (Axolotl's auto_resume_from_checkpoints),
    e.g. after a kill or a crash; train.log is appended to.
    print_only: write the resolved recipe and print the launch command instead (e.g. to check a multi-node line)."""
    topo = topo or Topology()
    topo.check()
    note = None if print_only else check_devices(topo)
    overrides = [*(overrides or []), *(["auto_resume_from_checkpoints=true"] if resume else [])]
    run_dir, cfg = recipes.resolve(recipe, name, overrides)
    run = RunDir(run_dir)
    if resume and not list(run.adapter.glob("checkpoint-*")):
        print(f"loft train: --resume: no checkpoint in {run.adapter} yet (the run saved none before it "
              "stopped); starting from step 0", file=sys.stderr)
    if GUARD not in (cfg.get("plugins") or []):
        cfg["plugins"] = [*(cfg.get("plugins") or []), GUARD]
    if note:  # ranks without a GPU: their models go to the CPU (training/plugins/cpu_ranks.py)
        cfg["plugins"].append(CPU_RANKS)
    resolved = recipes.write(cfg, run_dir, recipe)
    if print_only:
        print(shlex.join(command(resolved.relative_to(REPO) if resolved.is_relative_to(REPO) else resolved, topo)))
        return run_dir
    if check:
        from training.doctor import diagnose, render

        report = diagnose(resolved, gpus=topo.gpus, nodes=topo.nodes)
        print(render(report, strict=False))
        if report.count("error"):
            raise LoftError(f"loft doctor found {report.count('error')} error(s) in {recipe} (above); "
                            "fix them, or pass --no-check to train anyway")
    print(f"loft train: {recipe} -> {run_dir}" + (f" on {topo.world} processes" if topo.world > 1 else ""))
    if note:
        print(f"loft train: {note}")
    launch(resolved, run.train_log, resume=resume, topo=topo)
    health = run.health
    if health.exists():
        status = json.loads(health.read_text())
        if status.get("status") == "stopped":
            problem = status.get("problem", {})
            raise LoftError(f"the health guard stopped the run at step {problem.get('step')}: "
                            f"{problem.get('reason')}; causes and fixes in {health}", code=3)
    full = recipes.RecipeFacts.of(cfg).adapter is None  # a full fine-tune writes a whole model folder, not an adapter
    if not (run.adapter / ("config.json" if full else "adapter_config.json")).exists():
        what = "model" if full else "adapter"
        raise LoftError(f"training finished but wrote no {what} in {run.adapter}; see {run.train_log}")
    return run_dir


def add_arguments(parser) -> None:
    parser.add_argument("recipe", type=Path, help="an Axolotl recipe, e.g. recipes/smollm2-135m/lora-cpu.yaml")
    parser.add_argument("--name", help="run name (default: <model folder>-<recipe>)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key (repeatable; unknown keys are rejected)")
    parser.add_argument("--no-check", action="store_true", help="skip `loft doctor` before training")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="GPUs (processes) on this host: DDP, ZeRO or FSDP2 as the recipe's keys say (default 1)")
    parser.add_argument("--nodes", type=int, default=1, metavar="M", help="hosts taking part (default 1)")
    parser.add_argument("--node-rank", type=int, default=0, metavar="R", help="this host's number, 0 to M-1")
    parser.add_argument("--master-addr", metavar="ADDR", help="address of the --node-rank 0 host (with --nodes)")
    parser.add_argument("--master-port", type=int, metavar="PORT",
                        help=f"its rendezvous port (default {DEFAULT_PORT} across hosts, a free one on one host)")
    parser.add_argument("--print-command", action="store_true",
                        help="write runs/<name>/recipe.yaml and print the launch command instead of training")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run --name (or the default name) from its newest saved checkpoint "
                             "(after a kill or crash); train.log is appended to")


def run(args) -> int:
    topo = Topology(args.gpus, args.nodes, args.node_rank, args.master_addr, args.master_port)
    train(args.recipe, args.name, args.overrides, check=not args.no_check, resume=args.resume, topo=topo,
          print_only=args.print_command)
    return 0
