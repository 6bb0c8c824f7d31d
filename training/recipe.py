"""Recipes: read an Axolotl YAML, apply `key=value` overrides, write the resolved copy into the run folder.

This is the one place config plumbing lives. Overrides must name keys Axolotl knows (its own pydantic
schema decides), so a typo fails here instead of being dropped silently. `RecipeFacts.of(cfg)` is the one reading
of the keys that decide what kind of run a recipe is (method, bits, preference loss, sequence length, kernels,
launcher): every other module asks it rather than reading those keys itself.
"""

import difflib
import sys
from dataclasses import dataclass
from pathlib import Path

import yaml

from training.errors import LoftError
from training.lifecycle import write_atomic
from training.paths import RunDir


# Preference losses: datasets of (prompt, chosen, rejected) or KTO's labelled completions instead of chats. All but
# KTO score a chosen and a rejected completion per row: two sequences per row through the model.
PAIRED = ("dpo", "ipo", "orpo", "simpo")
PREFERENCE = (*PAIRED, "kto")
# The losses that compare the policy with a reference model (an adapter's disabled base, or a second copy).
WITH_REFERENCE = ("dpo", "ipo")
DEFAULT_SEQUENCE_LEN = 2048  # what Loft assumes when a recipe sets none


KERNELS = ("lora_mlp_kernel", "lora_qkv_kernel", "lora_o_kernel", "lora_embedding_kernel")  # Axolotl's flags


def lora_qkv_kernel(cfg: dict, adapter: str | None, rl: str | None, fsdp_version: int) -> bool:
    """Axolotl 0.19's fused LoRA Q/K/V kernel: the recipe's flag, or, unset, Axolotl's own choice
    (check_auto_enable_lora_kernels: on for LoRA/QLoRA without rl, no kernel flag set, not 8-bit LoRA, no remote
    code, not FSDP1)."""
    if cfg.get("lora_qkv_kernel") is not None:
        return cfg.get("lora_qkv_kernel") is True
    if rl or not adapter or any(cfg.get(k) is not None for k in KERNELS):
        return False
    if (adapter == "lora" and cfg.get("load_in_8bit")) or cfg.get("trust_remote_code"):
        return False
    return fsdp_version != 1


