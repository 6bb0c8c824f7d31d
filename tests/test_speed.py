"""`loft bench speed` harness logic on the CPU: token counting, throughput and MFU arithmetic, synthetic data,
the benchmark config, the JSON a run leaves, and the "does not fit" path. No GPU numbers here."""

import gzip
import json
from pathlib import Path

import pytest
import torch

from benchmarks import speed, speed_metrics, speed_probe
from benchmarks.peers import harness
from training import recipe as recipes
from training.arch import Arch
from training.errors import LoftError

REPO = Path(__file__).resolve().parent.parent
QWEN7 = json.loads((REPO / "training" / "archs" / "Qwen2.5-7B-Instruct.json").read_text())
LLAMA8 = json.loads((REPO / "training" / "archs" / "Llama-3.1-8B-Instruct.json").read_text())


@pytest.fixture(scope="module")
def tiny_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**speed.TINY))


# ---------------------------------------------------------------- arithmetic
def test_parameter_count_matches_the_published_sizes():
    assert Arch.from_config(LLAMA8, "llama", "").params == 8_030_261_248  # Llama-3.1-8B: 8.03B
    # Qwen2's q/k/v biases (129,024 values) are the only thing the count leaves out
    assert Arch.from_config(QWEN7, "qwen", "").params == 7_615_616_512 - 28 * (3584 + 2 * 512)


def test_parameter_count_matches_a_real_model():
    from transformers import AutoConfig, AutoModelForCausalLM

    llama = {**speed.TINY, "architectures": ["LlamaForCausalLM"], "model_type": "llama"}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**llama))
    assert Arch.from_config(llama, "tiny", "").params == model.num_parameters()


def test_mfu_is_6n_tokens_over_peak():
    # 8,590 tok/s on Qwen2.5-7B against the H100 SXM's 989.4 TFLOP/s
    assert speed_metrics.mfu(7_615_616_512, 8590, 989.4) == pytest.approx(6 * 7_615_616_512 * 8590 / 989.4e12)
    assert speed_metrics.mfu(7_615_616_512, 8590, 989.4) == pytest.approx(0.3967, abs=1e-4)
    assert speed_metrics.mfu(1, 100, None) is None


def test_peak_table_names_the_gpu():
    assert speed_metrics.peak_tflops("NVIDIA H100 80GB HBM3") == 989.4
    assert speed_metrics.peak_tflops("NVIDIA H100 PCIe") == 756.0
    assert speed_metrics.peak_tflops("NVIDIA A100-SXM4-80GB") == 312.0
    assert speed_metrics.peak_tflops("cpu") is None


def test_throughput_excludes_warmup():
    # begin, then 4 steps: the first is slow (compilation) and must not count with warmup=1
    marks = [(0.0, 0), (10.0, 1000), (11.0, 2000), (12.0, 3000), (13.5, 4000)]
    out = speed_metrics.throughput(marks, warmup=1, steps=3)
    assert out["tokens"] == 3000 and out["seconds"] == 3.5
    assert out["tokens_per_s"] == pytest.approx(3000 / 3.5, abs=0.1)
    assert out["tokens_per_step"] == 1000 and out["step_s_median"] == 1.0
    with pytest.raises(LoftError, match="fewer than"):
        speed_metrics.throughput(marks, warmup=2, steps=3)
    with pytest.raises(LoftError, match="no training tokens"):
        speed_metrics.throughput([(0.0, 0), (1.0, 0)], warmup=0, steps=1)


def test_fits():
    assert speed_metrics.fits(10.9, 11) is True
    assert speed_metrics.fits(11.2, 11) is False
    assert speed_metrics.fits(5.0, None) is None


