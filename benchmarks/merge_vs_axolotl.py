"""`loft merge` side by side with `axolotl merge-lora`: fidelity, wall time and peak RAM on the same adapter.

    .venv/bin/python -m benchmarks.merge_vs_axolotl [--adapter runs/smollm2-135m-lora-cpu/adapter] [--qlora-steps 30]

Writes benchmarks/results/merge-vs-axolotl-<date>.json; benchmarks/MERGE.md summarises the committed run.

  1. lora         loft merge and axolotl merge-lora (its default memory-efficient shard merge) on the demo
                  adapter, each a subprocess whose process tree is polled for RSS, 3 runs each interleaved; both
                  outputs scored against the adapter in PEFT, unmerged, fp32, on the recipe's held-out rows
                  (loft's own metrics), and compared tensor by tensor.
  2. qlora        a short QLoRA run on CPU (bitsandbytes NF4 base, PEFT LoRA on all seven projections, plain
                  AdamW; Axolotl cannot train 4-bit on CPU) on the demo data, then loft's QLoRA gap (three
                  candidates vs the NF4 training view) and axolotl merge-lora with load_in_4bit (its NF4
                  simulation) scored against the same training view, with its two departures from training
                  reproduced one at a time.
  3. seed_failure the demo adapter merged onto a dequantised NF4 copy of its base (what a pre-quantized
                  -bnb-4bit checkpoint becomes when "un-quantized"), naively and through loft's verification.
  4. bounds       correct merges in fp32/fp16/bf16 and five deliberately broken bf16 merges against loft's
                  verification bounds (the numbers behind THRESHOLDS in training/merging/verify.py).
"""

import argparse
import datetime
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

import yaml

from training.merge import merge
from training.merging import sources
from training.merging.plan import layout, merged_shards, read_deltas
from training.merging.qlora_gap import NF4, in_memory_merge
from training.merging.verify import (THRESHOLDS, MergeRejected, compare, encode, eval_rows, judge, load_merged,
                                     logprobs, peft_view)
from training.merging.write import versions
from training.errors import LoftError
from training.paths import REPO, RunDir

RESULTS = REPO / "benchmarks" / "results"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def measured(cmd: list[str], log: Path) -> dict:
    """Run cmd; wall seconds and the peak summed RSS of its process tree, polled every 50 ms."""
    import psutil

    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    start, peak = time.time(), 0
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT)
        root = psutil.Process(proc.pid)
        while proc.poll() is None:
            try:
                peak = max(peak, sum(p.memory_info().rss for p in [root, *root.children(recursive=True)]))
            except psutil.Error:
                pass
            time.sleep(0.05)
    if proc.returncode != 0:
        raise LoftError(f"{' '.join(cmd[:4])} ... failed (exit {proc.returncode}); see {log}")
    return {"wall_seconds": round(time.time() - start, 1), "peak_rss_mb": round(peak / 2**20)}


def axolotl_merge(recipe: dict, adapter: Path, work: Path, name: str) -> tuple[Path, dict]:
    cfg_path = work / f"{name}.yaml"
    cfg_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    out = work / f"axolotl-{name}"
    cost = measured([sys.executable, "-m", "axolotl.cli.merge_lora", str(cfg_path), f"--lora_model_dir={adapter}",
                     f"--output_dir={out}"], work / f"axolotl-{name}.log")
    return out / "merged", cost


def loft_merge(adapter: Path, out: Path, work: Path, extra: list[str]) -> dict:
    cost = measured([sys.executable, "-m", "training.cli", "merge", "--adapter", str(adapter), "--out", str(out),
                     "--force", *extra], work / f"loft-{out.name}.log")
    return cost


class Scorer:
    """Log-probs of any model on the held-out rows, compared with a reference view (loft merge's metrics)."""

    def __init__(self, tokenizer_dir: Path, rows):
        from transformers import AutoTokenizer

        self.encoded = encode(AutoTokenizer.from_pretrained(str(tokenizer_dir)), rows)

    def logprobs(self, model):
        return logprobs(model, self.encoded, "cpu")

    def vs(self, reference, model_or_lp) -> dict:
        lp = model_or_lp if isinstance(model_or_lp, list) else self.logprobs(model_or_lp)
        metrics = compare(reference, lp, self.encoded)
        return {k: float(f"{v:.4g}") if isinstance(v, float) else v for k, v in metrics.items()}


