"""`loft report RUN_DIR`: RUN_DIR/report.md and report.html from the results saved in the run folder.

Nothing is recomputed: the report reads only the saved results that training.paths.RunDir names, so one command
regenerates it at any time (and a missing file just leaves its section out).
"""

import base64
import html
import re
import shutil
from pathlib import Path

from training.errors import LoftError, read_json
from training.export import human_bytes
from training.lifecycle import clear_stale, partial_path, write_atomic
from training.paths import RunDir

# Which verb writes each results file, for the message when one is not shaped as that verb writes it.
WRITERS = {RunDir.STYLE_JSON: "loft bench style", RunDir.VERSUS_JSON: "loft bench versus",
           RunDir.FAITHFULNESS_JSON: "loft bench faithfulness", RunDir.MERGE_JSON: "loft merge",
           RunDir.EXPORT_JSON: "loft export", RunDir.PIPELINE_JSON: "loft demo"}

HELP = "Write RUN_DIR/report.md and report.html (loss curves, benchmark scores, samples) from saved results."
EXAMPLE = "loft report runs/demo"


# ---------------------------------------------------------------- reading
def _load(run_dir: Path, name: str):
    path = run_dir / name
    if not path.is_file():
        return None
    return read_json(path, f"rerun `{WRITERS[name]}` to write it again, or remove the file")


def loss_curves(run_dir: Path) -> tuple[dict[str, list[tuple[int, float]]], Path | None]:
    """Scalars whose tag ends in 'loss', from the newest TensorBoard event file (a retrain writes a new one)."""
    files = sorted(run_dir.glob(RunDir.EVENTS_GLOB), key=lambda p: p.stat().st_mtime)
    if not files:
        return {}, None
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(files[-1]), size_guidance={"scalars": 0})  # 0: keep every point
    acc.Reload()
    curves = {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
              for tag in acc.Tags()["scalars"] if tag.split("/")[-1] == "loss"}
    return curves, files[-1]


