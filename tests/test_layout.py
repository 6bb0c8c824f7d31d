"""The floor plan: no import cycle between Loft's modules, imports inside functions included (a lazy import
hides a cycle from Python but not from a reader who has to know what depends on what)."""

import ast
import re

from training.paths import REPO

PACKAGES = ("training", "benchmarks")


def modules() -> dict[str, ast.Module]:
    found = {}
    for package in PACKAGES:
        for path in sorted((REPO / package).rglob("*.py")):
            parts = path.relative_to(REPO).with_suffix("").parts
            name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
            found[name] = ast.parse(path.read_text(encoding="utf-8"), str(path))
    return found


def imports(name: str, tree: ast.Module, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its body; `from pkg import mod` counts as importing mod."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against this module's package
                package = name.split(".")[: len(name.split(".")) - node.level]
                base = ".".join(package + ([base] if base else []))
            out.add(base)
            out |= {f"{base}.{alias.name}" for alias in node.names}
    return {target for target in out if target in known and target != name and target not in PACKAGES}


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    path: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        path.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return path[path.index(nxt):] + [nxt]
            if nxt not in state and (cycle := visit(nxt)):
                return cycle
        path.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node)):
            return cycle
    return None


def test_the_walker_sees_a_lazy_import_cycle():
    a = ast.parse("def f():\n    from pkg import b\n")
    b = ast.parse("import pkg.a\n")
    known = {"pkg.a", "pkg.b"}
    graph = {"pkg.a": imports("pkg.a", a, known), "pkg.b": imports("pkg.b", b, known)}
    assert find_cycle(graph) == ["pkg.a", "pkg.b", "pkg.a"]


def test_no_import_cycle():
    trees = modules()
    graph = {name: imports(name, tree, set(trees)) for name, tree in trees.items()}
    assert graph["training.train"], "the walker found no imports at all"
    assert "training.merging.plan" in graph["training.merge"], "the walker does not see sub-packages"
    cycle = find_cycle(graph)
    assert cycle is None, "import cycle: " + " -> ".join(cycle)


# The recipe keys that decide what kind of run a recipe is: training.recipe.RecipeFacts reads them, nobody else.
DECIDED = {"adapter", "load_in_4bit", "load_in_8bit", "rl", "sequence_len", "liger_fused_linear_cross_entropy",
           "liger_rms_norm", "liger_glu_activation", "cut_cross_entropy", "deepspeed", "fsdp", "fsdp_config"}
# Reads of those names that are not a recipe: (module, the mapping read, why).
NOT_A_RECIPE = {
    ("training.merging.sources", "quant"): "a checkpoint's quantization_config",
    ("training.merge", "report"): "the merge report",
    ("benchmarks.speed_figures", "r['data']"): "a benchmark result's data section",
    ("benchmarks.peers.table", "run['data']"): "a benchmark result's data section",
}


def raw_reads(tree: ast.Module) -> list[tuple[int, str, str]]:
    """(line, mapping, key) for every `x.get("key"...)` and `x["key"]` read of a DECIDED key."""
    found = []
    for node in ast.walk(tree):
        if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "get"
                and node.args and isinstance(node.args[0], ast.Constant) and node.args[0].value in DECIDED):
            found.append((node.lineno, ast.unparse(node.func.value), node.args[0].value))
        elif (isinstance(node, ast.Subscript) and isinstance(node.ctx, ast.Load)
              and isinstance(node.slice, ast.Constant) and node.slice.value in DECIDED):
            found.append((node.lineno, ast.unparse(node.value), node.slice.value))
        elif (isinstance(node, ast.Compare) and isinstance(node.left, ast.Constant) and node.left.value in DECIDED
              and any(isinstance(op, (ast.In, ast.NotIn)) for op in node.ops)):
            found.append((node.lineno, ast.unparse(node.comparators[0]), node.left.value))
    return found


def test_the_reader_sees_raw_reads():
    tree = ast.parse("a = cfg.get('rl')\nb = cfg['sequence_len']\nc = 'adapter' in cfg\ncfg['rl'] = 'dpo'\n")
    assert [(line, key) for line, _, key in sorted(raw_reads(tree))] == [(1, "rl"), (2, "sequence_len"), (3, "adapter")]