# ---------------------------------------------------------------- 1. LoRA: loft vs axolotl


def weights(path: Path) -> dict:
    from safetensors.torch import load_file

    return {k: v for f in sorted(path.glob("*.safetensors")) for k, v in load_file(f).items()}


def same_tensors(ta: dict, tb: dict) -> dict:
    """How many tensors two merges share bit for bit, and the largest difference among the rest."""
    same = [k for k in ta if k in tb and ta[k].dtype == tb[k].dtype and bool((ta[k] == tb[k]).all())]
    rest = [k for k in ta if k in tb and k not in same]
    diff = max((float((ta[k].float() - tb[k].float()).abs().max()) for k in rest), default=0.0)
    return {"tensors": len(ta), "only_in_one": len(set(ta) ^ set(tb)), "bit_identical": len(same), "max_abs_diff": diff,
            "differing": sorted(rest)[:3]}


def median_cost(costs: list[dict]) -> dict:
    walls = sorted(c["wall_seconds"] for c in costs)
    return {"wall_seconds": walls[len(walls) // 2], "peak_rss_mb": max(c["peak_rss_mb"] for c in costs),
            "runs": costs}


def lora_section(adapter: Path, recipe: dict, base_dir: Path, scorer: Scorer, work: Path, repeats: int) -> dict:
    """Each tool `repeats` times, interleaved, so a neighbour's load hits both alike; median wall, max RSS."""
    reference = scorer.logprobs(peft_view(base_dir, adapter, "cpu"))
    costs = {"loft": [], "loft_verified": [], "axolotl": []}
    for i in range(repeats):
        costs["loft"].append(loft_merge(adapter, work / "loft-lora", work, ["--no-verify"]))
        axolotl_out, cost = axolotl_merge(recipe, adapter, work, f"lora-{i}")
        costs["axolotl"].append(cost)
        costs["loft_verified"].append(loft_merge(adapter, work / "loft-lora-verified", work, []))
    return {
        "reference": "adapter in PEFT, unmerged, fp32, on the full-precision base",
        "loft": {**median_cost(costs["loft"]), "with_verification": median_cost(costs["loft_verified"]),
                 "fidelity": scorer.vs(reference, load_merged(work / "loft-lora", "bf16", "cpu")),
                 "saved_dtype": json.loads((work / "loft-lora" / "config.json").read_text()).get("dtype")},
        "axolotl": {**median_cost(costs["axolotl"]),
                    "fidelity": scorer.vs(reference, load_merged(axolotl_out, "bf16", "cpu")),
                    "saved_dtype": json.loads((axolotl_out / "config.json").read_text()).get("dtype")},
        "loft_vs_axolotl_tensors": same_tensors(weights(work / "loft-lora"), weights(axolotl_out)),
    }


# ---------------------------------------------------------------- 2. QLoRA: train on NF4, compare the merges


def train_qlora(base_dir: Path, base_name: str, data: Path, steps: int, out: Path) -> dict:
    """A real (short) QLoRA run on CPU: the base through bitsandbytes NF4, LoRA r16/α32 on top, loss on answers."""
    import json as _json

    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

    torch.manual_seed(0)
    quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                               bnb_4bit_compute_dtype=torch.float32)
    model = AutoModelForCausalLM.from_pretrained(str(base_dir), quantization_config=quant, dtype=torch.float32,
                                                 device_map="cpu")
    model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=ALL_LINEAR,
                                             task_type="CAUSAL_LM"))
    tok = AutoTokenizer.from_pretrained(str(base_dir))
    rows = [_json.loads(line)["messages"] for line in data.read_text().splitlines()[: steps * 2]]
    encoded = encode(tok, rows)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)
    losses, start = [], time.time()
    model.train()
    for step in range(steps):
        loss = 0.0
        for ids, first in encoded[2 * step: 2 * step + 2]:  # micro-batch 2, one row at a time (no padding)
            labels = torch.tensor([[-100] * first + ids[first:]])
            loss = loss + model(torch.tensor([ids]), labels=labels).loss / 2
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(round(loss.item(), 4))
    model.save_pretrained(out)
    cfg = _json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = base_name
    (out / "adapter_config.json").write_text(_json.dumps(cfg, indent=2))
    return {"steps": steps, "rows": 2 * steps, "seconds": round(time.time() - start, 1),
            "loss_first": losses[0], "loss_last": losses[-1]}


