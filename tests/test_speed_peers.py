"""`loft bench speed --vs trl,unsloth,naive` on the CPU: which runners run, the flags each gets, the tokens per step
they are given, the comparison against the strongest, a runner that cannot run recorded with its reason, and the
TRL-tuned runner really training a tiny model. No GPU numbers here."""

import argparse
import json
from pathlib import Path

import pytest
import torch
import yaml

from benchmarks import peers, speed, speed_metrics
from benchmarks.peers import flags, harness, unsloth_runner
from training.errors import LoftError

REPO = Path(__file__).resolve().parent.parent
CPU_RECIPE = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"
QLORA = {"sequence_len": 8192, "micro_batch_size": 1, "learning_rate": 2e-4, "optimizer": "paged_adamw_8bit",
         "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.0, "adapter": "qlora", "load_in_4bit": True,
         "gradient_checkpointing": True, "tf32": True, "sample_packing": True}


# ---------------------------------------------------------------- which runners
def test_vs_names_runners_in_order_and_rejects_unknown_ones():
    assert peers.parse_runners("trl,unsloth,naive") == ["trl", "unsloth", "baseline"]
    assert peers.parse_runners("baseline, naive") == ["baseline"]  # the old spelling, once
    with pytest.raises(LoftError, match="`axolotl` is not a runner.*naive, trl, unsloth"):
        peers.parse_runners("trl,axolotl")
    assert speed.runners("trl,unsloth", None) == ["loft", "trl", "unsloth"]
    assert speed.runners(None, None) == ["loft"]
    assert speed.runners(None, "unsloth") == ["unsloth"]
    assert speed.runners(None, "loft,naive") == ["loft", "baseline"]
    with pytest.raises(LoftError, match="drop --vs"):
        speed.runners("trl", "loft")


# ---------------------------------------------------------------- argument building
def test_tuned_runners_get_the_recipes_hyperparameters_and_packing(tmp_path):
    cmd = harness.command("trl", "sft", QLORA, tmp_path / "m", tmp_path / "t", tmp_path / "d.jsonl",
                          tmp_path / "o.json", 6, 1, 12.0, None, packing=True)
    assert cmd[:3] == [cmd[0], "-m", "benchmarks.peers.trl_tuned"]
    args = flags.build_parser("x").parse_args(cmd[3:])
    assert (args.task, args.seq_len, args.micro_batch, args.grad_accum, args.steps) == ("sft", 8192, 1, 1, 6)
    assert args.load_in_4bit and args.gradient_checkpointing and args.tf32 and args.packing
    assert (args.lora_r, args.lora_alpha, args.lora_dropout, args.cap_gib) == (16, 32, 0.0, 12.0)
    assert args.optimizer == "paged_adamw_8bit" and args.pad_id == speed.PAD_ID

    bf16 = dict(QLORA, adapter="lora", load_in_4bit=False, gradient_checkpointing=False, rl="dpo", rl_beta=0.2)
    cmd = harness.command("unsloth", "dpo", bf16, tmp_path, tmp_path, tmp_path, tmp_path / "o.json", 4, 2, None, None)
    assert cmd[2] == "benchmarks.peers.unsloth_runner"
    args = flags.build_parser("x").parse_args(cmd[3:])
    assert not (args.load_in_4bit or args.gradient_checkpointing or args.packing or args.cap_gib)
    assert args.task == "dpo" and args.beta == 0.2 and args.grad_accum == 2


def test_every_runner_trains_lofts_tokens_per_step():
    # Loft packs ~8,150 tokens per step out of 184-token rows: a packing peer packs the same sequences, the naive
    # runner accumulates 44 rows; unpacked recipes keep their own accumulation everywhere.
    assert harness.grad_accum(True, True, 1, 1, 8150, 184.0) == 1
    assert harness.grad_accum(False, True, 1, 1, 8150, 184.0) == 44
    assert harness.grad_accum(False, False, 4, 2, 8192, 4088.0) == 4


# ---------------------------------------------------------------- results and the comparison
def _ok(runner, tps, reserved, step=8192):
    return {"runner": runner, "status": "ok", "tokens_per_s": tps, "tokens_per_step": step, "step_s_median": 1.0,
            "peak_allocated_gib": reserved - 0.2, "peak_reserved_gib": reserved, "mfu": None}


