"""Figures for benchmarks/RESULTS.md from a committed `loft bench speed` results file.

    python -m benchmarks.speed_figures benchmarks/results/speed-2026-11-22.json --out benchmarks/figures

Two PNGs, nothing recomputed: every same-run Loft ÷ baseline tokens/s ratio, and a sequence-length sweep (peak
memory and tokens/s per runner against the card's cap, out-of-memory runs marked) for the runs named by --sweep.
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks.report import _pyplot
from training.errors import LoftError, guarded

SWEEP = "t4-llama8b-long-"  # run names of the long recipe and the baseline at several lengths under one 12 GiB cap
COLORS = {"loft": "#4c72b0", "baseline": "#c44e52"}


def load_runs(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))["runs"]
    except FileNotFoundError:
        raise LoftError(f"{path} does not exist; pass a benchmarks/results/speed-*.json file") from None
    except (json.JSONDecodeError, KeyError, TypeError) as err:
        raise LoftError(f"{path} is not a `loft bench speed` results file ({err!r}); pass "
                        "benchmarks/results/speed-*.json") from None


def ratios(runs: dict) -> list[tuple[str, float]]:
    """(run, Loft ÷ baseline tokens/s) for every run where both runners trained, superseded recipes left out."""
    return [(name, r["ratios"]["tokens_per_s"]) for name, r in runs.items()
            if r.get("ratios") and not name.startswith("superseded-")]


def sweep(runs: dict, prefix: str = SWEEP) -> dict[str, dict[int, dict]]:
    """{runner: {sequence_len: result}} over the runs named prefix*; a later run of the same length replaces an
    earlier one (the results file keeps runs in the order they were made)."""
    points: dict[str, dict[int, dict]] = {}
    for name, r in runs.items():
        if not name.startswith(prefix):
            continue
        for runner, result in r["runners"].items():
            points.setdefault(runner, {})[r["data"]["sequence_len"]] = result
    return points


def longest_fitting(points: dict[int, dict]) -> int | None:
    fitted = [seq for seq, r in points.items() if r.get("status") == "ok"]
    return max(fitted) if fitted else None


def plot_ratios(pairs: list[tuple[str, float]], path: Path) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 0.9 + 0.32 * len(pairs)))
    names, values = zip(*sorted(pairs, key=lambda p: p[1]))
    ax.barh(names, values, color=COLORS["loft"])
    ax.axvline(1, color="black", linewidth=0.8)
    ax.set_xscale("log")
    for i, v in enumerate(values):
        ax.annotate(f"{v:.3g}×", (v, i), xytext=(3, 0), textcoords="offset points", va="center", fontsize=8)
    ax.set_xlabel("Loft ÷ hand-written TRL baseline, tokens/s (same invocation; log scale)")
    ax.tick_params(axis="y", labelsize=8)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_sweep(points: dict[str, dict[int, dict]], cap_gib: float, path: Path) -> None:
    plt = _pyplot()
    fig, (mem, speed) = plt.subplots(1, 2, figsize=(10, 3.8))
    for runner, by_seq in sorted(points.items()):
        seqs = sorted(by_seq)
        ok = [s for s in seqs if by_seq[s].get("status") == "ok"]
        failed = [s for s in seqs if by_seq[s].get("status") == "does_not_fit"]
        color = COLORS.get(runner)
        mem.plot(ok, [by_seq[s]["peak_reserved_gib"] for s in ok], marker="o", color=color, label=runner)
        speed.plot(ok, [by_seq[s]["tokens_per_s"] for s in ok], marker="o", color=color, label=runner)
        if failed:
            mem.scatter(failed, [cap_gib] * len(failed), marker="x", s=60, color=color,
                        label=f"{runner}: out of memory")
    mem.axhline(cap_gib, color="gray", linestyle="--", linewidth=1)
    mem.annotate(f"cap {cap_gib:g} GiB", (0.01, cap_gib), xycoords=("axes fraction", "data"), va="bottom",
                 color="gray", fontsize=8)
    for ax, ylabel in ((mem, "peak reserved GiB"), (speed, "tokens/s")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("sequence length (tokens)")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.speed_figures", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, help="benchmarks/results/speed-*.json")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/figures"), help="folder for the PNGs")
    parser.add_argument("--sweep", default=SWEEP, help=f"name prefix of the sequence sweep's runs (default {SWEEP})")
    args = parser.parse_args(argv)
    runs = load_runs(args.results)
    points = sweep(runs, args.sweep)
    caps = {r["cap_gib"] for name, r in runs.items() if name.startswith(args.sweep)}
    if not points or len(caps) != 1:
        raise LoftError(f"no runs named {args.sweep}* under one --cap-gib in {args.results}; pick another --sweep")
    args.out.mkdir(parents=True, exist_ok=True)
    stem = args.results.stem
    plot_ratios(ratios(runs), args.out / f"{stem}-ratios.png")
    plot_sweep(points, caps.pop(), args.out / f"{stem}-sweep.png")
    longest = {runner: longest_fitting(p) for runner, p in points.items()}
    print(f"wrote {args.out}/{stem}-ratios.png and {stem}-sweep.png; longest that fits: {longest}")
    return 0


if __name__ == "__main__":
    sys.exit(guarded("benchmarks.speed_figures", main))
