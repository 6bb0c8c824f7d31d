"""`loft bench`: style transfer, head-to-head and faithfulness benchmarks of models on the same prompts
(and `loft bench speed`, training throughput, which lives in benchmarks/speed.py).

Each model-comparing subcommand generates (or loads cached) answers for every --model NAME=MODEL, scores them, writes
RUN/<benchmark>.json (names in benchmarks/report.py) and the raw answers to RUN/generations/, and prints
a summary. `loft report RUN` then draws them. Definitions and caveats: benchmarks/README.md.
"""

import argparse
import json
from pathlib import Path

from benchmarks import speed
from benchmarks.generate import add_generation_arguments, model_outputs, parse_spec
from benchmarks.report import fmt, fmt_ci
from training.errors import LoftError, read_jsonl
from training.lifecycle import write_atomic
from training.paths import RUNS, RunDir

HELP = "Benchmark models: style transfer vs the author, head-to-head on math/code, summary faithfulness, speed."
EXAMPLE = ("loft bench style --data runs/data/shakespeare --model base=runs/models/smollm2-135m-instruct "
           "--model fine-tuned=merged_models/smollm2-shakespeare --run runs/my-run")


def add_arguments(parser) -> None:
    sub = parser.add_subparsers(dest="benchmark", required=True, metavar="BENCHMARK")

    def add(name: str, help: str, example: str):
        return sub.add_parser(name, help=help, description=help, epilog=f"example: {example}",
                              formatter_class=argparse.RawDescriptionHelpFormatter)

    p = add("style", "How close each model writes to the author's held-out text (0 = base, 100 = author).", EXAMPLE)
    p.add_argument("--data", type=Path, default=RUNS / "data" / "shakespeare",
                   help="a `loft data` folder; its eval.jsonl gives prompts and the author's answers")
    p.add_argument("--limit", type=int, default=100, help="use the first N eval rows (default 100)")
    p.add_argument("--bootstrap", type=int, default=1000, help="bootstrap resamples for the 95%% CIs")
    p.add_argument("--samples", type=int, default=4, help="rows in the voice comparison table")

    p = add("versus", "Two models on the same math/code items: wins, ties, losses and McNemar's p-value.",
            "loft bench versus --task all --model fine-tuned=tuned.gguf --model base=base.gguf --run runs/my-run")
    p.add_argument("--task", choices=["math", "humaneval", "all"], default="math")
    p.add_argument("--items", type=int, default=50, help="items per task (HumanEval: first N of 164; 0 = all)")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds per HumanEval program (default 5)")
    p.add_argument("--memory-mb", type=int, default=1024, help="address-space limit per program (default 1024)")

    p = add("faithfulness", "Share of summaries that name things or numbers absent from their source.",
            "loft bench faithfulness --model base=http://127.0.0.1:8080/v1#base --model tuned=tuned.gguf")
    p.add_argument("--sources", type=Path, default=None,
                   help="JSONL of {\"id\", \"source\"} passages (default: the 10 shipped with Loft)")

    for name, p in sub.choices.items():
        add_generation_arguments(p)
        p.add_argument("--baseline", default="base", help="the model the others are measured against (default base)")
        p.add_argument("--run", type=Path, default=RUNS / "bench", help="run folder for results (default runs/bench)")
        p.set_defaults(_bench=globals()[f"run_{name}"])

    p = add("speed", speed.HELP, speed.EXAMPLE)  # training throughput: its own module, its own arguments
    speed.add_arguments(p)
    p.set_defaults(_bench=speed.run)


def _generate(prompts: list[list[dict]], args, bench: str) -> dict[str, list[str]]:
    names = [parse_spec(s)[0] for s in args.model]
    if len(set(names)) != len(names):
        raise LoftError(f"--model names must differ; got {', '.join(names)}")
    if args.baseline not in names:
        raise LoftError(f"--baseline {args.baseline} is not one of the --model names ({', '.join(names)})")
    outputs = dict(model_outputs(spec, prompts, args) for spec in args.model)
    folder = args.run / "generations"  # (creates the run folder too)
    folder.mkdir(parents=True, exist_ok=True)
    for name, outs in outputs.items():  # the raw answers; also usable later as --model NAME=<this file>
        write_atomic(folder / f"{bench}-{name}.jsonl", "".join(
            json.dumps({"prompt": messages[-1]["content"], "output": out}, ensure_ascii=False) + "\n"
            for messages, out in zip(prompts, outs)))
    return outputs