# ---------------------------------------------------------------- token counting
def test_token_counter_counts_non_padding_training_forwards(tiny_model):
    counter = speed_probe.TokenCounter(pad_id=0)
    counter.attach(tiny_model)
    counter.attach(tiny_model)  # idempotent: one hook
    ids = torch.tensor([[5, 6, 7, 0, 0], [8, 9, 10, 11, 0]])
    tiny_model(input_ids=ids)
    assert counter.value() == 7
    with torch.no_grad():  # a DPO reference pass or evaluation: not training work
        tiny_model(input_ids=ids)
    assert counter.value() == 7
    tiny_model(input_ids=ids[:1])
    assert counter.value() == 10
    counter.handle.remove()


def drive(cb, model, steps=3, before_step=lambda step: None) -> dict:
    """The Trainer's calls to the callback over `steps` optimizer steps of one 4-token row each; the record."""
    class State:
        global_step = 0

    cb.on_train_begin(None, State, None, model=model)
    for step in range(steps):
        before_step(step)
        model(input_ids=torch.tensor([[5, 6, 7, 8, 0]]))
        State.global_step = step + 1
        cb.on_step_end(None, State, None)
    cb.on_train_end(None, State, None)
    cb.counter.handle.remove()
    return json.loads(cb.out_path.read_text())


def test_callback_writes_marks_and_throughput_follows(tiny_model, tmp_path):
    cb = speed_probe.SpeedCallback(tmp_path / "r.json", "loft", pad_id=0, cap_gib=12)
    record = drive(cb, tiny_model)
    assert record["status"] == "ok" and record["cap_gib"] == 12
    assert [n for _, n in record["marks"]] == [0, 4, 8, 12]
    summary = speed_metrics.summarize(record, params=7_615_616_512, warmup=1, steps=2, peak_override=989.4)
    assert summary["tokens"] == 8 and summary["tokens_per_step"] == 4
    assert summary["mfu"] == pytest.approx(6 * 7_615_616_512 * summary["tokens_per_s"] / 989.4e12, abs=1e-4)


def test_profiled_step_spans_the_interval_a_timed_step_is_measured_over(tiny_model, tmp_path, monkeypatch):
    """The profile starts where the step before it ended (the time between steps is part of a step's cost) and
    stops at the profiled step's end; the timed marks are the same as without it; the trace is written on request."""
    monkeypatch.setenv(speed_probe.ENV_TRACE, "1")
    cb = speed_probe.SpeedCallback(tmp_path / "r.json", "loft", pad_id=0, profile_step=3)
    running = []  # whether the profiler runs as each step begins: only before the profiled (third) one
    record = drive(cb, tiny_model, before_step=lambda step: running.append(cb.profiler is not None))
    assert running == [False, False, True]
    assert [n for _, n in record["marks"]] == [0, 4, 8, 12] and cb.profiler is None
    assert record["timeline"]["step_ms"] > 0 and record["timeline"]["device_events"] == 0  # CPU: no device
    assert record["top_kernels"] and "by host time" in (tmp_path / "r.profile.txt").read_text()
    with gzip.open(tmp_path / "r.trace.json.gz") as f:
        assert json.load(f)["traceEvents"]


# ---------------------------------------------------------------- "does not fit"
def test_out_of_memory_is_a_result_not_a_crash(tmp_path):
    exc = torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.03 GiB.")
    assert speed_probe.is_oom(exc)
    assert speed_probe.is_oom(RuntimeError("CUDA error: out of memory"))
    assert not speed_probe.is_oom(ValueError("bad config"))
    record = speed_probe.does_not_fit(tmp_path / "r.json", "baseline", 8.0, exc)
    assert json.loads((tmp_path / "r.json").read_text()) == record
    assert record["status"] == "does_not_fit" and record["cap_gib"] == 8.0
    assert "does not fit at 8.0 GiB" in speed_metrics.line(record)
    assert speed_metrics.summarize(dict(record), 1, 1, 1, None)["status"] == "does_not_fit"