def qlora_section(base_dir: Path, base_name: str, recipe: dict, data: Path, steps: int, scorer: Scorer,
                  work: Path) -> dict:
    run = RunDir(work / "qlora-run")
    training = train_qlora(base_dir, base_name, data, steps, run.adapter)
    q_recipe = {**recipe, "adapter": "qlora", "load_in_4bit": True}
    run.recipe.write_text(yaml.safe_dump(q_recipe, sort_keys=False))
    report = merge(run.adapter, work / "loft-qlora", dtype="bf16", force=True, progress=False)
    gap = report["qlora_gap"]

    quant = sources.quant_settings(q_recipe)
    bare = layout(base_dir, {}, {})
    nf4 = NF4(bare.linear, quant["quant_type"], quant["double_quant"], quant["blocksize"])
    training_view = scorer.logprobs(peft_view(base_dir, run.adapter, "cpu", nf4=nf4))
    axolotl_out, axolotl_cost = axolotl_merge(q_recipe, run.adapter, work, "qlora")
    # Why Axolotl's merge sits far from the training view: its NF4 simulation (a) round-trips every 2-D tensor,
    # the embeddings (and so a tied lm_head) included, which bitsandbytes never quantizes in training, and (b) skips
    # double quantization (it reads the key from a DictDefault, whose missing keys are None, not the True default)
    # although Axolotl trains with it. Each cause alone, and both (which reproduces Axolotl's tensors):
    embeddings = {bare.emb_in, bare.emb_out}
    sources.read_adapter(run.adapter)
    plan = layout(base_dir, *read_deltas(run.adapter))
    axolotl_weights = weights(axolotl_out)
    causes = {}
    for name, keys, double_quant in (("embeddings also rounded", bare.linear | embeddings, True),
                                     ("no double quantization", bare.linear, False),
                                     ("both (Axolotl 0.19)", bare.linear | embeddings, False)):
        merged = in_memory_merge(plan, "bf16", "cpu", NF4(keys, "nf4", double_quant))
        state = {k: v for k, v in merged.state_dict().items() if k in axolotl_weights}
        causes[name] = {"vs_training_view": scorer.vs(training_view, merged),
                        "tensors_vs_axolotl": same_tensors(state, axolotl_weights)}
    return {
        "training": training,
        "loft_verification": report["fidelity"],
        "qlora_gap": gap,
        "axolotl_nf4_simulation": {
            **axolotl_cost, "vs_training_view": scorer.vs(training_view, load_merged(axolotl_out, "bf16", "cpu"))},
        "deq_nf4_merge_variants": causes,
    }


# ---------------------------------------------------------------- 3. the seed failure, in numbers


def seed_section(adapter: Path, base_dir: Path, work: Path, eval_path: Path | None) -> dict:
    """Merge onto an NF4-dequantised copy of the base (a "de-quantized" -bnb-4bit checkpoint) vs onto the base."""
    import torch
    from safetensors.torch import save_file

    deq = work / "base-dequantised"  # no -nf4 suffix: loft would refuse the name itself
    deq.mkdir()
    bare = layout(base_dir, {}, {})
    for name, tensors in merged_shards(bare, torch.bfloat16, nf4=NF4(bare.linear), progress=False):
        save_file(tensors, str(deq / name), metadata={"format": "pt"})
    for f in base_dir.iterdir():
        if f.is_file() and f.suffix != ".safetensors":
            shutil.copy2(f, deq)
    verified = merge(adapter, work / "seed-verified", dtype="bf16", force=True, eval_path=eval_path, progress=False)
    try:
        naive = merge(adapter, work / "seed-naive", base=str(deq), dtype="bf16", force=True, eval_path=eval_path,
                        progress=False)
    except MergeRejected as err:
        naive = err.report
    return {"reference": "the adapter on the base it was trained on, PEFT unmerged fp32",
            "naive_merge_onto_dequantised_nf4_base": {"passed": naive["passed"], **naive["fidelity"]},
            "verified_merge_onto_full_precision_base": {"passed": verified["passed"], **verified["fidelity"]}}


# ---------------------------------------------------------------- 4. the verification bounds


