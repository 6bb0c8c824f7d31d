"""`loft bench speed RECIPE`: tokens/s, peak memory and MFU of a recipe on one GPU, optionally against the tools
people would pick instead, in the same invocation (`--vs trl,unsloth,naive`; the runners: benchmarks/peers/).

Nothing is downloaded. The model is random-initialised from the recipe's architecture (training/archs/*.json,
or --arch), and the data is synthetic: a word-level tokenizer ("w0".."w3999", ChatML specials) whose every
word is one token, so row lengths are exact. Throughput and memory do not depend on weight or token values.

Data profiles (--data):
  shakespeare  rows shaped like the recipes' own data (runs/data/shakespeare/train.jsonl): log-normal lengths,
               median 184 tokens, sigma 0.15 (measured 2026-11-22 with the SmolLM2 tokenizer, 2,000 rows).
  full         every row fills sequence_len (DPO: prompt a quarter, chosen three quarters, rejected 90% of that).

Every runner is measured the same way: benchmarks/speed_probe.py counts tokens and marks the steps inside the
run, benchmarks/speed_metrics.py turns the marks into tokens/s, MFU and per-GPU peaks.
"""

import contextlib
import json
import math
import os
import random
import shlex
import sys
from datetime import date
from pathlib import Path

from benchmarks import peers, speed_metrics
from benchmarks.peers import harness
from training import recipe as recipes
from training.arch import shipped_config, shipped_names
from training.axolotl import DROP, PAD_ID, WORDS, launch, random_model, word_tokenizer
from training.errors import LoftError, guarded
from training.launcher import Topology
from training.paths import RUNS, RunDir
from training.recipe import RecipeFacts

HELP = "GPU speed and memory of a recipe (random-init model, synthetic data), optionally vs TRL, Unsloth, naive TRL."
EXAMPLE = ("loft bench speed recipes/qwen2.5-7b/qlora-sft-12gb.yaml --cap-gib 12 --steps 4 --warmup 2 "
           "--vs trl,unsloth,naive")

BENCH = RUNS / "bench-speed"

# A 4-layer model of the Qwen2 shape, small enough for a CPU test; vocabulary just above the tokenizer's.
TINY = {"architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": 64, "intermediate_size": 128,
        "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "vocab_size": 4096,
        "max_position_embeddings": 32768, "rms_norm_eps": 1e-6, "rope_theta": 1e6, "tie_word_embeddings": False}

TURN_TOKENS = 3  # <|im_start|> role ... <|im_end|>: what ChatML adds to each turn
PROFILES = {"shakespeare": (184, 0.15)}  # (median tokens, log-normal sigma) of a whole row


# ---------------------------------------------------------------- architecture
def resolve_arch(base_model: str, arch: str | None = None) -> tuple[str, dict]:
    """(name, HF config dict) for --arch (tiny, a file, or a training/archs name) or for the recipe's base_model."""
    if arch == "tiny":
        return "tiny", dict(TINY)
    if arch and Path(arch).is_file():
        return Path(arch).stem, json.loads(Path(arch).read_text())
    path = shipped_config(arch or base_model)
    if path:
        return path.stem, json.loads(path.read_text())
    known = ", ".join(shipped_names())
    raise LoftError(f"no architecture for `{arch or base_model}`; pass --arch tiny, --arch PATH/config.json "
                    f"or one of: {known}")


# ---------------------------------------------------------------- synthetic data and model
def row_lengths(n: int, data: str, seq_len: int, seed: int = 0) -> list[int]:
    """Token length of each whole row (template included), clipped into [32, seq_len - 8]."""
    rng = random.Random(seed)
    if data == "full":
        return [seq_len - 8] * n
    median, sigma = PROFILES[data]
    return [max(32, min(seq_len - 8, round(rng.lognormvariate(math.log(median), sigma)))) for _ in range(n)]


def _words(rng: random.Random, n: int) -> str:
    return " ".join(f"w{rng.randrange(WORDS)}" for _ in range(max(1, n)))


