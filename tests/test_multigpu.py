"""More than one process: the launch commands `loft train --gpus/--nodes` builds, the per-GPU memory arithmetic and
the multi-GPU combinations `loft doctor` refuses, and one real 2-process run.

The real run is the demo recipe under `loft train --gpus 2` on this CPU machine: accelerate starts torchrun, two
ranks join one gloo process group and train with DDP (one averaged loss per step, not one per rank), the health
guard runs on both ranks and reports once, and the adapter rank 0 writes goes through `loft merge` with its
fidelity check. FSDP2 and ZeRO cannot run here (Axolotl 0.19 builds FSDP2's device mesh on CUDA); their recipes are
validated in tests/test_recipes.py and measured on GPUs by benchmarks/gpu/multigpu.sh.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from training.checks import memory
from training.errors import LoftError
from training.launcher import Topology, allocator_env, check_devices, command, environment
from training.paths import REPO, apply_private_env

apply_private_env()

RECIPES = REPO / "recipes"
FIXTURE = Path(__file__).parent / "fixtures" / "chat-16.jsonl"


def recipe(name: str) -> dict:
    return yaml.safe_load((RECIPES / name).read_text())


# ---------------------------------------------------------------- the launch line
def test_single_process_command_is_the_plain_accelerate_launch():
    assert command("r.yaml")[1:] == ["-m", "accelerate.commands.launch", "-m", "axolotl.cli.train", "r.yaml"]


def test_one_host_n_gpus():
    cmd = command("r.yaml", Topology(gpus=4))
    assert cmd[3:] == ["--multi_gpu", "--num_processes", "4", "--num_machines", "1", "--main_process_port", "0",
                       "-m", "axolotl.cli.train", "r.yaml"]


@pytest.mark.parametrize("rank", [0, 1])
def test_two_nodes_command(rank, tmp_path, capsys):
    """`loft train --nodes 2 --gpus 4 --node-rank R --master-addr …` as the CLI parses it: 8 ranks in all, the same
    rendezvous on both hosts, only the machine rank differs."""
    from training.cli import build_parser

    args = build_parser().parse_args(["train", "recipes/llama-3.1-8b/lora-bf16-ddp-80gb.yaml", "--gpus", "4",
                                      "--nodes", "2", "--node-rank", str(rank), "--master-addr", "10.0.0.1",
                                      "--master-port", "29600", "--name", f"ci-multinode-{rank}",
                                      "--print-command"])
    assert args._run(args) == 0
    line = capsys.readouterr().out.strip().splitlines()[-1].split()
    assert line[1:] == ["-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "8", "--num_machines",
                        "2", "--machine_rank", str(rank), "--main_process_ip", "10.0.0.1", "--main_process_port",
                        "29600", "-m", "axolotl.cli.train", f"runs/ci-multinode-{rank}/recipe.yaml"]
    resolved = yaml.safe_load((REPO / line[-1]).read_text())
    assert "training.plugins.guard.HealthGuardPlugin" in resolved["plugins"]  # every rank runs the guard


@pytest.mark.parametrize("topo,message", [
    (Topology(gpus=2, nodes=2), "needs --master-addr"),
    (Topology(gpus=2, nodes=2, node_rank=2, master_addr="h0"), "outside 0..1"),
    (Topology(gpus=0), "at least 1"),
    (Topology(gpus=2, master_addr="h0"), "only mean something with --nodes"),
])
def test_bad_topology_is_one_clear_error(topo, message):
    with pytest.raises(LoftError, match=message):
        topo.check()


def test_more_gpus_than_the_host_shows_is_refused():
    with pytest.raises(LoftError, match="--gpus 4 but this host sees 2 GPU"):
        check_devices(Topology(gpus=4), visible=2)
    assert check_devices(Topology(gpus=2), visible=2) is None
    assert "CPU processes on gloo" in check_devices(Topology(gpus=2), visible=0)


# ---------------------------------------------------------------- memory per GPU
def test_per_gpu_estimates_follow_each_strategy():
    full = recipe("llama-3.1-8b/full-fsdp2-80gb.yaml")
    one, two = memory.estimate_recipe(full, world=1), memory.estimate_recipe(full, world=2)
    assert two.setup.parallel == "fsdp2" and two.allocated < one.allocated
    state = "trainable (params+grads+optimizer)"
    one1, two1 = (memory.estimate_recipe({**full, "gradient_accumulation_steps": 1}, world=w) for w in (1, 2))
    assert abs(two1.parts[state] - one1.parts[state] / 2) < 0.01  # grads and bf16 AdamW moments, halved
    # accumulating micro-batches, FSDP keeps whole bf16 gradients until the last one syncs them
    assert abs(two.parts[state] - two1.parts[state] - two.arch.params * 2 / 2 / memory.GIB) < 0.01

    ds = {k: v for k, v in full.items() if k not in ("fsdp_version", "fsdp_config")}
    z = {f: memory.estimate_recipe({**ds, "gradient_checkpointing": True, "deepspeed": f"recipes/deepspeed/{f}.json"},
                                   world=2) for f in ("zero2", "zero3", "zero3-offload")}
    assert [z[f].setup.parallel for f in z] == ["zero2", "zero3", "zero3"]
    assert z["zero3-offload"].allocated < z["zero3"].allocated < z["zero2"].allocated
    # DeepSpeed keeps fp32 master weights and fp32 moments: more per GPU than FSDP2's bf16 state
    assert z["zero3"].parts[state] > two.parts[state]

    lora = recipe("llama-3.1-8b/lora-bf16-ddp-80gb.yaml")
    ddp, single = memory.estimate_recipe(lora, world=2), memory.estimate_recipe(lora, world=1)
    assert ddp.setup.parallel == "ddp" and single.setup.parallel == "none"
    assert 0 < ddp.allocated - single.allocated < 0.5  # the gradient buckets of 42M LoRA weights

    qlora = memory.estimate_recipe(recipe("qwen2.5-32b/qlora-fsdp2-24gb.yaml"), world=2)
    assert qlora.loading > qlora.parts["weights"]  # each rank quantizes the whole model before sharding


# ---------------------------------------------------------------- the estimates against the 2-GPU measurements
MEASURED = json.loads((REPO / "benchmarks" / "results" / "multigpu-2026-11-30.json").read_text())["runs"]


def measured_recipe(run: dict) -> dict:
    cfg = yaml.safe_load((REPO / run["recipe"]).read_text())
    for item in run["overrides"]:
        key, value = item.split("=", 1)
        cfg[key] = yaml.safe_load(value)
    return cfg


@pytest.mark.parametrize("name", ["mg-lora8b-1gpu", "mg-lora8b-2gpu", "mg-full8b-cap80", "mg-qlora32b-fsdp1-cap24"])
def test_per_gpu_estimate_is_within_ten_percent_of_the_measured_peak(name):
    run = MEASURED[name]
    est = memory.estimate_recipe(measured_recipe(run), world=run["gpus"])
    assert run["status"] == "ok" and abs(est.allocated / run["peak_allocated_gib"] - 1) <= 0.10, \
        (est.allocated, run["peak_allocated_gib"], est.parts)


def test_the_doctor_says_32b_qlora_fsdp1_fits_24_gib_as_measured():
    # Sharded 4-bit loading under FSDP1: nothing loads above the training peak, and both fit the 24 GiB cap.
    run = MEASURED["mg-qlora32b-fsdp1-cap24"]
    est = memory.estimate_recipe(measured_recipe(run), world=run["gpus"])
    assert run["status"] == "ok" and all(g["peak_reserved_gib"] <= run["cap_gib"] for g in run["per_gpu"])
    assert est.loading <= est.allocated and est.needed <= run["cap_gib"], (est.loading, est.allocated, est.needed)


def test_the_doctor_says_32b_qlora_fsdp2_does_not_load_in_24_gib_as_measured():
    # Every rank quantized the whole model, then ran out of its 24 GiB inside fully_shard: the estimate of the
    # loading peak must reach what was already allocated when it failed, and so not fit the cap.
    run = MEASURED["mg-qlora32b-cap24"]
    est = memory.estimate_recipe(measured_recipe(run), world=run["gpus"])
    assert run["status"] == "does_not_fit"
    assert est.loading >= run["peak_allocated_gib"] and est.needed > run["cap_gib"]
    # Uncapped, the same run peaked while loading (27.46 GiB), well above its training peak (18.80 GiB).
    free = json.loads((REPO / "benchmarks" / "results" / "multigpu-2026-11-30" / "speed-mg-qlora32b-nocap.json")
                      .read_text())
    loft = free["runners"]["loft"]
    est = memory.estimate_recipe(measured_recipe(free), world=free["gpus"])
    assert loft["status"] == "ok" and loft["peak_allocated_gib"] > loft["per_gpu"][0]["train_peak_allocated_gib"]
    assert abs(est.loading / loft["peak_allocated_gib"] - 1) <= 0.10, (est.loading, loft["peak_allocated_gib"])


# ---------------------------------------------------------------- combinations refused before any GPU time
FSDP1_32B, FSDP2_32B, FULL_8B = ("qwen2.5-32b/qlora-fsdp1-24gb.yaml", "qwen2.5-32b/qlora-fsdp2-24gb.yaml",
                                 "llama-3.1-8b/full-fsdp2-80gb.yaml")


def changed(name: str, changes: dict) -> dict:
    """The recipe with `changes` applied: "a.b" keys reach into mappings, None removes the key."""
    cfg = recipe(name)
    for dotted, value in changes.items():
        *parents, key = dotted.split(".")
        node = cfg
        for part in parents:
            node = node[part]
        if value is None:
            node.pop(key)
        else:
            node[key] = value
    return cfg


@pytest.mark.parametrize("name,changes,code", [
    ("llama-3.1-8b/lora-8bit-rslora-24gb.yaml", {"deepspeed": "recipes/deepspeed/zero3.json"}, "LOFT-P403"),
    (FULL_8B, {"deepspeed": "recipes/deepspeed/zero2.json"}, "LOFT-P401"),
    (FSDP2_32B, {"optimizer": "paged_adamw_8bit"}, "LOFT-P406"),
    (FSDP1_32B, {"fsdp_config.cpu_ram_efficient_loading": None, "qlora_sharded_model_loading": None}, "LOFT-P404"),
    ("llama-3.1-8b/lora-bf16-ddp-80gb.yaml", {"deepspeed": "recipes/deepspeed/zero9.json"}, "LOFT-P402"),
    # FSDP settings Axolotl's schema accepts and that then fail, or do nothing, once the model has loaded
    (FSDP1_32B, {"fsdp_config.reshard_after_forward": True}, "LOFT-P409"),
    (FSDP2_32B, {"fsdp_version": 1, "fsdp_config.cpu_ram_efficient_loading": True,
                 "fsdp_config.sync_module_states": True}, "LOFT-P409"),  # the first FSDP1 attempt on 2 GPUs
    (FSDP1_32B, {"fsdp_config.sharding_strategy": "SHARD_GRAD_OP"}, "LOFT-P410"),
    (FULL_8B, {"fsdp_config.fsdp_offload_param": True}, "LOFT-P410"),  # a typo behind Axolotl's fsdp_ prefix
    (FSDP2_32B, {"fsdp_config.use_orig_params": False}, "LOFT-P411"),
    (FULL_8B, {"fsdp_config.final_state_dict_type": "LOCAL_STATE_DICT"}, "LOFT-P412"),
    (FSDP2_32B, {"qlora_sharded_model_loading": True}, "LOFT-P413"),
    (FSDP1_32B, {"fsdp_config.state_dict_type": "SHARDED_STATE_DICT", "save_strategy": "no"}, "LOFT-P414"),
])
def test_doctor_refuses_with_one_error(name, changes, code, tmp_path):
    from training.doctor import diagnose

    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(changed(name, changes)))
    report = diagnose(path, data=False, gpus=2)
    multi = [f for f in report.findings if f.code.startswith("LOFT-P")]
    assert [(f.code, f.severity) for f in multi] == [(code, "error")], multi
    assert "\n" not in multi[0].reason and report.exit_code(strict=False) == 2


def test_shipped_multi_gpu_recipes_pass_the_doctor():
    from training.doctor import diagnose

    for name in ("llama-3.1-8b/lora-bf16-ddp-80gb.yaml", FULL_8B, FSDP2_32B, FSDP1_32B):
        report = diagnose(RECIPES / name, data=False, gpus=2)
        assert report.count("error") == 0, [f for f in report.findings if f.severity == "error"]
        assert report.memory["world"] == 2


def test_the_refused_fsdp_settings_fail_where_the_doctor_says():
    """The FSDP rules above stand on what transformers and accelerate do with Axolotl's validated fsdp_config: if
    an upgrade starts accepting one of these, this fails and the rule can go."""
    from accelerate.utils import FullyShardedDataParallelPlugin
    from transformers import TrainingArguments

    def plugin(**fsdp_config):
        args = TrainingArguments("unused", fsdp=True, fsdp_config=fsdp_config, report_to=[])
        # sync_module_states asks for a CUDA device at once; this machine has none, and it is not what is tested
        return FullyShardedDataParallelPlugin(**{**args.fsdp_plugin_args, "sync_module_states": False})

    with pytest.raises(KeyError, match="TRUE"):  # LOFT-P409: a boolean read as a sharding strategy name
        plugin(fsdp_version=1, reshard_after_forward=True)
    assert plugin(fsdp_version=1).reshard_after_forward.name == "FULL_SHARD"  # the fix: leave it out
    assert plugin(fsdp_version=2, use_orig_params=False).use_orig_params is None  # LOFT-P411: dropped
    with pytest.raises(ValueError, match="LOCAL_STATE_DICT"):  # LOFT-P412
        plugin(fsdp_version=2).set_state_dict_type("LOCAL_STATE_DICT")

    from axolotl.utils.schemas.fsdp import FSDPConfig
    from pydantic import ValidationError

    assert "sharding_strategy" not in FSDPConfig(sharding_strategy="SHARD_GRAD_OP").model_dump()  # LOFT-P410
    with pytest.raises(ValidationError):  # why LOFT-P409 cannot say "write FULL_SHARD": the schema takes a bool
        FSDPConfig(reshard_after_forward="FULL_SHARD")


# ---------------------------------------------------------------- one real 2-process run on this CPU
@pytest.mark.slow
def test_two_cpu_ranks_train_ddp_guard_once_and_merge(tmp_path):
    """`loft train --gpus 2` on the demo recipe: 2 steps of real DDP on gloo, `--resume` on 2 ranks to step 3, then
    `loft merge` of its adapter.

    The guard is made to find something on purpose (G004's learning-rate floor set above the learning rate, in
    warn mode, judged from step 1): both ranks see it, exactly one report must appear, and training goes on."""
    from training.model import ensure_default_model

    ensure_default_model(quiet=True)  # the demo recipe's base_model link
    name = "ci-two-ranks"
    overrides = ["max_steps=2", "micro_batch_size=1", "gradient_accumulation_steps=1", "sequence_len=128",
                 f"datasets.0.path={FIXTURE}", "test_datasets=null", "eval_steps=null", "dataset_num_proc=1",
                 "loft_guard_action=warn", "loft_guard_lr_floor=2.0", "loft_guard_lr_collapse_before=1.0"]
    cmd = [sys.executable, "-m", "training.cli", "train", "recipes/smollm2-135m/lora-cpu.yaml", "--gpus", "2",
           "--name", name, "--no-check"] + [x for o in overrides for x in ("--set", o)]
    env = dict(os.environ, PYTHONUNBUFFERED="1", PYTHONPATH=str(REPO))
    run_dir = REPO / "runs" / name
    shutil.rmtree(run_dir, ignore_errors=True)  # an earlier run's checkpoints would be resumed or counted
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    log = (run_dir / "train.log").read_text(errors="replace")

    assert '"world_size": 2' in log
    losses = re.findall(r"\{'loss': '([\d.]+)'", log)
    assert len(losses) == 2, f"one averaged loss per step from rank 0, got {losses}"  # 4 if the ranks trained alone
    assert log.count("loft guard: G004") == 1, "the guard must report once, from rank 0"
    health = json.loads((run_dir / "adapter" / "health.json").read_text())
    assert health["status"] == "warned" and health["step"] == 2

    # The run ended with checkpoint-2 (save_strategy steps saves at the last step): --resume on 2 ranks with one
    # more step must load it on both and go on from step 2, not start over.
    resume = [x if x != "max_steps=2" else "max_steps=3" for x in cmd] + ["--resume"]
    proc = subprocess.run(resume, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-2000:]
    resumed = (run_dir / "train.log").read_text(errors="replace")[len(log):]
    assert "loft train --resume" in resumed and '"world_size": 2' in resumed
    assert "resume from checkpoint at" in resumed, "Axolotl resumed from the saved checkpoint"
    new_losses = re.findall(r"\{'loss': '([\d.]+)'", resumed)
    assert len(new_losses) == 1, f"one step (3) after resuming at step 2, got {new_losses}"  # 3 if it started over
    state = json.loads((run_dir / "adapter" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["global_step"] == 3 and [h["step"] for h in state["log_history"] if "loss" in h] == [1, 2, 3]

    adapter = run_dir / "adapter"
    assert (adapter / "adapter_model.safetensors").exists() and (adapter / "adapter_config.json").exists()
    out = tmp_path / "merged"
    # fp32: after 2 steps the adapter is a tiny change, and bf16 rounding of the merged weights alone moves this
    # fixture's perplexity past the check's 1% (bf16 merges are tests/test_merge.py's and the demo's to check)
    merge = subprocess.run([sys.executable, "-m", "training.cli", "merge", "--adapter", str(adapter), "--out", str(out),
                            "--eval", str(FIXTURE), "--dtype", "fp32"], cwd=REPO, env=env, capture_output=True,
                           text=True, timeout=1200)
    assert merge.returncode == 0, merge.stdout[-2000:] + merge.stderr[-2000:]
    report = json.loads((out / "merge-report.json").read_text())  # written only when the merge verified
    assert report["passed"] is True and report["verified"] is True and (out / "config.json").exists()


# ---------------------------------------------------------------- the GPU benchmark's arithmetic over ranks
def test_bench_speed_adds_every_ranks_tokens_and_keeps_each_peak():
    """`loft bench speed --gpus 2`: each rank writes its own record; tokens/s counts both ranks' tokens over rank
    0's clock, and the peak reported is the busiest GPU's (benchmarks/gpu/multigpu.sh reads these)."""
    from benchmarks.speed_metrics import summarize

    def rank(r, tokens_per_step, alloc):
        marks = [(10.0 + s, s * tokens_per_step) for s in range(4)]  # one step per second
        return {"runner": "loft", "status": "ok", "rank": r, "device": "NVIDIA H200", "marks": marks,
                "peak_allocated_gib": alloc, "peak_reserved_gib": alloc + 1, "losses": [2.0, 1.9, 1.8]}

    two = summarize({**rank(0, 1000, 30.0), "other_ranks": [rank(1, 900, 31.5)]}, 8_000_000_000, 1, 2, None)
    assert two["gpus"] == 2 and two["tokens_per_s"] == 1900.0 and two["tokens_per_step"] == 1900
    assert two["peak_allocated_gib"] == 31.5 and [g["rank"] for g in two["per_gpu"]] == [0, 1]
    one = summarize(rank(0, 1000, 30.0), 8_000_000_000, 1, 2, None)
    assert one["gpus"] == 1 and one["tokens_per_s"] == 1000.0 and abs(two["mfu"] / one["mfu"] - 0.95) < 1e-3
    failed = summarize({**rank(0, 1000, 30.0), "other_ranks": [{"status": "does_not_fit", "error": "OOM"}]},
                       1, 1, 2, None)
    assert failed["status"] == "does_not_fit"  # one rank out of memory: the run does not fit


def test_launch_environment_sets_expandable_segments_except_under_wsl_or_a_users_choice(monkeypatch):
    """Expandable segments by default; never under WSL (its CUDA lacks the calls), never over a user's setting."""
    for key in ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF", "WSL_DISTRO_NAME", "WSL_INTEROP"):
        monkeypatch.delenv(key, raising=False)
    native = "Linux version 6.8.0-49-generic (buildd@lcy02-amd64-103)"
    wsl = "Linux version 5.15.167.4-microsoft-standard-WSL2 (root@f9c826d3017f)"
    assert allocator_env({}, native) == {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}
    assert allocator_env({}, wsl) == {} and allocator_env({"WSL_DISTRO_NAME": "Ubuntu"}, native) == {}
    assert allocator_env({"PYTORCH_CUDA_ALLOC_CONF": "max_split_size_mb:128"}, native) == {}
    monkeypatch.setenv("PYTORCH_ALLOC_CONF", "expandable_segments:False")
    assert environment()["PYTORCH_ALLOC_CONF"] == "expandable_segments:False"


def test_launch_environment_is_private_when_called_from_python(monkeypatch):
    """train() called from Python (not through `loft`, which sets these in its own process) still launches Axolotl
    with telemetry off and the hub closed; LOFT_ONLINE=1 opens the hub and nothing else; a user's value stays."""
    for key in ("AXOLOTL_DO_NOT_TRACK", "DO_NOT_TRACK", "HF_HUB_OFFLINE", "WANDB_MODE", "LOFT_ONLINE"):
        monkeypatch.delenv(key, raising=False)
    env = environment()
    assert env["AXOLOTL_DO_NOT_TRACK"] == "1" and env["DO_NOT_TRACK"] == "1" and env["HF_HUB_OFFLINE"] == "1"
    monkeypatch.setenv("LOFT_ONLINE", "1")
    monkeypatch.setenv("WANDB_MODE", "online")
    env = environment()
    assert "HF_HUB_OFFLINE" not in env and env["AXOLOTL_DO_NOT_TRACK"] == "1" and env["WANDB_MODE"] == "online"
