"""Recipes: read an Axolotl YAML, apply `key=value` overrides, write the resolved copy into the run folder.

This is the one place config plumbing lives. Overrides must name keys Axolotl knows (its own pydantic
schema decides), so a typo fails here instead of being dropped silently.
"""

import difflib
import sys
from pathlib import Path

import yaml

from training.errors import LoftError
from training.lifecycle import write_atomic
from training.paths import RUNS


def load(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise LoftError(f"recipe {path} not found; recipes live in recipes/<model>/<recipe>.yaml")
    try:
        cfg = yaml.safe_load(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise LoftError(f"{path} is not UTF-8 text; save it as UTF-8") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark else str(path)
        problem = getattr(err, "problem", None) or str(err).splitlines()[0]
        raise LoftError(f"{where}: YAML syntax error: {problem}; fix the indentation or quoting there") from None
    if not isinstance(cfg, dict):
        raise LoftError(f"{path}: a recipe is a YAML mapping of Axolotl keys, got {type(cfg).__name__}")
    return cfg


def plugin_keys(path: str) -> set[str]:
    """The recipe keys one plugin adds: Axolotl merges its get_input_args() model into the schema at load."""
    import importlib

    module, cls = path.rsplit(".", 1) if "." in path else (path, "")
    try:
        try:
            mod = importlib.import_module(module)
        except ModuleNotFoundError:
            mod = importlib.import_module("axolotl.integrations." + module)
        args = getattr(mod, cls)().get_input_args() or []
        keys = set()
        for arg in [args] if isinstance(args, str) else args:
            arg_module, arg_cls = arg.rsplit(".", 1)
            for name, field in getattr(importlib.import_module(arg_module), arg_cls).model_fields.items():
                keys |= {name, field.alias} - {None}
        return keys
    except Exception as err:  # ImportError, AttributeError, or the plugin's own failure
        raise LoftError(f"plugin `{path}` cannot be loaded: {type(err).__name__}: {err}; check the import path "
                        "(module.Class) and that its package is installed") from None


def axolotl_keys(plugins: list[str] | None = None) -> set[str]:
    """Every top-level key Axolotl 0.19's schema accepts, plus the keys the recipe's plugins add."""
    from axolotl.utils.schemas.config import AxolotlInputConfig

    keys = set()
    for name, field in AxolotlInputConfig.model_fields.items():
        keys |= {name, field.alias} - {None}
    for path in plugins or []:
        keys |= plugin_keys(path)
    return keys


def check_key(key: str, known: set[str]) -> None:
    if key not in known:
        close = difflib.get_close_matches(key, known, n=1)
        hint = f"; did you mean `{close[0]}`?" if close else ""
        raise LoftError(f"unknown Axolotl key `{key}`{hint}")


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """`--set key=value` (value parsed as YAML); nested keys with dots: `trl.beta=0.1`."""
    if not overrides:
        return cfg
    for item in overrides:  # plugins first: the keys they add (Liger's `liger_*`) become valid for the rest
        if item.startswith("plugins="):
            cfg["plugins"] = yaml.safe_load(item.split("=", 1)[1]) or []
    known = axolotl_keys(cfg.get("plugins"))
    for item in overrides:
        if "=" not in item:
            raise LoftError(f"override `{item}` is not key=value (example: --set learning_rate=1e-4)")
        key, raw = item.split("=", 1)
        check_key(key.split(".")[0], known)
        value = yaml.safe_load(raw) if raw else None
        if isinstance(value, bool) and raw.strip().lower() not in ("true", "false"):
            # YAML 1.1 reads yes/no/on/off/y/n as booleans: say so, since `--set key=no` may have meant the word
            print(f"loft: note: --set {item} reads {raw!r} as boolean {str(value).lower()}; for the text, quote it: "
                  f"--set '{key}=\"{raw}\"'", file=sys.stderr)
        if isinstance(value, str):  # YAML 1.1 reads "1e-4" as a string; Axolotl wants the number
            try:
                value = float(value)
            except ValueError:
                pass
        node, parts = cfg, key.split(".")
        try:
            for part in parts[:-1]:  # a number indexes a list: datasets.0.path=...
                node = node[int(part)] if isinstance(node, list) else node.setdefault(part, {})
            if isinstance(node, list):
                node[int(parts[-1])] = value
            else:
                node[parts[-1]] = value
        except (ValueError, IndexError, TypeError, AttributeError):
            raise LoftError(f"override `{key}` does not match the recipe's structure "
                            "(lists take a number: datasets.0.path=...)") from None
    return cfg


def default_run_name(recipe: Path) -> str:
    return f"{recipe.resolve().parent.name}-{recipe.stem}"


def check_run_name(name: str) -> str:
    """A run name is one folder under runs/: no path separators, not `.`/`..`, not empty."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or name != name.strip():
        raise LoftError(f"run name {name!r} must be a plain folder name under runs/ (letters, digits, - _ .), "
                        "e.g. --name qwen-r32")
    return name


def resolve(recipe: Path, name: str | None, overrides: list[str]) -> tuple[Path, dict]:
    """Return (run_dir, resolved cfg) with outputs pointed into runs/<name>/."""
    if name is not None:
        check_run_name(name)
    cfg = apply_overrides(load(recipe), overrides)
    run_dir = RUNS / (name or default_run_name(recipe))
    cfg["output_dir"] = str(run_dir / "adapter")
    cfg["dataset_prepared_path"] = str(run_dir / "prepared")
    return run_dir, cfg


def write(cfg: dict, run_dir: Path, recipe: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = run_dir / "recipe.yaml"
    header = f"# Resolved by loft from {recipe} (overrides applied). Axolotl trained this exact file.\n"
    return write_atomic(out, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