def test_loft_is_compared_with_every_peer_and_headlined_against_the_strongest():
    reason = "no CUDA GPU (Unsloth's fast path is Triton kernels on CUDA)"
    results = {"loft": _ok("loft", 8281.0, 8.97), "trl": _ok("trl", 9062.0, 9.16),
               "baseline": _ok("baseline", 5894.0, 11.63),
               "unsloth": {"runner": "unsloth", "status": "cannot_run", "reason": reason}}
    assert harness.strongest(results) == "trl"
    vs = harness.versus(results)
    assert vs["trl"]["tokens_per_s"] == 0.91 and vs["trl"]["peak_reserved_gib_delta"] == -0.19
    assert vs["baseline"]["tokens_per_s"] == 1.4 and vs["unsloth"] is None
    lines = harness.summary_lines(results)
    assert "loft / TRL tuned (strongest): 0.91x tokens/s" in lines[0]
    assert lines[2] == f"  loft / Unsloth: no ratio (unsloth cannot_run: {reason})"
    assert speed_metrics.line(results["unsloth"]) == f"  unsloth   cannot run here: {reason}"
    results["unsloth"] = _ok("unsloth", 10057.0, 8.85)
    assert harness.strongest(results) == "unsloth"
    assert harness.strongest({"loft": _ok("loft", 1.0, 1.0)}) is None


def test_a_runner_that_stopped_early_is_its_own_error():
    record = {"runner": "unsloth", "status": "ok", "device": "cpu", "marks": [(0.0, 0), (1.0, 100)]}
    r = speed_metrics.summarize(record, params=1, warmup=2, steps=4, peak_override=None)
    assert r["status"] == "error" and "logged 1 steps, fewer than warmup 2 + steps 4" in r["error"]
    assert speed_metrics.line(r).startswith("  unsloth   failed: the run logged 1 steps")


def test_a_runner_that_wrote_nothing_is_an_error_naming_its_last_log_line(tmp_path):
    log = tmp_path / "train.log"
    log.write_text("python -m benchmarks.peers.trl_tuned ...\nTraceback\nValueError: bad rows\n\n")
    r = harness.read_result(tmp_path / "missing.json", log, "trl")
    assert r["status"] == "error" and "ValueError: bad rows" in r["error"] and str(log) in r["error"]