# ---------------------------------------------------------------- figures
def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(curves: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 3.6))
    for tag, points in sorted(curves.items()):
        steps, values = zip(*points)
        ax.plot(steps, values, marker="o" if len(points) < 12 else None, label=tag)
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_bars(title: str, names: list[str], values: list[float], cis: list, ylabel: str, path: Path,
              lines: dict[str, float] | None = None) -> None:
    """Bars with 95% interval whiskers (intervals may be [None, None] when there is none)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(3.5, 1.3 * len(names) + 2), 3.4))
    values = [v if v is not None else 0.0 for v in values]  # an undefined score draws no bar
    lower = [v - ci[0] if ci and ci[0] is not None else 0 for v, ci in zip(values, cis)]
    upper = [ci[1] - v if ci and ci[1] is not None else 0 for v, ci in zip(values, cis)]
    ax.bar(names, values, yerr=[lower, upper], capsize=6, color="#4c72b0")
    ax.axhline(0, color="black", linewidth=0.8)
    for label, y in (lines or {}).items():
        ax.axhline(y, color="gray", linestyle="--", linewidth=1)
        ax.annotate(label, (1, y), xycoords=("axes fraction", "data"), ha="right", va="bottom", color="gray")
    ax.set_title(title)
    ax.set_ylabel(ylabel)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_versus(tasks: dict, path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 1.0 + 0.7 * len(tasks)))
    for i, (task, r) in enumerate(tasks.items()):
        left = 0
        for key, color in (("wins", "#55a868"), ("ties", "#bbbbbb"), ("losses", "#c44e52")):
            share = r[key] / r["items"]
            ax.barh(i, share, left=left, color=color, label=key if i == 0 else None)
            left += share
    ax.set_yticks(range(len(tasks)), [f"{t}\n(p={r['p_value']:.3g})" for t, r in tasks.items()])
    ax.set_xlim(0, 1)
    ax.set_xlabel(f"share of items ({next(iter(tasks.values()))['a']} vs {next(iter(tasks.values()))['b']})")
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ---------------------------------------------------------------- markdown
def _cell(text) -> str:
    return html.escape(str(text), quote=False).replace("|", "&#124;").replace("\n", "<br>")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def fmt(x, spec="{:.1f}") -> str:
    if x is None or (isinstance(x, float) and x != x):
        return "–"
    return spec.format(round(x, 9) + 0.0 if isinstance(x, float) else x)  # + 0.0: no "-0.000"


def fmt_ci(ci, spec="{:.1f}") -> str:
    return f"[{fmt(ci[0], spec)}, {fmt(ci[1], spec)}]" if ci and ci[0] is not None else "–"


def style_section(style: dict, figures: Path) -> list[str]:
    scores = style["scores"]
    names = list(scores)
    plot_bars("Style transfer score (95% CI)", names, [scores[n]["score"] for n in names],
              [scores[n]["ci95"] for n in names], "score", figures / "style.png", lines={"author": 100})
    out = ["## Style transfer", "",
           f"Score 0 = the baseline ({style['settings']['baseline']}), 100 = a second sample of the author's own "
           "held-out text; 95% bootstrap intervals over prompts. Definitions: benchmarks/README.md.", "",
           f"![style scores]({RunDir.FIGURES}/style.png)", ""]
    comps = list(next(iter(scores.values()))["components"])
    out.append(table(["model", "score", "95% CI"] + comps,
                     [[n, fmt(s["score"]), fmt_ci(s["ci95"])] +
                      [fmt(s["components"][c]["distance"], "{:.3f}") for c in comps] for n, s in scores.items()]))
    out += ["", "Component columns are distances to the author's text (lower is closer); "
            f"author vs author: {', '.join(f'{c} {v:.3f}' for c, v in style.get('author', {}).items())}.", ""]
    freq = style.get("frequencies")
    if freq:
        words = list(next(iter(freq.values())))[:12]
        out += ["Most frequent words, per 1,000 words:", "",
                table(["text"] + words, [[g] + [fmt(f[w], "{:.1f}") for w in words] for g, f in freq.items()]), ""]
    samples = style.get("samples")
    if samples:
        out += ["### Voice comparison", "", table(list(samples[0]), [list(s.values()) for s in samples]), ""]
    return out


def versus_section(versus: dict, figures: Path) -> list[str]:
    tasks = versus["tasks"]
    plot_versus(tasks, figures / "versus.png")
    rows = [[t, r["a"], r["b"], r["items"], r["wins"], r["ties"], r["losses"], f"{100 * r['win_rate']:.0f}%",
             f"{100 * r['accuracy_a']:.0f}% / {100 * r['accuracy_b']:.0f}%", fmt(r["p_value"], "{:.3g}")]
            for t, r in tasks.items()]
    return ["## Head to head", "", f"![head to head]({RunDir.FIGURES}/versus.png)", "",
            table(["task", "A", "B", "items", "wins", "ties", "losses", "win rate", "accuracy A / B", "p"], rows),
            "", "p: McNemar's exact test (two-sided binomial on the items only one model got right).", ""]


def faithfulness_section(faith: dict, figures: Path) -> list[str]:
    models = faith["models"]
    names = list(models)
    plot_bars("Summaries with unsupported names or numbers", names,
              [100 * models[n]["flagged"]["share"] for n in names],
              [[100 * x for x in models[n]["flagged"]["ci95"]] for n in names], "% of summaries",
              figures / "faithfulness.png")
    rows = [[n, f"{100 * m['flagged']['share']:.0f}% ({m['flagged']['count']}/{m['flagged']['of']})",
             fmt_ci([100 * x for x in m["flagged"]["ci95"]], "{:.0f}"),
             f"{100 * m['unsupported_entity']['share']:.0f}%", f"{100 * m['unsupported_number']['share']:.0f}%",
             fmt(m["novel_2gram"], "{:.2f}"), fmt(m["mean_words"], "{:.0f}")] for n, m in models.items()]
    return ["## Faithfulness (heuristic)", "", f"![faithfulness]({RunDir.FIGURES}/faithfulness.png)", "",
            table(["model", "flagged", "95% CI (%)", "entity", "number", "novel bigrams", "words"], rows), "",
            "Flagged: a capitalised name or a number absent from the source. A heuristic; what it misses is in "
            "benchmarks/README.md.", ""]


def merge_section(merge: dict) -> list[str]:
    flat = {k: v for k, v in merge.items() if not isinstance(v, (dict, list))}
    for key, value in merge.items():
        if isinstance(value, dict):
            flat.update({f"{key}.{k}": v for k, v in value.items() if not isinstance(v, (dict, list))})
    rows = [[k, f"{v:.4g}" if isinstance(v, float) else v] for k, v in flat.items()]
    return ["## Merge fidelity", "", table(["check", "value"], rows), ""]


def export_section(export: dict) -> list[str]:
    rows = [[f["quant"], human_bytes(f["bytes"]), fmt(f.get("ppl"), "{:.3f}"),
             fmt(100 * f["ppl_vs_f16"], "{:+.2f}%") if f.get("ppl_vs_f16") is not None else "–",
             f.get("file") or "(not kept)"] for f in export["files"]]
    text = (export.get("eval") or {}).get("text")
    return ["## Export (GGUF)", "", table(["quant", "size", "perplexity", "vs F16", "file"], rows), "",
            f"Perplexity on: {text}." if text else "", ""]


# ---------------------------------------------------------------- the report
def render(run_dir) -> Path:
    """Write run_dir/report.md (+ report.html, report-figures/*.png); return the .md path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise LoftError(f"{run_dir} is not a folder; pass a run folder such as runs/demo")
    loaded = {n: _load(run_dir, n) for n in (RunDir.STYLE_JSON, RunDir.VERSUS_JSON, RunDir.FAITHFULNESS_JSON,
                                              RunDir.MERGE_JSON, RunDir.EXPORT_JSON, RunDir.PIPELINE_JSON)}
    curves, events = loss_curves(run_dir)
    if not curves and all(v is None for v in loaded.values()):
        raise LoftError(f"nothing to report in {run_dir}: no TensorBoard logs under adapter/runs and none of "
                        f"{', '.join(loaded)}; run `loft train` or `loft bench ...` with --run {run_dir}")
    # Figures are drawn into a partial folder and swapped in at the end: a results file of the wrong shape
    # (found while drawing its section) leaves the previous report and its figures as they were.
    clear_stale(run_dir.glob(f".{RunDir.FIGURES}.*.partial"))
    figures = partial_path(run_dir / RunDir.FIGURES)
    figures.mkdir()
    try:
        md = sections(run_dir, loaded, curves, events, figures)
        old = run_dir / RunDir.FIGURES
        if old.exists():
            shutil.rmtree(old)
        figures.rename(old)
    finally:
        shutil.rmtree(figures, ignore_errors=True)
    text = "\n".join(md)
    write_atomic(run_dir / RunDir.REPORT_MD, text)
    write_atomic(run_dir / RunDir.REPORT_HTML, to_html(text, run_dir, run_dir.name))
    return run_dir / RunDir.REPORT_MD


def sections(run_dir: Path, loaded: dict, curves: dict, events, figures: Path) -> list[str]:
    """The report's Markdown lines, drawing the figures into `figures`."""
    md = [f"# Run report: {run_dir.name}", "",
          f"Regenerate with `loft report {run_dir}`; every number comes from the JSON files in this folder.", ""]
    if curves:
        plot_losses(curves, figures / "loss.png")
        md += ["## Training", "", f"![loss curves]({RunDir.FIGURES}/loss.png)", "",
               table(["curve", "points", "first", "last"],
                     [[t, len(p), f"{p[0][1]:.4f}", f"{p[-1][1]:.4f}"] for t, p in sorted(curves.items())]),
               "", f"From {events.relative_to(run_dir)}.", ""]
    builders = {RunDir.STYLE_JSON: lambda r: style_section(r, figures),
                RunDir.VERSUS_JSON: lambda r: versus_section(r, figures),
                RunDir.FAITHFULNESS_JSON: lambda r: faithfulness_section(r, figures),
                RunDir.MERGE_JSON: merge_section, RunDir.EXPORT_JSON: export_section,
                RunDir.PIPELINE_JSON: lambda r: ["## Time per stage", "", table(["stage", "seconds"], list(r.items())),
                                                 ""]}
    for name, build in builders.items():
        if loaded[name] is None:
            continue
        try:
            md += build(loaded[name])
        except (KeyError, TypeError, IndexError, ValueError, AttributeError, ZeroDivisionError) as err:
            what = f"no {err}" if isinstance(err, KeyError) else f"{type(err).__name__}: {str(err)[:80]}"
            raise LoftError(f"{run_dir / name} is not shaped like what `{WRITERS[name]}` writes ({what}); rerun "
                            f"`{WRITERS[name]}` to write it again, or move the file away") from None
    return md


def to_html(md: str, run_dir: Path, title: str) -> str:
    """One self-contained page: the Markdown rendered, the PNGs inlined as base64."""
    import markdown

    body = markdown.markdown(md, extensions=["tables"])

    def inline(match):
        data = base64.b64encode((run_dir / match.group(1)).read_bytes()).decode()
        return f'src="data:image/png;base64,{data}"'

    body = re.sub(r'src="([^"]+\.png)"', inline, body)
    style = ("body{font-family:system-ui,sans-serif;max-width:1100px;margin:2em auto;padding:0 1em}"
             "table{border-collapse:collapse;margin:1em 0}td,th{border:1px solid #ccc;padding:4px 8px;"
             "vertical-align:top;font-size:14px}img{max-width:100%}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{body}</body></html>\n")


def add_arguments(parser) -> None:
    parser.add_argument("run_dir", type=Path, help="a run folder, e.g. runs/demo")


def run(args) -> int:
    path = render(args.run_dir)
    print(f"loft report: {path} and {path.with_name(RunDir.REPORT_HTML)}")
    return 0
