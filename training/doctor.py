"""`loft doctor RECIPE`: find what would waste a GPU hour before the GPU is rented.

Every problem is collected and printed together, each with a stable code, a severity, the reason and the fix:

  LOFT-E0xx  the recipe file and Axolotl's own schema (YAML syntax, unknown keys, wrong types, Axolotl's rules):
             training/checks/schema.py
  LOFT-D1xx  the data (files, JSONL lines, conversations, chat template, lengths, loss masking, DPO pairs):
             training/checks/datacheck.py
  LOFT-L2xx  recipes that run but waste the run (coverage, LR schedule, overfit, clipping, memory hogs,
             packages): training/checks/lints.py
  LOFT-M3xx  peak GPU memory on a profile (training/checks/memory.py), with the cheapest change that fits
             (training/checks/fit.py); --measure runs it for real on a GPU (training/checks/measure.py); with
             --gpus N, per GPU
  LOFT-P4xx  multi-GPU combinations Axolotl or DeepSpeed cannot run (training/parallel.py)
  LOFT-X001  the doctor itself failed on one check (a bug: please report it); the other checks still ran

Exit status: 0 clean (notes allowed), 1 warnings and --strict, 2 any error. A finding that is deliberate can be
silenced from the recipe with a comment naming its code and the reason, e.g.
`# loft-doctor: ignore LOFT-L202 (a demo: 0.08 epoch on purpose)`.
"""

import json
import sys
from dataclasses import asdict
from pathlib import Path

from training import parallel
from training.checks import datacheck, fit, lints, schema
from training.checks.report import SEVERITIES, Report
from training.errors import LoftError, guarded

HELP = "Check a recipe before training: schema, data, wasteful settings, and peak GPU memory on a GPU profile."
EXAMPLE = "loft doctor recipes/smollm2-135m/lora-cpu.yaml --gpu rtx5070-12gb"


# ---------------------------------------------------------------- the verb
def diagnose(recipe_path: Path, gpu: str | None = None, data: bool = True, gpus: int = 1, nodes: int = 1) -> Report:
    recipe_path = Path(recipe_path)
    try:
        text = recipe_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    report = Report(recipe_path, text)
    cfg = schema.load_recipe(recipe_path, report)
    if cfg is None:
        return report
    validated = _guarded(report, "schema", lambda: schema.check(cfg, report))
    if data:
        _guarded(report, "data", lambda: datacheck.check(cfg, validated, report))
    arch_est = _guarded(report, "memory", lambda: fit.check(cfg, report, gpu, gpus * nodes)) or (None, None)
    _guarded(report, "multi-GPU", lambda: parallel.check(cfg, report, gpus, nodes))
    _guarded(report, "lints", lambda: lints.check(cfg, report, *arch_est))
    return report


def _guarded(report: Report, stage: str, fn):
    try:
        return fn()
    except LoftError:
        raise
    except Exception as err:
        report.add("LOFT-X001", "error", f"the doctor's {stage} check crashed: {type(err).__name__}: {err}"[:400],
                   "this is a Loft bug: please report it with the recipe; the other checks still ran")
        return None


def render(report: Report, strict: bool) -> str:
    lines = [f"loft doctor: {report.recipe}"]
    order = {s: i for i, s in enumerate(SEVERITIES)}
    for f in sorted(report.findings, key=lambda f: order.get(f.severity, 9)):
        lines.append(f"{f.severity:>7} {f.code} {f.where}")
        lines.append(f"          {f.reason}")
        lines.append(f"     fix: {f.fix}")
    if report.data.get("summary"):
        lines.append(f"data: {report.data['summary']}")
    if report.memory:
        m = report.memory
        per = f" per GPU ({m['world']} ranks, {m['strategy']})" if m.get("world", 1) > 1 else ""
        lines.append(f"memory: {m['model']} ({m['params_b']:.2f} B params) — peak allocated{per} ≈ "
                     f"{m['allocated_gib']:.1f} GiB, needs ≈ {m['needed_gib']:.1f} GiB with allocator slack and CUDA "
                     "context")
        for part, gib in m["parts_gib"].items():
            lines.append(f"  {part:<36} {gib:6.2f} GiB")
        if m.get("verdict"):
            gpu = m["gpu"] if m["gpu"] in fit.PROFILES else "a GPU"
            lines.append(f"  on {gpu} ({m['gpu_gib']:g} GiB usable): {m['verdict']}")
        lines += [f"  note: {n}" for n in m["notes"]]
    if report.suppressed:
        lines.append(f"ignored by the recipe: {', '.join(sorted({f.code for f in report.suppressed}))}")
    code = report.exit_code(strict)
    lines.append(f"{report.count('error')} error(s), {report.count('warning')} warning(s), {report.count('note')} "
                 f"note(s) → exit {code}" + (" (1 with --strict)" if code == 0 and report.count("warning") else ""))
    return "\n".join(lines)