def write_rows(path: Path, task: str, lengths: list[int], seed: int = 0) -> float:
    """Write chat rows (sft) or preference rows (dpo) of the given token lengths; return the mean row length.

    sft: {"messages": [user, assistant]}, 2 turns of ChatML = 6 template tokens, the rest split 40/60.
    dpo: {"prompt", "chosen", "rejected"}: prompt a quarter, chosen the rest, rejected 90% of chosen.
    """
    rng = random.Random(seed)
    with path.open("w") as fh:
        for n in lengths:
            body = n - 2 * TURN_TOKENS
            if task == "sft":
                user = body * 2 // 5
                row = {"messages": [{"role": "user", "content": _words(rng, user)},
                                    {"role": "assistant", "content": _words(rng, body - user)}]}
            else:
                prompt = body // 4
                row = {"prompt": _words(rng, prompt), "chosen": _words(rng, body - prompt),
                       "rejected": _words(rng, (body - prompt) * 9 // 10)}
            fh.write(json.dumps(row) + "\n")
    return sum(lengths) / len(lengths)


# ---------------------------------------------------------------- runners
PLUGIN = "benchmarks.speed_probe.SpeedPlugin"


def task_of(cfg: dict) -> str:
    rl = RecipeFacts.of(cfg).rl
    if rl is None:
        return "sft"
    if rl == "dpo":
        return "dpo"
    raise LoftError(f"`rl: {rl}` is not benchmarked; loft bench speed measures SFT and DPO recipes")


def bench_config(cfg: dict, model_dir: Path, tokenizer: Path, data: Path, total_steps: int) -> dict:
    """The recipe with its model, data, evaluation and saving swapped for the benchmark's; compute keys untouched."""
    out = {k: v for k, v in cfg.items() if k not in DROP}
    if task_of(cfg) == "sft":
        dataset = {"path": str(data), "ds_type": "json", "type": "chat_template", "field_messages": "messages",
                   "roles_to_train": ["assistant"]}
    else:
        dataset = {"path": str(data), "ds_type": "json", "split": "train", "type": "chatml.default"}
    out.update(base_model=str(model_dir), tokenizer_config=str(tokenizer), chat_template="tokenizer_default", datasets=[dataset], val_set_size=0,
               max_steps=total_steps, num_epochs=1000, save_strategy="no", logging_steps=1, use_tensorboard=False,
               plugins=[p for p in cfg.get("plugins") or [] if p != PLUGIN] + [PLUGIN])
    return out


def rank_files(path: Path) -> list[Path]:
    """The other ranks' records beside rank 0's (speed.rank1.json, …; benchmarks/speed_probe.py writes them)."""
    return sorted(path.parent.glob(f"{path.stem}.rank*{path.suffix}"), key=lambda p: int(p.stem.split("rank")[-1]))


def read_result(path: Path, log: Path) -> dict:
    result = harness.read_result(path, log, "loft")
    others = [json.loads(p.read_text()) for p in rank_files(path)] if path.exists() else []
    if others:  # one record per rank: speed_metrics.summarize() adds their tokens and keeps every rank's peak
        result["other_ranks"] = others
    return result


def run_loft(recipe: Path, cfg: dict, work: Path, env: dict, gpus: int = 1) -> dict:
    run_dir = work / "loft"
    run = RunDir(run_dir)
    out = run_dir / "speed.json"
    for stale in [out, *rank_files(out)]:
        stale.unlink(missing_ok=True)
    cfg = dict(cfg, output_dir=str(run.adapter), dataset_prepared_path=str(run.prepared))
    resolved = recipes.write(cfg, run_dir, recipe)
    print(f"loft bench speed: loft (Axolotl) -> {run.train_log}", flush=True)
    saved = dict(os.environ)
    os.environ.update(env)
    try:
        with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):  # Axolotl's output: train.log
            launch(resolved, run.train_log, topo=Topology(gpus=gpus))
    except LoftError:
        pass  # an out-of-memory crash left a "does_not_fit" record; anything else is reported as an error
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return read_result(out, run.train_log)


# ---------------------------------------------------------------- report
def invocation() -> str:
    """The command line as a user types it, whether through `loft bench speed` or `python -m benchmarks.speed`."""
    argv = sys.argv[sys.argv.index("speed") + 1:] if "speed" in sys.argv else sys.argv[1:]
    return " ".join(["loft bench speed"] + [shlex.quote(a) for a in argv])


def estimated_gib(cfg: dict, gpus: int = 1) -> float | None:
    """training/checks/memory.py's estimate of peak allocated GiB (per GPU) for this exact config, to calibrate it against;
    the same arithmetic `loft doctor --gpus N` prints."""
    try:
        from training.checks.memory import estimate_recipe
    except ImportError:
        return None
    est = estimate_recipe(cfg, world=gpus)
    return round(est.allocated, 3) if est else None


# ---------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("recipe", type=Path, help="an SFT or DPO recipe, e.g. recipes/qwen2.5-7b/qlora-sft-8gb.yaml")
    parser.add_argument("--arch", help="architecture: a training/archs name, a config.json path, or `tiny` "
                        "(default: the recipe's base_model)")
    parser.add_argument("--cap-gib", type=float, help="emulate a card with this much GPU memory (e.g. 12)")
    parser.add_argument("--baseline-cap-gib", type=float, metavar="N",
                        help="the baseline's cap when it differs from --cap-gib (0: uncapped), e.g. to time a "
                             "baseline that does not fit the card Loft targets")
    parser.add_argument("--steps", type=int, default=8, help="timed optimizer steps (default 8)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed optimizer steps first (default 2)")
    parser.add_argument("--vs", metavar="RUNNERS",
                        help="also run these runners on the same rows and print Loft's ratios, comma-separated: trl "
                             "(TRL tuned as its docs advise), unsloth, naive (the hand-written TRL baseline; "
                             "`baseline` is the same); a runner that cannot run here is recorded with its reason")
    parser.add_argument("--only", metavar="RUNNERS",
                        help="run just these runners (comma-separated: loft, trl, unsloth, naive), e.g. one "
                             "runner's sequence sweep")
    parser.add_argument("--data", choices=["shakespeare", "full"], default="shakespeare",
                        help="row lengths: like the recipes' Shakespeare rows, or every row full (default shakespeare)")
    parser.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                        help="override a recipe key before benchmarking (repeatable)")
    parser.add_argument("--name", help="label of this measurement (default: the recipe's run name)")
    parser.add_argument("--json", type=Path, help="also write the result here (default: runs/bench-speed/NAME/speed.json)")
    parser.add_argument("--profile", action="store_true", help="profile one extra step per runner (top kernels)")
    parser.add_argument("--peak-tflops", type=float, help="dense bf16 peak of this GPU, if not in the built-in table")
    parser.add_argument("--gpus", type=int, default=1, metavar="N",
                        help="run Loft on N GPUs (`loft train --gpus N`); tokens/s counts every rank, peaks are per GPU")