def _write(args, filename: str, result: dict) -> int:
    path = write_atomic(args.run / filename, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    print(f"loft bench: {path}  (draw it with `loft report {args.run}`)")
    return 0


def chat_rows(path: Path) -> list[dict]:
    """Rows of a `loft data` eval.jsonl, each checked: a JSON object whose `messages` end in an answer."""
    fix = ('each line must be {"messages": [{"role": "user", "content": ...}, {"role": "assistant", ...}]} '
           "(rebuild it with `loft data`)")
    rows = []
    for n, row in read_jsonl(path, fix):
        msgs = row.get("messages")
        if not (isinstance(msgs, list) and len(msgs) >= 2 and all(isinstance(m, dict) and isinstance(
                m.get("content"), str) for m in msgs)):
            raise LoftError(f"{path}:{n}: no `messages` list of two or more {{role, content}} turns; {fix}")
        rows.append(row)
    return rows


def run_style(args) -> int:
    from benchmarks import style

    eval_file = args.data / "eval.jsonl"
    if not eval_file.is_file():
        raise LoftError(f"{eval_file} not found; build it with `loft data shakespeare` (or pass --data)")
    rows = chat_rows(eval_file)[: args.limit]
    if len(rows) < 8:
        raise LoftError(f"{eval_file} has {len(rows)} rows (after --limit); the style score needs at least 8")
    prompts = [r["messages"][:-1] for r in rows]
    reference = [r["messages"][-1]["content"] for r in rows]
    outputs = _generate(prompts, args, "style")
    try:
        result = style.style_report(reference, outputs, args.baseline, args.seed, args.bootstrap)
    except ValueError as err:
        raise LoftError(str(err)) from None
    result["samples"] = style.voice_table([p[-1]["content"] for p in prompts], outputs, reference, args.samples)
    result["data"] = str(eval_file)
    for name, s in result["scores"].items():
        print(f"style  {name:<16} {fmt(s['score']):>6}  95% CI {fmt_ci(s['ci95'])}")
    return _write(args, RunDir.STYLE_JSON, result)


def run_versus(args) -> int:
    from benchmarks import versus

    if len(args.model) != 2:
        raise LoftError("versus compares exactly two models: pass --model twice (one of them the --baseline)")
    if args.items < 0 or args.timeout <= 0 or args.memory_mb < 64:
        raise LoftError("need --items >= 0, --timeout > 0 and --memory-mb >= 64")
    tasks = ["math", "humaneval"] if args.task == "all" else [args.task]
    results = {}
    for task in tasks:
        if task == "math":
            items = versus.math_problems(args.items or 50, args.seed)
        else:
            items = versus.humaneval_problems(args.items or None)
        outputs = _generate(versus.prompts_for(task, items), args, f"versus-{task}")
        a = next(n for n in outputs if n != args.baseline)
        judge_kw = dict(timeout=args.timeout, memory_mb=args.memory_mb) if task == "humaneval" else {}
        results[task] = versus.head_to_head(task, items, outputs, a, args.baseline, **judge_kw)
        r = results[task]
        print(f"versus {task:<10} {a} vs {args.baseline}: {r['wins']} wins, {r['ties']} ties, {r['losses']} losses "
              f"of {r['items']} ({100 * r['win_rate']:.0f}% wins), p = {r['p_value']:.3g}")
    return _write(args, RunDir.VERSUS_JSON, {"tasks": results, "seed": args.seed})


def run_faithfulness(args) -> int:
    from benchmarks import faithfulness

    path = args.sources or faithfulness.SOURCES
    if not path.is_file():
        raise LoftError(f"{path} not found; pass a JSONL of {{\"id\", \"source\"}} passages with --sources")
    try:
        sources = faithfulness.load_sources(path)
    except (json.JSONDecodeError, KeyError) as err:
        raise LoftError(f"{path}: every line must be JSON like {{\"id\": \"a\", \"source\": \"text\"}} ({err})") from None
    if not sources or not all(isinstance(s.get("source"), str) for s in sources):
        raise LoftError(f"{path}: every line needs a \"source\" string")
    outputs = _generate(faithfulness.prompts(sources), args, "faithfulness")
    result = faithfulness.faithfulness_report(sources, outputs)
    for name, m in result["models"].items():
        f = m["flagged"]
        print(f"faithfulness {name:<16} {100 * f['share']:.0f}% flagged ({f['count']}/{f['of']}), "
              f"novel bigrams {m['novel_2gram']:.2f}")
    return _write(args, RunDir.FAITHFULNESS_JSON, result)


def run(args) -> int:
    return args._bench(args)
