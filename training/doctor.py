"""`loft doctor RECIPE`: find what would waste a GPU hour before the GPU is rented.

Every problem is collected and printed together, each with a stable code, a severity, the reason and the fix:

  LOFT-E0xx  the recipe file and Axolotl's own schema (YAML syntax, unknown keys, wrong types, Axolotl's rules)
  LOFT-D1xx  the data (files, JSONL lines, conversations, chat template, lengths, loss masking, DPO pairs):
             training/datacheck.py
  LOFT-L2xx  recipes that run but waste the run (coverage, LR schedule, overfit, clipping, memory hogs,
             packages): training/lints.py
  LOFT-M3xx  peak GPU memory on a profile (training/memory.py), with the cheapest change that fits;
             --measure runs it for real on a GPU (training/measure.py); with --gpus N, per GPU
  LOFT-P4xx  multi-GPU combinations Axolotl or DeepSpeed cannot run (training/parallel.py)
  LOFT-X001  the doctor itself failed on one check (a bug: please report it); the other checks still ran

Exit status: 0 clean (notes allowed), 1 warnings and --strict, 2 any error. A finding that is deliberate can be
silenced from the recipe with a comment naming its code and the reason, e.g.
`# loft-doctor: ignore LOFT-L202 (a demo: 0.08 epoch on purpose)`.
"""

import copy
import json
import re
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from training.errors import LoftError, guarded

HELP = "Check a recipe before training: schema, data, wasteful settings, and peak GPU memory on a GPU profile."
EXAMPLE = "loft doctor recipes/smollm2-135m/lora-cpu.yaml --gpu rtx5070-12gb"

SEVERITIES = ("error", "warning", "note")


@dataclass
class Finding:
    code: str
    severity: str
    reason: str
    fix: str
    where: str = ""


class Report:
    def __init__(self, recipe: Path, text: str = ""):
        self.recipe = recipe
        self.findings: list[Finding] = []
        self.lines = key_lines(text)
        self.ignored = set(re.findall(r"#\s*loft-doctor:\s*ignore\s+([A-Z0-9, -]+)", text))
        self.ignored = {c.strip() for group in self.ignored for c in re.split(r"[ ,]+", group) if c.strip()}
        self.suppressed: list[Finding] = []
        self.memory: dict | None = None
        self.data: dict = {}

    def add(self, code: str, severity: str, reason: str, fix: str, key: str | None = None, where: str = ""):
        if key is not None and not where:
            where = self.where(key)
        finding = Finding(code, severity, reason, fix, where or str(self.recipe))
        (self.suppressed if code in self.ignored else self.findings).append(finding)

    def where(self, key: str) -> str:
        line = self.lines.get(key) or self.lines.get(key.split(".")[0].split("[")[0])
        return f"{self.recipe}:{line}" if line else str(self.recipe)

    def count(self, severity: str) -> int:
        return sum(f.severity == severity for f in self.findings)

    def exit_code(self, strict: bool) -> int:
        return 2 if self.count("error") else 1 if strict and self.count("warning") else 0


def key_lines(text: str) -> dict[str, int]:
    """'learning_rate' -> 31, 'datasets[0]' -> 20, 'datasets[0].path' -> 20: where each key sits in the file."""
    import yaml

    try:
        root = yaml.compose(text)
    except Exception:  # the YAML error itself is reported by load()
        return {}
    out = {}
    if isinstance(root, yaml.MappingNode):
        for key, value in root.value:
            name = str(key.value)
            out.setdefault(name, key.start_mark.line + 1)
            if isinstance(value, yaml.SequenceNode):
                for i, item in enumerate(value.value):
                    out[f"{name}[{i}]"] = item.start_mark.line + 1
                    if isinstance(item, yaml.MappingNode):
                        for k, _ in item.value:
                            out[f"{name}[{i}].{k.value}"] = k.start_mark.line + 1
    return out


# ---------------------------------------------------------------- E0xx: the file and Axolotl's schema
def load_recipe(path: Path, report: Report) -> dict | None:
    from training import recipe

    try:
        return recipe.load(path)
    except LoftError as err:
        report.add("LOFT-E001", "error", str(err), "fix the file so it is a YAML mapping of Axolotl keys")
    except UnicodeDecodeError as err:
        report.add("LOFT-E001", "error", f"{path} is not UTF-8 text (byte {err.start}: {err.reason})",
                   "save the recipe as UTF-8; it may be a binary or truncated copy")
    except OSError as err:
        report.add("LOFT-E001", "error", f"cannot read {path}: {err.strerror}", "check the path and permissions")
    return None