def bounds_section(adapter: Path, base_dir: Path, scorer: Scorer) -> dict:
    """Correct merges in each dtype and deliberately broken bf16 merges, scored against the PEFT reference and
    judged by loft's bounds: the data behind THRESHOLDS in training/merging/verify.py."""
    reference = scorer.logprobs(peft_view(base_dir, adapter, "cpu"))
    sources.read_adapter(adapter)
    plan, full = read_deltas(adapter)
    nf4 = NF4(layout(base_dir, {}, {}).linear)
    scaled = {k: (kind, a, b, s * 2) for k, (kind, a, b, s) in plan.items()}
    cases = {
        "correct, fp32": (plan, "fp32", None),
        "correct, fp16": (plan, "fp16", None),
        "correct, bf16": (plan, "bf16", None),
        "broken: down_proj left out": ({k: v for k, v in plan.items() if "down_proj" not in k}, "bf16", None),
        "broken: layer 0 left out": ({k: v for k, v in plan.items() if ".layers.0." not in k}, "bf16", None),
        "broken: scaling x2": (scaled, "bf16", None),
        "broken: merged onto an NF4-dequantised base": (plan, "bf16", nf4),
        "broken: adapter not applied": ({}, "bf16", None),
    }
    result = {}
    for name, (case_plan, dtype, case_nf4) in cases.items():
        model = in_memory_merge(layout(base_dir, case_plan, full), dtype, "cpu", case_nf4)
        metrics = scorer.vs(reference, model)
        result[name] = {**metrics, "passes_loft_bounds": not judge(metrics, THRESHOLDS[dtype])}
        if name == "correct, bf16":  # the same bf16 weights computed in fp32: how much is weight rounding
            result["correct, bf16 weights, fp32 compute"] = scorer.vs(reference, model.float())
    return result


# ---------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--adapter", type=Path, default=RunDir.named("smollm2-135m-lora-cpu").adapter)
    p.add_argument("--qlora-steps", type=int, default=30, help="QLoRA steps on CPU for section 2 (0 = skip)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs of each merge in section 1 (default 3)")
    p.add_argument("--out", type=Path, help="result JSON (default benchmarks/results/merge-vs-axolotl-<date>.json)")
    args = p.parse_args(argv)
    from training.paths import apply_private_env

    apply_private_env()
    adapter = args.adapter.resolve()
    adapter_cfg = sources.read_adapter(adapter)
    base_name = adapter_cfg["base_model_name_or_path"]
    base_dir = sources.resolve_base(base_name)
    recipe_path = sources.find_recipe(adapter)
    if recipe_path is None:
        raise LoftError(f"no recipe found for {adapter}; the benchmark needs one for axolotl merge-lora")
    recipe = yaml.safe_load(recipe_path.read_text())
    rows, source = eval_rows(None, recipe)
    eval_path = Path(source) if source != "built-in" else None
    scorer = Scorer(adapter if (adapter / "tokenizer_config.json").exists() else base_dir, rows)

    def rel(path: Path) -> str:
        return str(path.relative_to(REPO)) if path.is_relative_to(REPO) else str(path)

    date = datetime.date.today().isoformat()
    result = {"date": date, "device": f"CPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
              "versions": {**versions(), "axolotl": version("axolotl")},
              "adapter": rel(adapter), "base": base_name, "recipe": rel(recipe_path), "eval_rows": len(rows),
              "eval_source": rel(eval_path) if eval_path else source, "thresholds_bf16": THRESHOLDS["bf16"],
              "load_average_1min": {"start": round(os.getloadavg()[0], 2)}}
    with tempfile.TemporaryDirectory(dir=REPO / "runs", prefix=".merge-bench-") as tmp:
        work = Path(tmp)
        print("== 1. LoRA: loft merge vs axolotl merge-lora", flush=True)
        result["lora"] = lora_section(adapter, recipe, base_dir, scorer, work, args.repeats)
        print(json.dumps(result["lora"], indent=1), flush=True)
        print("== 3. seed failure", flush=True)
        result["seed_failure"] = seed_section(adapter, base_dir, work, eval_path)
        print(json.dumps(result["seed_failure"], indent=1), flush=True)
        print("== 4. verification bounds", flush=True)
        result["bounds"] = bounds_section(adapter, base_dir, scorer)
        if args.qlora_steps:
            print("== 2. QLoRA gap", flush=True)
            data = REPO / recipe["datasets"][0]["path"]
            result["qlora"] = qlora_section(base_dir, base_name, recipe, data, args.qlora_steps, scorer, work)
    result["load_average_1min"]["end"] = round(os.getloadavg()[0], 2)  # other work on the machine, for the timings
    out = args.out or RESULTS / f"merge-vs-axolotl-{date}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