def test_baseline_reports_oom_raised_in_a_training_step(tmp_path, monkeypatch):
    """The baseline script turns an OutOfMemoryError from a training step into a record and exits 0."""
    from benchmarks import baseline_trl

    class Trainer:
        def train(self):
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 1.00 GiB.")

    monkeypatch.setattr(baseline_trl, "build_trainer", lambda args, cb: Trainer())
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", torch.cuda.reset_peak_memory_stats)  # restored after
    monkeypatch.setattr(torch.cuda.memory, "reset_peak_memory_stats", torch.cuda.memory.reset_peak_memory_stats)
    out = tmp_path / "b.json"
    rc = baseline_trl.main(["--task", "sft", "--model", "m", "--data", "d", "--out", str(out), "--seq-len", "64",
                            "--steps", "2", "--cap-gib", "6"])
    assert rc == 0
    assert json.loads(out.read_text())["status"] == "does_not_fit"

    def broken(args, cb):
        raise ValueError("not a memory problem")

    monkeypatch.setattr(baseline_trl, "build_trainer", broken)
    with pytest.raises(ValueError):
        baseline_trl.main(["--task", "sft", "--model", "m", "--data", "d", "--out", str(out), "--seq-len", "64",
                           "--steps", "2"])


# ---------------------------------------------------------------- data and config
def test_tokenizer_gives_one_token_per_word_and_exact_row_lengths(tmp_path):
    from transformers import AutoTokenizer

    from training.axolotl import word_tokenizer

    tok = AutoTokenizer.from_pretrained(word_tokenizer())
    assert tok.pad_token_id == speed.PAD_ID and len(tok) < speed.TINY["vocab_size"]
    lengths = speed.row_lengths(50, "shakespeare", 1024)
    assert 150 < sum(lengths) / len(lengths) < 220  # the recipes' rows: median 184
    assert speed.row_lengths(3, "full", 2048) == [2040] * 3
    mean = speed.write_rows(tmp_path / "sft.jsonl", "sft", lengths[:5])
    rows = [json.loads(line) for line in (tmp_path / "sft.jsonl").read_text().splitlines()]
    for n, row in zip(lengths, rows):
        ids = tok.apply_chat_template(row["messages"], tokenize=True)
        ids = ids["input_ids"] if hasattr(ids, "keys") else ids
        assert len(ids) == n and speed.PAD_ID not in ids
    assert mean == sum(lengths[:5]) / 5
    speed.write_rows(tmp_path / "dpo.jsonl", "dpo", [2040])
    pair = json.loads((tmp_path / "dpo.jsonl").read_text())
    assert set(pair) == {"prompt", "chosen", "rejected"}
    words = [len(pair[k].split()) for k in ("prompt", "chosen", "rejected")]
    assert words[0] + words[1] == 2040 - 6 and words[2] < words[1]