def require_gpu() -> None:
    """Throughput and peak memory are GPU measurements: without one, say so now (not after a minute of setup)."""
    import torch

    if not torch.cuda.is_available():
        raise LoftError("loft bench speed measures training on a CUDA GPU and torch sees none here; run it on a GPU "
                        "machine (`loft doctor RECIPE --gpu PROFILE` estimates memory without one)")


def baseline_cap(cap_gib: float | None, baseline_cap_gib: float | None) -> float | None:
    """The baseline runs under --cap-gib unless --baseline-cap-gib says otherwise (0 = no cap)."""
    if baseline_cap_gib is None:
        return cap_gib
    return baseline_cap_gib or None


def runners(vs: str | None, only: str | None) -> list[str]:
    """Results keys to run, Loft first: `--vs trl,unsloth` -> [loft, trl, unsloth]; `--only unsloth` -> [unsloth]."""
    if only and vs:
        raise LoftError("--only picks the runners by itself; drop --vs (e.g. --only loft,trl,unsloth)")
    if not only:
        return ["loft"] + (peers.parse_runners(vs) if vs else [])
    names = [n.strip() for n in only.split(",")]
    return (["loft"] if "loft" in names else []) + (
        peers.parse_runners(",".join(n for n in names if n != "loft")) if set(names) - {"loft"} else [])