@dataclass(frozen=True)
class RecipeFacts:
    """What kind of run a recipe asks for, read once with one rule per fact (a raw YAML mapping may hold anything:
    a fact that is not a value of the right type counts as unset)."""

    adapter: str | None  # "lora" | "qlora" | None (full fine-tuning)
    bits: int  # 4 (load_in_4bit or a QLoRA adapter), 8 (load_in_8bit) or 16
    quant_key: str  # the key that asks for k-bit loading: "load_in_4bit", "load_in_8bit" or "adapter"
    rl: str | None  # Axolotl's `rl:` value, None for supervised fine-tuning
    sequence_len: int  # the recipe's, else DEFAULT_SEQUENCE_LEN
    sequence_len_set: bool  # whether the recipe sets a sequence length itself
    liger: bool  # the Liger plugin is loaded
    fused_cross_entropy: bool  # Liger's fused linear cross-entropy or the cut cross-entropy plugin
    liger_layers: bool  # Liger's RMSNorm or GLU kernels
    deepspeed: str | None  # the DeepSpeed config the recipe names
    fsdp: bool  # the recipe shards with FSDP (fsdp or fsdp_config)
    fsdp_version: int  # 1 or 2 when it does (fsdp_version, top level or inside fsdp_config), else 0
    fsdp_options: dict  # the fsdp_config mapping ({} when absent); keys with or without Axolotl's fsdp_ prefix
    lora_qkv_kernel: bool  # Axolotl's fused LoRA Q/K/V kernel runs: set, or left to Axolotl, which turns it on

    @classmethod
    def of(cls, cfg: dict) -> "RecipeFacts":
        cfg = cfg if isinstance(cfg, dict) else {}
        adapter = cfg.get("adapter") if cfg.get("adapter") in ("lora", "qlora") else None
        bits = 4 if cfg.get("load_in_4bit") or adapter == "qlora" else 8 if cfg.get("load_in_8bit") else 16
        quant_key = next((key for key in ("load_in_4bit", "load_in_8bit") if cfg.get(key)), "adapter")
        rl = cfg.get("rl") if isinstance(cfg.get("rl"), str) and cfg.get("rl") else None
        seq = cfg.get("sequence_len")
        seq_set = isinstance(seq, (int, float)) and not isinstance(seq, bool) and seq > 0
        plugins = cfg.get("plugins") if isinstance(cfg.get("plugins"), list) else []
        plugins = [p for p in plugins if isinstance(p, str)]
        liger = any("liger" in p.lower() for p in plugins)
        cce = any("cut_cross_entropy" in p for p in plugins) and cfg.get("cut_cross_entropy", True) is not False
        deepspeed = cfg.get("deepspeed")
        options = cfg.get("fsdp_config") if isinstance(cfg.get("fsdp_config"), dict) else {}
        fsdp = bool(cfg.get("fsdp") or cfg.get("fsdp_config"))
        fsdp_version = (2 if str(cfg.get("fsdp_version") or options.get("fsdp_version") or options.get("version")
                                 or 1) == "2" else 1) if fsdp else 0
        return cls(
            adapter=adapter,
            bits=bits,
            quant_key=quant_key,
            rl=rl,
            sequence_len=int(seq) if seq_set else DEFAULT_SEQUENCE_LEN,
            sequence_len_set=seq_set,
            liger=liger,
            fused_cross_entropy=(liger and bool(cfg.get("liger_fused_linear_cross_entropy"))) or cce,
            liger_layers=liger and bool(cfg.get("liger_rms_norm") or cfg.get("liger_glu_activation")),
            deepspeed=str(deepspeed) if deepspeed else None,
            fsdp=fsdp,
            fsdp_version=fsdp_version,
            fsdp_options=options,
            lora_qkv_kernel=lora_qkv_kernel(cfg, adapter, rl, fsdp_version),
        )

    @property
    def method(self) -> str:
        return self.adapter or "full"

    @property
    def preference(self) -> bool:
        """A preference loss (DPO, IPO, ORPO, SimPO, KTO): its datasets are pairs, not chats."""
        return self.rl in PREFERENCE

    @property
    def paired(self) -> bool:
        """Each row is a chosen and a rejected completion: two sequences per row."""
        return self.rl in PAIRED

    @property
    def reference(self) -> bool:
        """The loss compares with a reference model; without an adapter that is a second full copy."""
        return self.rl in WITH_REFERENCE

    @property
    def launcher(self) -> str:
        """How the recipe spreads over GPUs: "deepspeed", "fsdp" or "single"."""
        return "deepspeed" if self.deepspeed else "fsdp" if self.fsdp else "single"


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


def closest(key: str, known: set[str]) -> str | None:
    """The known key a typo most likely meant, if any is close."""
    close = difflib.get_close_matches(key, known, n=1)
    return close[0] if close else None


def check_key(key: str, known: set[str]) -> None:
    if key not in known:
        close = closest(key, known)
        hint = f"; did you mean `{close}`?" if close else ""
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
    run = RunDir.named(name or default_run_name(recipe))
    cfg["output_dir"] = str(run.adapter)
    cfg["dataset_prepared_path"] = str(run.prepared)
    return run.path, cfg


def write(cfg: dict, run_dir: Path, recipe: Path) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    out = RunDir(run_dir).recipe
    header = f"# Resolved by loft from {recipe} (overrides applied). Axolotl trained this exact file.\n"
    return write_atomic(out, header + yaml.safe_dump(cfg, sort_keys=False, allow_unicode=True))
