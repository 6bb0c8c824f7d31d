"""End to end on CPU: the real `loft demo` (Axolotl → PEFT merge → llama.cpp → llama-server → style score).

One run of the pipeline feeds every assertion here; each checks behaviour that a broken stage would fail.
"""

import json
import os
import subprocess
import sys

import pytest

from training.paths import REPO, RUNS

NAME = "ci-demo"


@pytest.fixture(scope="session")
def demo_run():
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    proc = subprocess.run(
        [sys.executable, "-m", "training.cli", "demo", "--name", NAME],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=40 * 60,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return RUNS / NAME, proc.stdout


def scalars(run_dir, tag):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    values = []
    for events in sorted((run_dir / "adapter").rglob("events.out.tfevents.*")):
        acc = EventAccumulator(str(events))
        acc.Reload()
        if tag in acc.Tags()["scalars"]:
            values += [e.value for e in acc.Scalars(tag)]
    return values


def test_training_loss_falls(demo_run):
    run_dir, _ = demo_run
    evals = scalars(run_dir, "eval/loss")  # Axolotl evaluates at step 0 and at the end
    assert len(evals) >= 2, evals
    assert evals[-1] < evals[0] * 0.95, f"held-out loss did not fall by 5%: {evals}"
    train = scalars(run_dir, "train/loss")
    assert len(train) >= 20
    head, tail = sum(train[:8]) / 8, sum(train[-8:]) / 8
    assert tail < head, f"train loss did not fall: first 8 mean {head:.3f}, last 8 mean {tail:.3f}"


def test_merge_matches_adapter_on_base(demo_run):
    run_dir, _ = demo_run
    report = json.loads((run_dir / "merge-report.json").read_text())
    assert report["passed"] is True and report["verified"] is True, report.get("failures")
    fidelity, bounds = report["fidelity"], report["thresholds"]
    assert fidelity["tokens"] > 100  # measured on real held-out text, not an empty set
    assert fidelity["kl_mean"] <= bounds["kl_mean"] and fidelity["top1"] >= bounds["top1_min"]
    # bf16: the bounds are the measured rounding floor (the base alone in bf16) plus an allowance
    assert bounds["ppl_rel"] == pytest.approx(report["floor"]["ppl_rel"] + report["allowance"]["ppl_rel"])
    assert abs(fidelity["ppl_candidate"] / fidelity["ppl_reference"] - 1) <= bounds["ppl_rel"]


def test_gguf_served_and_answered(demo_run):
    run_dir, _ = demo_run
    export = json.loads((run_dir / "export-report.json").read_text())
    quants = {f["quant"]: f for f in export["files"]}
    assert {"f16", "q8_0"} <= set(quants)
    assert quants["q8_0"]["bytes"] < quants["f16"]["bytes"]
    style = json.loads((run_dir / "style.json").read_text())
    for sample in style["samples"]:
        assert sample["fine-tuned"].strip(), "the fine-tuned GGUF answered nothing through llama-server"


def test_fine_tuned_writes_more_like_shakespeare_than_base(demo_run):
    run_dir, _ = demo_run
    scores = json.loads((run_dir / "style.json").read_text())["scores"]
    assert scores["fine-tuned"]["score"] > scores["base"]["score"] + 10, scores


def test_report_written_with_loss_curve(demo_run):
    run_dir, stdout = demo_run
    report = run_dir / "report.md"
    assert report.exists() and str(report) in stdout
    text = report.read_text()
    pngs = [line for line in text.splitlines() if ".png" in line]
    assert pngs, "report embeds no plot"
    assert all((run_dir / p.split("(")[-1].rstrip(")")).exists() for p in pngs if "](" in p)
