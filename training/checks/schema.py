"""LOFT-E0xx of `loft doctor`: the recipe file and Axolotl's own schema (YAML syntax, unknown keys with the closest
known one, wrong types, Axolotl's own rules), every problem as a finding instead of Axolotl's first exception."""

import copy
import re
from pathlib import Path

from training import recipe as recipes
from training.checks.report import Report
from training.errors import LoftError
from training.recipe import RecipeFacts, axolotl_keys, closest


def load_recipe(path: Path, report: Report) -> dict | None:
    try:
        return recipes.load(path)
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


def check(cfg: dict, report: Report):
    """Axolotl's own validation; returns the validated DictDefault (or None when it rejects the recipe)."""
    from pydantic import ValidationError

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