def test_unsloth_without_a_gpu_records_one_clear_reason(tmp_path, capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: Unsloth can run")
    out = tmp_path / "unsloth.json"
    argv = ["--task", "sft", "--model", "m", "--data", "d", "--out", str(out), "--seq-len", "8192", "--steps", "3",
            "--load-in-4bit", "--gradient-checkpointing", "--packing"]
    assert unsloth_runner.main(argv) == 0
    record = json.loads(out.read_text())
    assert record["status"] == "cannot_run" and record["runner"] == "unsloth"
    assert record["reason"].startswith("no CUDA GPU")
    assert record["settings"]["gradient_checkpointing"] == "unsloth" and record["settings"]["packing"] is True
    assert "torch" in record["versions"] and "unsloth" in record["versions"]
    assert f"unsloth cannot run here: {record['reason']}" in capsys.readouterr().err
    assert "unsloth" not in __import__("sys").modules  # never imported: its CPU fallback is not what is compared


# ---------------------------------------------------------------- real runs on the CPU
def test_tuned_runner_trains_a_tiny_model_beside_an_unsloth_that_cannot(tmp_path, monkeypatch):
    """Real TRL training on the CPU (Liger off: it needs a GPU), through the same harness as on the GPU host.
    (The naive runner shares its loading and arguments; its own path is the quickstart's SFTTrainer call.)"""
    monkeypatch.setattr(speed, "BENCH", tmp_path)
    # The harness and runner on the CPU: the user-facing "no GPU here" refusal is tested in test_bad_input.py.
    monkeypatch.setattr(speed, "require_gpu", lambda: None)
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # a 64-wide model: two threads contending on a busy box run ~10x slower
    cfg = yaml.safe_load(CPU_RECIPE.read_text())  # packed short rows; no plugin (no Axolotl import: no Loft run)
    cfg.update(sample_packing=True, sequence_len=512, plugins=[])
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(yaml.safe_dump(cfg))
    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    args = parser.parse_args([str(recipe), "--arch", "tiny", "--only", "trl,unsloth", "--warmup", "1",
                              "--steps", "2", "--name", "peers"])
    assert speed.run(args) == 0
    report = json.loads((tmp_path / "peers" / "speed.json").read_text())
    trl, uns = report["runners"]["trl"], report["runners"]["unsloth"]
    assert trl["status"] == "ok", trl
    assert trl["settings"]["packing"] is True and trl["settings"]["liger"] is False
    assert "no CUDA GPU" in trl["settings"]["liger_off_because"]
    assert trl["packing"] is True and trl["grad_accum"] == 2  # the recipe's 2 x 2 packed 512-token sequences
    assert trl["tokens_per_s"] > 0 and 1024 < trl["tokens_per_step"] <= 2048
    assert len(trl["losses"]) == 3 and all(loss > 0 for loss in trl["losses"])
    assert trl["versions"]["trl"] and trl["settings"]["max_length"] == 512
    assert uns["status"] == "cannot_run" and uns["reason"].startswith("no CUDA GPU")
    assert report["strongest"] == "trl" and report["versus"] == {}  # no Loft run: nothing to divide


# ---------------------------------------------------------------- RESULTS.md's table from the results files
def _run(name, runners, seq=8192, cap=12.0, data="full"):
    return {"name": name, "recipe": "recipes/qwen2.5-7b/qlora-sft-12gb.yaml", "task": "sft", "arch": "Qwen2.5-7B",
            "data": {"profile": data, "sequence_len": seq}, "cap_gib": cap, "runners": runners,
            "versus": harness.versus(runners), "strongest": harness.strongest(runners)}


def test_results_table_compares_with_the_strongest_and_applies_the_goal(tmp_path, capsys):
    from benchmarks.peers import table

    reason = "no CUDA GPU (Unsloth's fast path is Triton kernels on CUDA)"
    full = _run("vs-qwen7b-qlora-12gb-full", {"loft": _ok("loft", 8281.0, 8.97), "trl": _ok("trl", 9062.0, 9.16),
                                              "unsloth": _ok("unsloth", 10057.0, 8.85)})
    packed = _run("vs-qwen7b-qlora-12gb-packed", {"loft": _ok("loft", 9822.0, 8.93), "trl": _ok("trl", 6372.0, 9.59),
                                                  "unsloth": _ok("unsloth", 9356.0, 7.65)}, data="shakespeare")
    nogpu = _run("vs-cpu", {"loft": _ok("loft", 10.0, 1.0),
                            "unsloth": {"runner": "unsloth", "status": "cannot_run", "reason": reason}})
    long = {f"vs-llama8b-long-{runner}-{n}": _run(f"vs-llama8b-long-{runner}-{n}", {runner: r}, seq=n)
            for runner, n, r in [("unsloth", 28672, _ok("unsloth", 4000.0, 11.5)),
                                 ("unsloth", 32768, {"status": "does_not_fit", "cap_gib": 12.0}),
                                 ("loft", 32768, _ok("loft", 4579.0, 11.99)),
                                 ("loft", 36864, _ok("loft", 4400.0, 11.9))]}
    for run in [full, packed, nogpu, *long.values()]:
        (tmp_path / f"{run['name']}.json").write_text(json.dumps(run))
    merged = tmp_path / "results" / "vs-peers.json"
    assert table.main([*map(str, sorted(tmp_path.glob("*.json"))), "--merge", str(merged)]) == 0
    out = capsys.readouterr().out
    rows = {line.split("`")[1]: line for line in out.splitlines() if "`vs-" in line}
    assert "| 8,281 tok/s, 8.97 GiB | 9,062 tok/s, 9.16 GiB | 10,057 tok/s, 8.85 GiB |" in rows["vs-qwen7b-qlora-12gb-full"]
    assert "0.82× Unsloth | not met: 0.82x, +0.12 GiB |" in rows["vs-qwen7b-qlora-12gb-full"]
    assert "1.05× Unsloth | not met: 1.05x, +1.28 GiB |" in rows["vs-qwen7b-qlora-12gb-packed"]  # fast, not small
    assert f"cannot run: {reason}" in rows["vs-cpu"] and "no Unsloth number (cannot_run)" in rows["vs-cpu"]
    assert "| Unsloth | 28,672 | 4,000 | 11.50 GiB |" in out and "| Loft | 36,864 | 4,400 | 11.90 GiB |" in out
    assert "Loft ÷ Unsloth, longest sequence: 1.29× (met" in out
    assert set(json.loads(merged.read_text())["runs"]) == {full["name"], packed["name"], "vs-cpu", *long}
    assert table.main([str(merged)]) == 0 and capsys.readouterr().out == out  # the merged file draws the same
    (tmp_path / "bad.json").write_text("[1, 2]")
    with pytest.raises(LoftError, match="holds neither one run"):
        table.main([str(tmp_path / "bad.json")])


def test_profiled_step_timeline_merges_overlapping_kernels_and_counts_host_waits():
    """Busy time is the union of device intervals (two streams overlapping count once); gaps longer than the
    threshold are the device waiting for the host; a CPU-only profile has no device events."""
    from benchmarks.speed_probe import device_timeline, timeline_of

    t = timeline_of([(0, 100), (50, 150), (160, 200), (1200, 1300)], gap_us=20)
    assert t == {"device_events": 4, "device_busy_ms": 0.3, "device_span_ms": 1.3, "device_idle_gaps_ms": 1.0}
    assert timeline_of([])["device_busy_ms"] == 0.0
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        torch.ones(64, 64) @ torch.ones(64, 64)
    assert device_timeline(prof)["device_events"] == 0
