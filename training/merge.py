"""`loft merge`: fold a LoRA adapter into its full-precision base, shard by shard, then prove the result.

Why not `PeftModel.merge_and_unload()`: it holds the whole model in memory, and on a model with tied embeddings
(SmolLM2, Llama-3.2, Gemma) an adapter on lm_head is added into the matrix the input embeddings share, so the
merge silently changes the embeddings too (tests/test_merge.py shows it). Here each safetensors shard of the base
is read alone, scaling × B @ A is added in fp32 to the weights in it (PEFT's formula and PEFT's config), and the
shard is written in --dtype: peak RAM ≈ one shard + the adapter. Tied embeddings that the adapter touches are
written untied, so lm_head and embed_tokens each get exactly what PEFT's unmerged model computes.

Verification (default on): the merged directory, loaded as written, against the adapter on its training base in
PEFT, unmerged, fp32, on held-out rows: per-token KL, top-1 agreement, perplexity on the assistant text, bounded
by the dtype's measured rounding floor plus an allowance for the merge.
A merge that fails is never deleted (it cost real time, and its report says why): it is kept, marked, as
`<out>.REJECTED/` (weights, merge-report.{json,md}) beside where it would have been, and nothing loads it as <out>.
For a QLoRA recipe (load_in_4bit) the report adds the QLoRA gap: which merge is closest to the NF4 training view.

Output: <out>/ weights + config + tokenizer, loft-manifest.json (hashes and versions), merge-report.{json,md}.
Nothing half-written: the work happens in a hidden partial folder beside <out>, renamed into place at the end.

The parts live in training/merging/: sources (what goes onto what), plan (the shard plan, built once), write
(the folder and its manifest), verify (the fidelity check), qlora_gap. This module strings them together.
"""

import gc
import json
import time
from pathlib import Path

from training.errors import LoftError
from training.merging import plan as shard_plan
from training.merging import sources, write
from training.merging.plan import DTYPES
from training.merging.qlora_gap import qlora_gap
from training.merging.verify import MergeRejected, eval_rows, verification
from training.paths import RunDir

HELP = "Merge a LoRA adapter into its full-precision base shard by shard, and verify the merge against PEFT."
EXAMPLE = "loft merge --adapter runs/smollm2-135m-lora-cpu/adapter --out merged_models/smollm2-shakespeare"


def merge(adapter_dir, out_dir=None, base=None, dtype="bf16", force=False, verify=True, eval_path=None,
          device="cpu", progress=True) -> dict:
    """Merge, verify, and move into place; return the report (raise MergeRejected if verification fails)."""
    if dtype not in DTYPES:
        raise LoftError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    job = sources.find(Path(adapter_dir), base, out_dir, dtype, device, progress)
    if job.out.exists() and not force:
        raise LoftError(f"{job.out} already exists; pass --force to replace it, or choose another --out")
    if device == "cuda":
        import torch

        if not torch.cuda.is_available():
            raise LoftError("--device cuda but torch sees no GPU; drop --device (CPU is the default)")
    rows, source = eval_rows(Path(eval_path) if eval_path else None, job.recipe) if verify else ([], None)
    try:
        with write.partial_folder(job.out) as tmp:
            return merge_into(tmp, job, verify, rows, source)
    finally:
        gc.collect()


def merge_into(tmp: Path, job: sources.MergeJob, check: bool, rows: list, source: str | None) -> dict:
    """Merge into the partial folder `tmp`, verify, write manifest and report, and rename it into place."""
    started = time.time()
    deltas, full = shard_plan.read_deltas(job.adapter_dir)
    print(f"loft merge: {job.adapter_dir} + {job.base_dir} -> {job.out} ({job.dtype}, {len(deltas)} LoRA tensors, "
          f"{len(full)} full modules)", flush=True)
    plan = shard_plan.layout(job.base_dir, deltas, full)  # built once: the writer and the QLoRA gap share it
    written = write.write_merged(tmp, job, plan)
    merge_s = time.time() - started
    report = {"passed": None, "adapter": str(job.adapter_dir), "base": job.base_name, "base_dir": str(job.base_dir),
              "training_base": str(job.training_dir), "pairing_note": job.pairing_note, "out": str(job.out),
              "dtype": job.dtype, "recipe": str(job.recipe_path) if job.recipe_path else None,
              "merge_seconds": round(merge_s, 2), **written}
    if check:
        result, views = verification(tmp, job, rows, source)
        report.update(result)
        if job.quant:
            report["qlora_gap"] = qlora_gap(job, plan, views)
        report["verify_seconds"] = round(time.time() - started - merge_s, 2)
    report["verified"] = bool(check)
    write.write_manifest(tmp, job, {**written, "verified": bool(check), "passed": report["passed"]})
    rejected = write.rejected_path(job.out)
    if report["passed"] is False:
        report["out"] = str(rejected)
    summary = summarize(report)
    print(summary, flush=True)
    (tmp / RunDir.MERGE_JSON).write_text(json.dumps(report, indent=2))
    (tmp / RunDir.MERGE_MD).write_text(summary + "\n")
    write.place(tmp, job.out, report["passed"])
    if report["passed"] is False:
        raise MergeRejected(f"verification failed ({'; '.join(report['failures'])}); the merged weights are kept, "
                            f"marked, in {rejected} (report: {rejected / RunDir.MERGE_MD}); check that --base "
                            "is the model the adapter was trained on", report)
    return report