def plugin_fields(cfg: dict, report: Report) -> set[str]:
    """Import each listed plugin (as Axolotl will) and return the recipe keys it adds."""
    from training import recipe as recipes

    plugins = cfg.get("plugins")
    if plugins is None:
        return set()
    if not isinstance(plugins, list) or not all(isinstance(p, str) and "." in p for p in plugins):
        report.add("LOFT-E005", "error", f"plugins must be a list of import paths, got {plugins!r}",
                   "plugins: [axolotl.integrations.liger.LigerPlugin, training.plugins.guard.HealthGuardPlugin]",
                   key="plugins")
        cfg.pop("plugins")
        return set()
    fields, good = set(), []
    for name in plugins:
        try:
            fields |= recipes.plugin_keys(name)
            good.append(name)
        except LoftError as err:
            report.add("LOFT-E005", "error", str(err).split("; check")[0],
                       "check the import path (module.Class) and that its package is installed; Loft's own are "
                       "training.plugins.guard.HealthGuardPlugin", key="plugins")
    cfg["plugins"] = good
    return fields


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("SFTDataset", "DPODataset", "KTODataset", "SyntheticDataset", "StepwiseSupervisedDataset") or \
                part in ("str", "float", "int", "bool", "list", "dict", "function-after", "function-before") or \
                str(part).startswith(("list[", "dict[", "literal[", "Literal[", "is-instance")):
            continue  # union-branch names are noise to a reader
        else:
            out += ("." if out else "") + str(part)
    return out


def schema(cfg: dict, report: Report):
    """Axolotl's own validation; returns the validated DictDefault (or None when it rejects the recipe)."""
    from pydantic import ValidationError

    from training.recipe import RecipeFacts, axolotl_keys, closest

    extra = plugin_fields(cfg, report)
    known = axolotl_keys() | extra
    for key in list(cfg):
        if not isinstance(key, str):
            report.add("LOFT-E002", "error", f"key {key!r} is not a name", "recipe keys are Axolotl option names")
            cfg.pop(key)
        elif key not in known:
            close = closest(key, known)
            liger = key.startswith("liger_") and not RecipeFacts.of(cfg).liger
            fix = (f"did you mean `{close}`?" if close and not liger else
                   "Liger keys need `plugins: [axolotl.integrations.liger.LigerPlugin]`" if liger else
                   "remove it, or list the plugin that defines it under plugins:")
            report.add("LOFT-E002", "error", f"unknown Axolotl key `{key}`: Axolotl would drop it silently", fix, key=key)
    _dataset_keys(cfg, report)

    from axolotl.utils.config import validate_config
    from axolotl.utils.dict import DictDefault

    candidate = {k: v for k, v in copy.deepcopy(cfg).items() if isinstance(k, str)}
    try:
        if candidate.get("plugins"):
            from axolotl.utils.config import prepare_plugins

            prepare_plugins(DictDefault(candidate))
        return validate_config(DictDefault(candidate))
    except ValidationError as err:
        by_key: dict[str, list[str]] = {}
        for e in err.errors():
            path = _loc(e.get("loc", ()))
            msg = e.get("msg", "").removeprefix("Value error, ").removeprefix("Assertion failed, ")
            if e.get("type") == "missing":
                msg = "required but missing"
            by_key.setdefault(path, [])
            if msg not in by_key[path]:
                by_key[path].append(msg)
        for path, msgs in by_key.items():
            if path:
                value = _get(cfg, path)
                report.add("LOFT-E003", "error", f"`{path}`: {' / '.join(msgs)} (got {value!r})"[:400],
                           f"set `{path}` to a value of the type Axolotl expects (see its config reference)", key=path)
            else:
                for msg in msgs:
                    report.add("LOFT-E004", "error", f"Axolotl rejects the recipe: {msg}"[:400],
                               "change the settings the message names")
    except Exception as err:  # Axolotl's validators can trip over odd values before pydantic does
        report.add("LOFT-E004", "error", f"Axolotl's validation failed: {type(err).__name__}: {err}"[:400],
                   "check the types of the keys involved (lists vs. single values, numbers vs. strings)")
    return None


def _get(cfg: dict, path: str):
    node = cfg
    for part in re.findall(r"[^.\[\]]+", path):
        try:
            node = node[int(part)] if isinstance(node, list) else node.get(part)
        except (ValueError, IndexError, AttributeError, TypeError):
            return None
    return node