def test_bench_config_swaps_data_and_model_but_keeps_compute_keys(tmp_path):
    cfg = recipes.load(REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml")
    out = speed.bench_config(cfg, tmp_path / "model", tmp_path / "tok", tmp_path / "d.jsonl", total_steps=7)
    assert out["base_model"] == str(tmp_path / "model") and out["tokenizer_config"] == str(tmp_path / "tok")
    assert out["datasets"][0]["path"] == str(tmp_path / "d.jsonl") and "test_datasets" not in out
    assert out["max_steps"] == 7 and out["val_set_size"] == 0 and out["save_strategy"] == "no"
    assert out["plugins"][-1] == speed.PLUGIN
    for key in ("sequence_len", "micro_batch_size", "gradient_accumulation_steps", "lora_r", "optimizer"):
        assert out[key] == cfg[key]
    dpo = speed.bench_config(dict(cfg, rl="dpo"), tmp_path, tmp_path, tmp_path / "d.jsonl", 3)
    assert dpo["datasets"][0]["type"] == "chatml.default"
    with pytest.raises(LoftError, match="not benchmarked"):
        speed.task_of({"rl": "grpo"})


def test_baseline_command_carries_the_recipe_hyperparameters(tmp_path):
    cfg = {"sequence_len": 1024, "micro_batch_size": 1, "learning_rate": 2e-4, "optimizer": "paged_adamw_8bit",
           "lora_r": 16, "lora_alpha": 32, "lora_dropout": 0.05, "adapter": "qlora", "load_in_4bit": True,
           "gradient_checkpointing": True}
    cmd = harness.command("baseline", "sft", cfg, tmp_path, tmp_path, tmp_path / "d", tmp_path / "o", 5, 43, 12.0, None)
    args = " ".join(cmd)
    assert "--grad-accum 43" in args and "--load-in-4bit" in args and "--gradient-checkpointing" in args
    assert "--optimizer paged_adamw_8bit" in args and "--cap-gib 12.0" in args and "--task sft" in args
    from benchmarks import baseline_trl

    parsed = baseline_trl.parse_args(cmd[cmd.index("benchmarks.baseline_trl") + 1:])
    assert parsed.grad_accum == 43 and parsed.load_in_4bit and parsed.seq_len == 1024


def test_baseline_cap_follows_cap_gib_unless_told():
    assert speed.baseline_cap(11.0, None) == 11.0
    assert speed.baseline_cap(11.0, 0) is None  # uncapped: time a baseline that does not fit the card
    assert speed.baseline_cap(None, 24.0) == 24.0
    cmd = harness.command("baseline", "sft", {"sequence_len": 64}, Path("m"), Path("t"), Path("d"), Path("o"), 3, 1,
                          speed.baseline_cap(11.0, 0), None)
    assert "--cap-gib" not in cmd


@pytest.mark.parametrize("caps", [(0, None), (-4, None), (12, -1)])
def test_impossible_caps_are_one_clear_error(caps):
    import argparse

    parser = argparse.ArgumentParser()
    speed.add_arguments(parser)
    argv = ["recipes/qwen2.5-7b/qlora-sft-8gb.yaml", "--cap-gib", str(caps[0])]
    if caps[1] is not None:
        argv += ["--baseline-cap-gib", str(caps[1])]
    with pytest.raises(LoftError, match="positive number of GiB"):
        speed.run(parser.parse_args(argv))


def test_resolve_arch_from_base_model_names():
    assert speed.resolve_arch("Qwen/Qwen2.5-7B-Instruct")[0] == "Qwen2.5-7B-Instruct"
    assert speed.resolve_arch("meta-llama/Meta-Llama-3.1-8B-Instruct")[0] == "Llama-3.1-8B-Instruct"
    assert speed.resolve_arch("anything", "tiny")[1] == speed.TINY
    with pytest.raises(LoftError, match="no architecture"):
        speed.resolve_arch("someone/Unknown-3B")


def test_report_line_and_ratios():
    loft = {"runner": "loft", "status": "ok", "tokens_per_s": 8590.0, "tokens_per_step": 8123, "step_s_median": 0.97,
            "peak_allocated_gib": 5.4, "peak_reserved_gib": 9.0, "mfu": 0.397}
    base = dict(loft, runner="baseline", tokens_per_s=312.0, tokens_per_step=8069, peak_reserved_gib=8.7)
    r = harness.ratios(loft, base)
    assert r["tokens_per_s"] == 27.53 and r["tokens_per_step"] == 1.01
    assert "8,590 tok/s" in speed_metrics.line(loft) and "MFU 39.7%" in speed_metrics.line(loft)
    assert harness.ratios(loft, {"status": "does_not_fit"}) is None


# ---------------------------------------------------------------- figures from a committed results file
def _run(seq, loft=None, baseline=None, cap=12.0):
    runners = {}
    for name, result in (("loft", loft), ("baseline", baseline)):
        if result:
            runners[name] = dict(zip(("status", "peak_reserved_gib", "tokens_per_s"), result))
    both = loft and baseline and loft[0] == baseline[0] == "ok"
    return {"data": {"sequence_len": seq}, "cap_gib": cap, "runners": runners,
            "ratios": {"tokens_per_s": round(loft[2] / baseline[2], 2)} if both else None}


def test_speed_figures_pick_pairs_and_the_longest_that_fits(tmp_path, capsys):
    from benchmarks import speed_figures

    runs = {"t4-llama8b-long-vs-baseline-2048": _run(2048, ("ok", 6.3, 4000.0), ("ok", 9.3, 3000.0)),
            "t4-llama8b-long-baseline-8192": _run(8192, None, ("ok", 11.9, 5000.0)),
            "t4-llama8b-long-vs-baseline-16384": _run(16384, ("ok", 9.0, 6000.0), ("does_not_fit", None, None)),
            "t4-llama8b-long-baseline-8192-again": _run(8192, None, ("does_not_fit", None, None)),
            "superseded-recipe-x": _run(1024, ("ok", 5.0, 200.0), ("ok", 6.0, 100.0)),
            "t1-other": _run(1024, ("ok", 5.0, 300.0), ("ok", 6.0, 100.0), cap=None)}
    assert speed_figures.ratios(runs) == [("t4-llama8b-long-vs-baseline-2048", 1.33), ("t1-other", 3.0)]
    points = speed_figures.sweep(runs)
    assert sorted(points["baseline"]) == [2048, 8192, 16384]
    assert points["baseline"][8192]["status"] == "does_not_fit"  # the later run of a length wins
    assert speed_figures.longest_fitting(points["baseline"]) == 2048
    assert speed_figures.longest_fitting(points["loft"]) == 16384

    path = tmp_path / "speed-x.json"
    path.write_text(json.dumps({"runs": runs}))
    assert speed_figures.main([str(path), "--out", str(tmp_path / "fig")]) == 0
    for png in ("speed-x-ratios.png", "speed-x-sweep.png"):
        assert (tmp_path / "fig" / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "{'loft': 16384, 'baseline': 2048}" in capsys.readouterr().out
    with pytest.raises(LoftError, match="no runs named nothing-"):
        speed_figures.main([str(path), "--out", str(tmp_path / "fig"), "--sweep", "nothing-"])
    path.write_text("{not json")
    with pytest.raises(LoftError, match="is not a `loft bench speed` results file"):
        speed_figures.main([str(path), "--out", str(tmp_path / "fig")])


def test_results_md_states_the_longest_sequences_the_raw_json_holds():
    from benchmarks import speed_figures

    runs = speed_figures.load_runs(REPO / "benchmarks" / "results" / "speed-2026-11-22.json")
    longest = {r: speed_figures.longest_fitting(p) for r, p in speed_figures.sweep(runs).items()}
    text = (REPO / "benchmarks" / "RESULTS.md").read_text()
    assert f"Loft {longest['loft']:,}" in text and f"the baseline {longest['baseline']:,}" in text
    assert "results/speed-2026-11-22-sweep.png" in text or "figures/speed-2026-11-22-sweep.png" in text


def test_memory_trace_names_the_failed_allocation_and_what_was_live():
    from benchmarks import memory_trace

    ours = [{"filename": "/x/torch/nn/modules/module.py", "line": 1, "name": "_call_impl"},
            {"filename": "/w/training/plugins/tiled_mlp.py", "line": 5, "name": "forward"}]
    trace = [{"action": "alloc", "addr": 1, "size": 2**30, "frames": ours},
             {"action": "alloc", "addr": 2, "size": 2**29, "frames": []},
             {"action": "free_completed", "addr": 2},
             {"action": "alloc", "addr": 3, "size": 2**28, "frames": []},
             {"action": "oom", "size": 2**31, "frames": []},
             {"action": "alloc", "addr": 4, "size": 2**20, "frames": ours}]  # after the failure: not live then
    text = memory_trace.summary({"device_traces": [trace]})
    assert "failed allocation:  2.000 GiB from (no Python frame: autograd backward)" in text
    assert "1.250 GiB in 2 blocks" in text
    assert "1.000 GiB  training/plugins/tiled_mlp.py:5 forward" in text
    assert memory_trace.summary({"device_traces": [trace[:2]]}).startswith("no out-of-memory event")