def test_recipe_facts_are_read_in_one_module():
    offenders = []
    for name, tree in modules().items():
        if name == "training.recipe":
            continue
        for line, mapping, key in raw_reads(tree):
            if (name, mapping.replace('"', "'")) not in NOT_A_RECIPE:
                offenders.append(f"{name.replace('.', '/')}.py:{line}: {mapping}[{key!r}]")
    assert not offenders, ("read these through training.recipe.RecipeFacts.of(cfg) (add the fact there if it is "
                           "missing):\n" + "\n".join(offenders))


def run_dir_spellings(tree: ast.Module) -> list[tuple[int, str]]:
    """(line, name) for every file name of a run folder written out as a string, and every run-folder sub-folder
    name joined onto a path (`x / "adapter"`) or compared with a folder's name."""
    from training.paths import RunDir

    names = {v for k, v in vars(RunDir).items() if k.isupper() and isinstance(v, str) and "*" not in v}
    files = {name for name in names if "." in name}
    folders = {RunDir.ADAPTER, RunDir.PREPARED, RunDir.FIGURES}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and node.value in files:
            found.append((node.lineno, node.value))
        operands = ([node.left, node.right] if isinstance(node, ast.BinOp) and isinstance(node.op, ast.Div) else
                    [node.left, *node.comparators] if isinstance(node, ast.Compare) else [])
        found += [(o.lineno, o.value) for o in operands if isinstance(o, ast.Constant) and o.value in folders]
    return found


def test_the_reader_sees_run_dir_spellings():
    tree = ast.parse("a = run / 'adapter'\nb = run / 'train.log'\nc = d.name == 'adapter'\ne = {'adapter': 1}\n")
    assert sorted(run_dir_spellings(tree)) == [(1, "adapter"), (2, "train.log"), (3, "adapter")]


def test_run_folder_names_come_from_run_dir():
    offenders = [f"{name.replace('.', '/')}.py:{line}: {spelled!r}" for name, tree in modules().items()
                 if name != "training.paths" for line, spelled in run_dir_spellings(tree)]
    assert not offenders, "use training.paths.RunDir for these run-folder names:\n" + "\n".join(offenders)


# Tracker shorthand a reader of the code cannot decode: "issue #8", "target 4", "T3", a bare "#8".
SHORTHAND = re.compile(r"(?i:\bissues? #?\d+|\btargets? \d\b)|\bT\d\b|(?<![\w/&])#\d+\b")


def test_no_tracker_shorthand_in_code_or_recipes():
    paths = [*sorted((REPO / "training").rglob("*.py")), *sorted((REPO / "benchmarks").glob("*.py")),
             *sorted((REPO / "benchmarks" / "gpu").iterdir()), *sorted((REPO / "recipes").rglob("*.yaml")),
             REPO / "recipes" / "README.md", REPO / "benchmarks" / "RESULTS.md", REPO / "README.md"]
    found = [f"{path.relative_to(REPO)}:{n}: {line.strip()}" for path in paths
             for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1) if SHORTHAND.search(line)]
    assert not found, "say it in plain words:\n" + "\n".join(found)


def test_recipes_name_loft_code_only_under_training_plugins():
    """A dotted path a recipe hands Axolotl (`plugins:`, `trainer_cls:`) is public API: it lives in training/plugins/
    and names a class that is there (checked on the source, without importing Axolotl)."""
    import yaml

    named = []
    for path in sorted((REPO / "recipes").rglob("*.yaml")):
        cfg = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
        dotted = [*(cfg.get("plugins") or []), cfg.get("trainer_cls")]
        named += [(path.relative_to(REPO), d) for d in dotted if isinstance(d, str) and d.startswith("training.")]
    assert named, "no recipe names Loft's own code: the guard should be listed"
    trees = modules()
    for path, dotted in named:
        module, _, cls = dotted.rpartition(".")
        assert module.startswith("training.plugins."), f"{path}: {dotted} is outside training.plugins"
        assert module in trees, f"{path}: {dotted}: no module {module}"
        defined = {n.name for n in trees[module].body if isinstance(n, ast.ClassDef)}
        assert cls in defined, f"{path}: {dotted}: {module} defines no class {cls}"