def run(args) -> int:
    if args.steps < 1 or args.warmup < 0:
        raise LoftError("--steps must be at least 1 and --warmup at least 0")
    keys = runners(args.vs, args.only)
    if args.gpus < 1 or (args.gpus > 1 and keys != ["loft"]):
        raise LoftError("--gpus N needs N >= 1, and the peers (TRL, Unsloth, naive) run on one GPU: drop --vs/--only")
    if (args.cap_gib is not None and args.cap_gib <= 0) or (args.baseline_cap_gib or 0) < 0:
        raise LoftError("--cap-gib must be a positive number of GiB (e.g. 12); --baseline-cap-gib 0 lifts the "
                        "baseline's cap, and no cap is below 0")
    cfg = recipes.apply_overrides(recipes.load(args.recipe), args.overrides)
    require_gpu()
    if not RecipeFacts.of(cfg).sequence_len_set:
        raise LoftError(f"{args.recipe} sets no sequence_len; the benchmark needs one")
    task = task_of(cfg)
    arch_name, arch = resolve_arch(str(cfg.get("base_model", "")), args.arch)
    name = args.name or recipes.default_run_name(args.recipe)
    work = BENCH / name
    work.mkdir(parents=True, exist_ok=True)
    total = args.warmup + args.steps + (1 if args.profile else 0)
    profile_step = total if args.profile else None

    # Data: enough rows for the Loft run's tokens per step, times the steps, with a margin.
    seq = RecipeFacts.of(cfg).sequence_len
    mb, ga = cfg.get("micro_batch_size", 1), cfg.get("gradient_accumulation_steps", 1)
    mean = sum(row_lengths(256, args.data, seq)) / 256
    packed = bool(cfg.get("sample_packing")) and task == "sft"
    loft_step_tokens = mb * ga * (seq if packed else mean) * args.gpus  # every rank takes its own rows
    # rows for one step more than the timed ones whether or not --profile adds its step: profiling a run must not
    # change its rows, so the losses of a profiled run and an unprofiled one of the same steps compare one to one
    rows = math.ceil((args.warmup + args.steps + 1) * loft_step_tokens / mean * 1.5) + 64
    data = work / f"{task}-{args.data}-{seq}.jsonl"
    mean = write_rows(data, task, row_lengths(rows, args.data, seq), seed=0)

    model_dir, tokenizer = random_model(arch_name, arch), word_tokenizer()
    params = json.loads((model_dir / "loft-random.json").read_text())["n_params"]
    env = {"LOFT_SPEED_OUT": str(work / "loft" / "speed.json"), "LOFT_SPEED_PAD_ID": str(PAD_ID)}
    if args.cap_gib:
        env["LOFT_SPEED_CAP_GIB"] = str(args.cap_gib)
    if profile_step:
        env["LOFT_SPEED_PROFILE_STEP"] = str(profile_step)

    results = {}
    if "loft" in keys:
        (work / "loft").mkdir(parents=True, exist_ok=True)
        loft_cfg = bench_config(cfg, model_dir, tokenizer, data, total)
        results["loft"] = speed_metrics.summarize(run_loft(args.recipe, loft_cfg, work, env, args.gpus), params, args.warmup,
                                    args.steps, args.peak_tflops)
        results["loft"].update(estimated_allocated_gib=estimated_gib(loft_cfg, args.gpus), versions=peers.versions(),
                               settings={k: v for k, v in cfg.items() if k not in DROP})
        print(speed_metrics.line(results["loft"]), flush=True)
    # Same tokens per optimizer step for every runner (harness.grad_accum). Peers pack short rows when the recipe
    # does; full-length rows have nothing to pack, and the tools' docs advise packing only for short rows.
    step_tokens = results.get("loft", {}).get("tokens_per_step") or loft_step_tokens
    for key in (k for k in keys if k != "loft"):
        packs = packed and args.data != "full" and key != "baseline"
        key_ga = harness.grad_accum(packs, packed, ga, mb, step_tokens, mean)
        cap = baseline_cap(args.cap_gib, args.baseline_cap_gib) if key == "baseline" else args.cap_gib
        cmd = harness.command(key, task, cfg, model_dir, tokenizer, data, work / key / "speed.json", total, key_ga,
                              cap, profile_step, packing=packs)
        results[key] = speed_metrics.summarize(harness.run(key, cmd, work), params, args.warmup, args.steps, args.peak_tflops)
        results[key].update(grad_accum=key_ga, packing=packs)
        print(speed_metrics.line(results[key]), flush=True)

    report = {
        "name": name, "recipe": str(args.recipe), "overrides": args.overrides, "task": task, "arch": arch_name,
        "n_params": params, "date": date.today().isoformat(), "versions": peers.versions(),
        "command": invocation(),
        "data": {"profile": args.data, "rows": rows, "mean_row_tokens": round(mean, 1), "sequence_len": seq},
        "warmup": args.warmup, "steps": args.steps, "cap_gib": args.cap_gib, "gpus": args.gpus,
        "baseline_cap_gib": baseline_cap(args.cap_gib, args.baseline_cap_gib), "runners": results,
        "versus": harness.versus(results), "strongest": harness.strongest(results),
        "ratios": harness.versus(results).get("baseline"),  # Loft ÷ naive, the key earlier results files use
        "definitions": {"tokens_per_s": "non-padding input tokens of grad-enabled forwards in the timed optimizer "
                        "steps / synchronised wall-clock from the end of the last warm-up step to the end of the "
                        "last timed step", "mfu": "6 * n_params * tokens_per_s / dense bf16 peak"},
    }
    if "loft" in results:
        print("\n".join(harness.summary_lines(results)), flush=True)
    text = json.dumps(report, indent=1)
    (work / "speed.json").write_text(text)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(text)
    failed = [r["runner"] for r in results.values() if r.get("status") == "error"]
    if failed:
        raise LoftError(f"{', '.join(failed)} failed; logs under {work}")
    return 0


if __name__ == "__main__":  # `python -m benchmarks.speed ...` works where the `loft` entry point is not installed
    import argparse

    from training.paths import apply_private_env

    parser = argparse.ArgumentParser(prog="loft bench speed", description=HELP, epilog=f"example: {EXAMPLE}")
    add_arguments(parser)
    parsed = parser.parse_args()
    apply_private_env()
    sys.exit(guarded("loft bench speed", run, parsed))