def summarize(report: dict) -> str:
    lines = [f"# loft merge: {report['out']}", "",
             f"- adapter: {report['adapter']}", f"- base: {report['base']} ({report['base_dir']})",
             (f"- dtype: {report['dtype']}; merge {report['merge_seconds']} s; "
             f"embeddings {'untied' if report['untied_embeddings'] else 'as in the base'}")]
    if report.get("pairing_note"):
        lines.append(f"- note: {report['pairing_note']}")
    if not report["verified"]:
        return "\n".join(lines + ["- verification: skipped (--no-verify)"])
    m, t = report["fidelity"], report["thresholds"]
    f = report.get("floor") or {"kl_mean": 0.0, "kl_max": 0.0, "top1": 1.0, "ppl_rel": 0.0}
    lines += [(f"- verification ({report['rows']} rows from {report['eval_source']}, {m['tokens']} tokens; "
              f"reference: {report['reference']}): **{'PASS' if report['passed'] else 'FAIL'}**"),
              f"- rounding floor: {report.get('floor_is') or 'fp32: none'}; bound = floor + allowance", "",
              "| metric | merged | floor | bound |", "|---|---|---|---|",
              f"| KL mean | {m['kl_mean']:.3g} | {f['kl_mean']:.3g} | ≤ {t['kl_mean']:.3g} |",
              f"| KL max | {m['kl_max']:.3g} | {f['kl_max']:.3g} | ≤ {t['kl_max']:.3g} |",
              f"| top-1 agreement | {m['top1']:.4f} | {f['top1']:.4f} | ≥ {t['top1_min']:.4f} |",
              (f"| answer perplexity | {m['ppl_candidate']:.3f} (reference {m['ppl_reference']:.3f}, "
               f"{m['ppl_rel']:.2%} off) | {f['ppl_rel']:.2%} off | ± {t['ppl_rel']:.2%} |")]
    for failure in report["failures"]:
        lines.append(f"- FAIL: {failure}")
    gap = report.get("qlora_gap")
    if gap:
        lines += ["", f"QLoRA gap, against the training view ({gap['training_view']}):", "",
                  "| candidate | KL mean | KL max | top-1 | answer ppl |", "|---|---|---|---|---|"]
        for name, c in gap["candidates"].items():
            lines.append(f"| {name} | {c['kl_mean']:.3g} | {c['kl_max']:.3g} | {c['top1']:.4f} | "
                         f"{c['ppl_candidate']:.3f} |")
        training_ppl = next(iter(gap["candidates"].values()))["ppl_reference"]
        lines.append(f"\ntraining view answer perplexity {training_ppl:.3f}; closest to it: {gap['closest']} "
                     f"({gap['kl_ratio_next_to_closest']:.1f}× lower KL than the next)")
    return "\n".join(lines)


# ---------------------------------------------------------------- CLI


def add_arguments(parser) -> None:
    parser.add_argument("--adapter", required=True, type=Path, help="LoRA output folder (adapter_config.json inside)")
    parser.add_argument("--base", help="full-precision base, hub id or dir (default: the adapter's recorded base)")
    parser.add_argument("--out", type=Path, help="output dir (default: merged_models/<run name>)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bf16", help="saved dtype (default bf16)")
    parser.add_argument("--force", action="store_true", help="replace an existing --out")
    parser.add_argument("--eval", type=Path, help="held-out JSONL for verification (default: the recipe's test split)")
    parser.add_argument("--no-verify", action="store_true", help="skip the fidelity check (the manifest says so)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where to merge and verify")


def run(args) -> int:
    merge(args.adapter, args.out, base=args.base, dtype=args.dtype, force=args.force, verify=not args.no_verify,
          eval_path=args.eval, device=args.device)
    return 0