def _dataset_keys(cfg: dict, report: Report):
    from axolotl.utils.schemas.datasets import DPODataset, KTODataset, SFTDataset, SyntheticDataset

    def fields(model) -> set[str]:
        return set(model.model_fields) | {f.alias for f in model.model_fields.values() if f.alias}

    from training.recipe import RecipeFacts, closest

    rl = RecipeFacts.of(cfg).rl
    default = fields(DPODataset if rl in ("dpo", "ipo", "simpo") else KTODataset if rl == "kto" else SFTDataset)
    synthetic = fields(SyntheticDataset)
    for section in ("datasets", "test_datasets"):
        entries = cfg.get(section)
        if entries is None:
            continue
        if not isinstance(entries, list):
            continue  # the schema check reports the type
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict):
                continue
            known = synthetic if entry.get("type") == "_synthetic" else default
            for key in entry:
                if isinstance(key, str) and key not in known:
                    close = closest(key, known)
                    report.add("LOFT-E006", "error", f"unknown dataset key `{key}` in {section}[{i}]: Axolotl "
                               "ignores it", f"did you mean `{close}`?" if close else "remove it",
                               key=f"{section}[{i}].{key}")


# ---------------------------------------------------------------- M3xx: memory
def memory(cfg: dict, report: Report, gpu: str | None, world: int = 1):
    from training import memory as mem

    arch = mem.find_arch(cfg.get("base_model")) if isinstance(cfg.get("base_model"), str) else None
    if not arch:
        report.add("LOFT-M303", "note", f"no architecture known for base_model `{cfg.get('base_model')}`: memory "
                   "not estimated", "copy the model's config.json into training/archs/<RepoName>.json",
                   key="base_model")
        return None, None
    est = mem.estimate(arch, mem.Setup.from_recipe(cfg, world))
    report.memory = {**est.to_dict(), "gpu": gpu, "world": world, "strategy": est.setup.parallel}
    if gpu:
        size = mem.gpu_gib(gpu)
        verdict = est.verdict(size)
        report.memory.update(gpu_gib=size, verdict=verdict)
        if verdict != "fits":
            found = mem.cheapest_fit(cfg, arch, size, world)
            if found:
                labels, change, after = found
                sets = " ".join(f"--set {k}={json.dumps(v, separators=(',', ':'))}" for k, v in change.items())
                fix = f"{' + '.join(labels)} → {after.needed:.1f} GiB: {sets}"
                report.memory["cheapest_fit"] = {"changes": labels, "overrides": change, "needed_gib": round(after.needed, 2)}
            else:
                fix = "no combination of checkpointing, Liger, smaller batches, 4-bit and shorter sequences fits: " \
                      "use a bigger GPU or a smaller model"
            code, sev = ("LOFT-M301", "error") if verdict == "does not fit" else ("LOFT-M302", "warning")
            name = gpu if gpu in mem.PROFILES else "this GPU"
            report.add(code, sev, f"needs about {est.needed:.1f} GiB on {name} ({size:g} GiB usable): {verdict}", fix)
    return arch, est


# ---------------------------------------------------------------- the verb
def diagnose(recipe_path: Path, gpu: str | None = None, data: bool = True, gpus: int = 1, nodes: int = 1) -> Report:
    recipe_path = Path(recipe_path)
    try:
        text = recipe_path.read_text(encoding="utf-8", errors="replace")
    except OSError:
        text = ""
    report = Report(recipe_path, text)
    cfg = load_recipe(recipe_path, report)
    if cfg is None:
        return report
    validated = _guarded(report, "schema", lambda: schema(cfg, report))
    if data:
        from training import datacheck

        _guarded(report, "data", lambda: datacheck.check(cfg, validated, report))
    arch_est = _guarded(report, "memory", lambda: memory(cfg, report, gpu, gpus * nodes)) or (None, None)
    from training import parallel

    _guarded(report, "multi-GPU", lambda: parallel.check(cfg, report, gpus, nodes))
    from training import lints

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
        from training.memory import PROFILES

        m = report.memory
        per = f" per GPU ({m['world']} ranks, {m['strategy']})" if m.get("world", 1) > 1 else ""
        lines.append(f"memory: {m['model']} ({m['params_b']:.2f} B params) — peak allocated{per} ≈ "
                     f"{m['allocated_gib']:.1f} GiB, needs ≈ {m['needed_gib']:.1f} GiB with allocator slack and CUDA "
                     "context")
        for part, gib in m["parts_gib"].items():
            lines.append(f"  {part:<36} {gib:6.2f} GiB")
        if m.get("verdict"):
            gpu = m["gpu"] if m["gpu"] in PROFILES else "a GPU"
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
        from training.memory import gpu_gib

        gpu_gib(args.gpu)  # an unknown profile is a usage error before any work
    if args.gpus < 1 or args.nodes < 1:
        raise LoftError(f"--gpus and --nodes must be at least 1 (got {args.gpus} and {args.nodes})")
    if args.measure:
        from training.measure import require_cuda

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
        from training.measure import measure

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