def to_json(report: Report, strict: bool) -> str:
    return json.dumps({"recipe": str(report.recipe), "exit_code": report.exit_code(strict),
                       "findings": [asdict(f) for f in report.findings],
                       "ignored": [asdict(f) for f in report.suppressed],
                       "data": report.data, "memory": report.memory}, indent=2, default=str)


def add_arguments(parser) -> None:
    parser.add_argument("recipe", type=Path, help="an Axolotl recipe, e.g. recipes/qwen2.5-7b/qlora-sft-8gb.yaml")
    parser.add_argument("--gpu", metavar="PROFILE",
                        help="judge memory on rtx5070-12gb, rtx5090-32gb, a100-40gb, a100-80gb, h100-80gb, or N (GiB)")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="judge the run `loft train --gpus N` makes: memory per GPU, multi-GPU combinations")
    parser.add_argument("--nodes", type=int, default=1, metavar="M", help="hosts, for --gpus N on each (default 1)")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--strict", action="store_true", help="exit 1 on warnings")
    parser.add_argument("--no-data", action="store_true", help="skip the dataset checks (faster)")
    parser.add_argument("--measure", action="store_true",
                        help="GPU only: train a random-initialised model of the exact architecture for a few steps "
                             "and print measured peak memory next to the estimate")
    parser.add_argument("--measure-steps", type=int, default=4, help="steps for --measure (default 4)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="check the recipe with a value changed, e.g. --set sequence_len=4096 (repeatable)")


def with_overrides(recipe: Path, overrides: list[str]) -> Path:
    """The recipe with --set values applied, written to runs/doctor/ (the file the checks then read)."""
    import hashlib

    import yaml

    from training import recipe as recipes
    from training.lifecycle import write_atomic
    from training.paths import RUNS

    cfg = recipes.apply_overrides(recipes.load(recipe), overrides)
    tag = hashlib.sha256("\n".join(overrides).encode()).hexdigest()[:8]
    out = RUNS / "doctor" / f"{recipes.default_run_name(recipe)}-{tag}.yaml"
    out.parent.mkdir(parents=True, exist_ok=True)
    return write_atomic(out, f"# {recipe} with " + " ".join(f"--set {o}" for o in overrides) + "\n"
                        + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))


def run(args) -> int:
    if args.gpu:
        fit.gpu_gib(args.gpu)  # an unknown profile is a usage error before any work
    if args.gpus < 1 or args.nodes < 1:
        raise LoftError(f"--gpus and --nodes must be at least 1 (got {args.gpus} and {args.nodes})")
    if args.measure:
        from training.checks.measure import require_cuda

        require_cuda()
    if args.overrides:
        args.recipe = with_overrides(args.recipe, args.overrides)
    if args.json:  # keep stdout pure JSON: libraries print banners while the checks run
        import contextlib

        with contextlib.redirect_stdout(sys.stderr):
            report = diagnose(args.recipe, args.gpu, not args.no_data, args.gpus, args.nodes)
    else:
        report = diagnose(args.recipe, args.gpu, not args.no_data, args.gpus, args.nodes)
    print(to_json(report, args.strict) if args.json else render(report, args.strict))
    if args.measure and report.count("error") == 0:
        from training.checks.measure import measure

        measure(args.recipe, report, steps=args.measure_steps)
    return report.exit_code(args.strict)


def main(argv: list[str] | None = None) -> int:
    """`python -m training.doctor` (until `loft doctor` is registered in cli.py)."""
    import argparse

    from training.paths import apply_private_env

    parser = argparse.ArgumentParser(prog="loft doctor", description=HELP, epilog=f"example: {EXAMPLE}")
    add_arguments(parser)
    args = parser.parse_args(argv)
    apply_private_env()
    return guarded("loft doctor", run, args)


if __name__ == "__main__":
    sys.exit(main())
