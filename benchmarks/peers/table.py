"""RESULTS.md's table of Loft against TRL tuned and Unsloth, drawn from `loft bench speed --vs` results files.

    python -m benchmarks.peers.table OUT/*.json --merge benchmarks/results/vs-peers-2026-11-30.json
    python -m benchmarks.peers.table benchmarks/results/vs-peers-2026-11-30.json

Each argument is one run's speed.json (what benchmarks/gpu/vs-peers.sh leaves in $OUT) or a merged file
({"runs": {name: run}}); --merge writes the runs read, later ones replacing earlier ones of the same name, as one
file to commit. Nothing is recomputed: every cell is a number the runs recorded. The goal column applies the
bar: Loft at least 1.0x Unsloth's tokens/s at no more than Unsloth's peak reserved memory + 0.5 GiB, and
for the longest sequence under a cap, at least 1.25x Unsloth's longest.
"""

import argparse
import json
import sys
from pathlib import Path

from benchmarks.peers.harness import LABELS, strongest, versus
from benchmarks.speed_figures import longest_fitting, sweep
from training.errors import LoftError

ORDER = ("loft", "trl", "unsloth", "baseline")
SWEEP = "vs-llama8b-long-"  # vs-peers.sh: each runner alone at rising lengths under one cap
SPEED_GOAL, MEMORY_SLACK_GIB, LENGTH_GOAL = 1.0, 0.5, 1.25


def load(paths: list[Path]) -> dict:
    runs = {}
    for path in paths:
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, json.JSONDecodeError) as err:
            raise LoftError(f"{path} is not a readable `loft bench speed` results file ({err}); pass the "
                            "speed.json files of the runs, or a merged file") from None
        if isinstance(data, dict) and "runners" in data and "name" in data:
            runs[data["name"]] = data
        elif isinstance(data, dict) and isinstance(data.get("runs"), dict):
            runs.update(data["runs"])
        else:
            raise LoftError(f"{path} holds neither one run (name, runners) nor {{\"runs\": ...}}; pass the speed.json "
                            "files that `loft bench speed` writes")
    return runs


def cell(r: dict | None) -> str:
    if r is None:
        return "—"
    status = r.get("status")
    if status == "ok":
        return f"{r['tokens_per_s']:,.0f} tok/s, {r['peak_reserved_gib']:.2f} GiB"
    if status == "does_not_fit":
        return f"does not fit {r.get('cap_gib')} GiB"
    if status == "cannot_run":
        return f"cannot run: {r.get('reason')}"
    return f"failed: {str(r.get('error'))[:60]}"


def describe(run: dict) -> str:
    cap = f", cap {run['cap_gib']:g} GiB" if run.get("cap_gib") else ""
    return (f"{run.get('arch')} {run.get('task', '').upper()} ({Path(run.get('recipe', '')).stem}), "
            f"{run['data']['profile']} rows, {run['data']['sequence_len']:,} tokens{cap}")


def goal(run: dict) -> str:
    """Loft against Unsloth by the bar RESULTS.md sets, in words."""
    loft, uns = run["runners"].get("loft", {}), run["runners"].get("unsloth", {})
    if loft.get("status") != "ok":
        return "Loft did not train"
    if uns.get("status") in ("does_not_fit", "cannot_run", "error") or not uns:
        return f"no Unsloth number ({uns.get('status', 'not run')})"
    r = versus(run["runners"])["unsloth"]
    met = r["tokens_per_s"] >= SPEED_GOAL and r["peak_reserved_gib_delta"] <= MEMORY_SLACK_GIB
    return f"{'met' if met else 'not met'}: {r['tokens_per_s']:.2f}x, {r['peak_reserved_gib_delta']:+.2f} GiB"


def throughput_table(runs: dict) -> list[str]:
    keys = [k for k in ORDER if any(k in r["runners"] for r in runs.values() if r.get("versus") is not None)]
    head = ["case", *(LABELS[k] for k in keys), "Loft ÷ strongest", "vs Unsloth (≥ 1.0×, ≤ +0.5 GiB)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, run in runs.items():
        if name.startswith(SWEEP) or not run.get("versus"):
            continue  # a sweep point or a Loft-only run: no comparison to draw
        best = strongest(run["runners"])
        ratio = run["versus"].get(best) if best else None
        vs_best = f"{ratio['tokens_per_s']:.2f}× {LABELS[best]}" if ratio else "—"
        lines.append("| " + " | ".join([f"{describe(run)} (`{name}`)", *(cell(run["runners"].get(k)) for k in keys),
                                        vs_best, goal(run)]) + " |")
    return lines


def longest_table(runs: dict, prefix: str = SWEEP) -> list[str]:
    points = sweep(runs, prefix)
    if not points:
        return []
    longest = {runner: longest_fitting(p) for runner, p in points.items()}
    lines = ["| runner | longest that fits | tokens/s there | peak reserved there |", "|---|---|---|---|"]
    for runner in (k for k in ORDER if k in points):
        n = longest[runner]
        if n:
            r = points[runner][n]
            lines.append(f"| {LABELS[runner]} | {n:,} | {r['tokens_per_s']:,.0f} | {r['peak_reserved_gib']:.2f} GiB |")
        else:
            lines.append(f"| {LABELS[runner]} | none of {sorted(points[runner])} | — | — |")
    if longest.get("loft") and longest.get("unsloth"):
        ratio = longest["loft"] / longest["unsloth"]
        lines.append(f"\nLoft ÷ Unsloth, longest sequence: {ratio:.2f}× "
                     f"({'met' if ratio >= LENGTH_GOAL else 'not met'}: the goal is ≥ {LENGTH_GOAL}×)")
    return lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.peers.table", description=__doc__.split("\n")[0])
    parser.add_argument("results", type=Path, nargs="+", help="speed.json files of runs, or merged files")
    parser.add_argument("--merge", type=Path, help="also write every run read into this one file")
    parser.add_argument("--sweep", default=SWEEP, help=f"name prefix of the longest-sequence runs (default {SWEEP})")
    args = parser.parse_args(argv)
    runs = load(args.results)
    if args.merge:
        devices = {r.get("device") for run in runs.values() for r in run["runners"].values() if r.get("device")}
        args.merge.parent.mkdir(parents=True, exist_ok=True)
        args.merge.write_text(json.dumps({"devices": sorted(devices), "runs": runs}, indent=1) + "\n")
    print("\n".join(throughput_table(runs) + [""] + longest_table(runs, args.sweep)))
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except LoftError as err:
        print(f"benchmarks.peers.table: error: {err}", file=sys.stderr)
        sys.exit(err.code)
