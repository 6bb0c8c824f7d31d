"""The fidelity check: the merged folder, loaded as written, against the adapter on its training base in PEFT,
unmerged, fp32, on held-out rows (the recipe's test_datasets, else 8 built-in chats): per-token KL, top-1
agreement, perplexity on the assistant text.

The bounds are the dtype's rounding floor (the base alone, rounded and computed in the chosen dtype, against the
base in fp32, on the same rows) plus an allowance for the merge: bf16 rounding alone costs a 135M model ~1% of
perplexity, which a fixed bound would blame on the merge.
"""

import gc
import math
from dataclasses import dataclass
from pathlib import Path

from training.errors import LoftError, read_jsonl
from training.merging.plan import torch_dtype
from training.merging.sources import MergeJob
from training.paths import REPO

ROW_SHAPES = '{"messages": [...]} or {"text": "..."}'  # the held-out rows --eval reads
MAX_ROWS, MAX_TOKENS = 8, 256  # held-out rows and tokens per row: enough to see a wrong merge, cheap on CPU

# Allowances per saved dtype, added to the measured rounding floor (see bounds()): the pass bound for KL mean is
# floor + 4e-3 in bf16, and so on. From SmolLM2-135M + the demo adapter on CPU (benchmarks/MERGE.md has the table).
# A correct merge measured: bf16 KL mean 1.0-1.5e-3, max <= 0.02, top-1 0.95-0.97 (bf16 *compute* is 90% of
# that: the same bf16 weights run in fp32 give KL 8e-5); fp16 KL 2.5e-5, top-1 0.998; fp32 KL 5e-8, top-1 1.
# Broken merges measured in bf16: down_proj left out KL 8e-3; layer 0 left out KL 0.015, max 0.3, top-1 0.90;
# scaling ×2 KL 0.21; onto an NF4-dequantised base KL 0.25, top-1 0.69; adapter not applied KL 0.41.
# The KL bounds sit 3-5× above the worst correct value; the smallest breakage measured still fails (on KL mean).
# The floor matters most for perplexity: bf16 alone moves a 135M model's answer perplexity by ~1%, so a fixed 1%
# bound rejected correct merges (a trained rank-4 adapter: 1.01%, its KL equal to a zero adapter's).
THRESHOLDS = {
    "bf16": {"kl_mean": 4e-3, "kl_max": 0.1, "top1_min": 0.90, "ppl_rel": 0.01},
    "fp16": {"kl_mean": 2e-4, "kl_max": 5e-3, "top1_min": 0.98, "ppl_rel": 0.005},
    "fp32": {"kl_mean": 1e-6, "kl_max": 1e-4, "top1_min": 0.995, "ppl_rel": 1e-4},
}

# Used when the recipe has no held-out split: short, varied chats whose answers give a perplexity.
BUILTIN_CHATS = [
    ("What is the capital of France?", "The capital of France is Paris."),
    ("Write a haiku about the sea.",
     "Grey waves fold and break,\nsalt wind combs the dune grasses,\ngulls argue at dusk."),
    ("Explain what a prime number is.",
     "A prime number is a whole number above 1 whose only divisors are 1 and itself."),
    ("Give me three tips for sleeping better.",
     "Keep a regular bedtime, avoid screens late at night, and keep the room cool."),
    ("Translate 'good morning' into Spanish.", "'Good morning' in Spanish is 'buenos días'."),
    ("What does a CPU do?", "A CPU runs a computer's instructions: it fetches, decodes and executes them."),
    ("Summarise the plot of Romeo and Juliet in one sentence.",
     ("Two young lovers from feuding families in Verona marry in secret, and a chain of misunderstandings "
     "ends in both their deaths.")),
    ("How many minutes are in a day?", "There are 24 × 60 = 1,440 minutes in a day."),
]


class MergeRejected(LoftError):
    """Verification failed; `.report` holds the numbers (also written beside the output)."""

    def __init__(self, message: str, report: dict):
        super().__init__(message, code=3)
        self.report = report


@dataclass(frozen=True)
class Views:
    """The held-out rows as token ids, and the log-probs both sides of the check gave them."""

    encoded: list  # [(token ids, index of the first answer token)]
    reference: list  # the adapter on the training base in PEFT, unmerged, fp32
    merged: list  # the merged folder as written


def verification(tmp: Path, job: MergeJob, rows: list, source: str) -> tuple[dict, Views]:
    """The merge in `tmp` against its reference: the report's verification part, and the log-probs behind it."""
    from transformers import AutoTokenizer

    encoded = encode(AutoTokenizer.from_pretrained(str(tmp)), rows)
    reference = logprobs(peft_view(job.training_dir, job.adapter_dir, job.device), encoded, job.device)
    gc.collect()
    merged = logprobs(load_merged(tmp, job.dtype, job.device), encoded, job.device)
    gc.collect()
    metrics = compare(reference, merged, encoded)
    floor = rounding_floor(job.base_dir, job.dtype, job.device, encoded)
    limits = bounds(floor, job.dtype)
    failures = judge(metrics, limits)
    result = {"passed": not failures, "failures": failures, "eval_source": source, "rows": len(rows),
              "fidelity": metrics, "floor": floor, "thresholds": limits, "allowance": THRESHOLDS[job.dtype],
              "reference": "adapter on the training base in PEFT, unmerged, fp32",
              "floor_is": f"the base alone in {job.dtype} against the base in fp32 (no adapter): what rounding costs"}
    return result, Views(encoded, reference, merged)


def eval_rows(path: Path | None, recipe: dict) -> tuple[list, str]:
    """Chats (lists of messages) or plain texts; from --eval, the recipe's held-out split, or the built-in set."""
    field = "messages"
    if path is None:
        for ds in recipe.get("test_datasets") or []:
            candidate = REPO / str(ds.get("path", ""))
            if candidate.is_file():
                path, field = candidate, ds.get("field_messages", "messages")
                break
    if path is None:
        chats = [[{"role": "user", "content": q}, {"role": "assistant", "content": a}] for q, a in BUILTIN_CHATS]
        return chats, "built-in"
    path = Path(path)
    if not path.is_file():
        raise LoftError(f"eval file {path} not found; pass a JSONL of {ROW_SHAPES} rows")
    rows = []
    for n, row in read_jsonl(path, f"each line must be one of {ROW_SHAPES}"):
        if isinstance(row.get(field), list) and all(isinstance(m, dict) and isinstance(m.get("content"), str)
                                                    for m in row[field]):
            rows.append(row[field])
        elif isinstance(row.get("text"), str):
            rows.append(row["text"])
        else:
            raise LoftError(f"{path}:{n}: no `{field}` list of {{\"role\", \"content\"}} messages and no `text` "
                            f"string; loft merge reads {ROW_SHAPES} rows")
    if not rows:
        raise LoftError(f"{path} has no rows")
    step = max(1, len(rows) // MAX_ROWS)  # spread over the file: held-out splits are often grouped by source
    return rows[::step][:MAX_ROWS], str(path)


def encode(tokenizer, rows) -> list[tuple[list[int], int]]:
    """(token ids, index of the first answer token): perplexity is measured on the answer only."""
    out = []
    for row in rows:
        if isinstance(row, str):
            ids, start = tokenizer(row)["input_ids"], 1
        elif tokenizer.chat_template:
            ids = list(tokenizer.apply_chat_template(row, tokenize=True, return_dict=True)["input_ids"])
            prompt = tokenizer.apply_chat_template(row[:-1], tokenize=True, add_generation_prompt=True,
                                                   return_dict=True)
            start = len(prompt["input_ids"]) if row[-1].get("role") == "assistant" else 1
        else:  # no chat template (a base model): "role: content" lines
            lines = [f"{msg['role']}: {msg['content']}\n" for msg in row]
            ids, start = tokenizer("".join(lines))["input_ids"], len(tokenizer("".join(lines[:-1]))["input_ids"])
        ids = ids[:MAX_TOKENS]
        if len(ids) < 2:
            continue
        out.append((ids, max(1, min(start, len(ids) - 1))))
    if not out:
        raise LoftError("no held-out row has 2 or more tokens; pass --eval with real rows")
    return out


def logprobs(model, encoded, device: str) -> list:
    import torch

    model.eval()
    with torch.no_grad():
        return [torch.log_softmax(model(torch.tensor([ids], device=device)).logits[0].float(), -1).cpu()
                for ids, _ in encoded]


def compare(reference: list, candidate: list, encoded) -> dict:
    """Per-token KL(reference || candidate), top-1 agreement, and answer perplexity of both."""
    import torch

    kls, agree, nll_ref, nll_cand, n_answer = [], 0, 0.0, 0.0, 0
    for ref, cand, (ids, start) in zip(reference, candidate, encoded):
        kl = (ref.exp() * (ref - cand)).sum(-1).clamp_min(0)
        kls.append(kl)
        agree += int((ref.argmax(-1) == cand.argmax(-1)).sum())
        targets = torch.tensor(ids[start:])
        pos = torch.arange(start - 1, len(ids) - 1)
        nll_ref -= float(ref[pos, targets].sum())
        nll_cand -= float(cand[pos, targets].sum())
        n_answer += len(targets)
    kl = torch.cat(kls)
    if not torch.isfinite(kl).all():
        kl = torch.full_like(kl, float("inf"))
    ppl_ref, ppl_cand = (math.exp(min(nll / max(n_answer, 1), 700)) for nll in (nll_ref, nll_cand))
    return {"kl_mean": float(kl.mean()), "kl_max": float(kl.max()), "top1": agree / len(kl),
            "ppl_reference": ppl_ref, "ppl_candidate": ppl_cand, "ppl_rel": abs(ppl_cand / ppl_ref - 1),
            "tokens": len(kl), "answer_tokens": n_answer}


def rounding_floor(base_dir: Path, dtype_name: str, device: str, encoded) -> dict | None:
    """What the chosen dtype costs a model that is not merged at all: the base in dtype against the base in fp32,
    on the same rows. A merge cannot be closer to its reference than this (at 135M in bf16 a zero adapter and a
    correct rank-4 one both sit at KL ~1.7e-3, ppl ~1%), so the bounds are this floor plus an allowance."""
    import torch
    from transformers import AutoModelForCausalLM

    if dtype_name == "fp32":
        return None  # nothing is rounded
    full = logprobs(AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).to(device), encoded, device)
    gc.collect()
    rounded = logprobs(load_merged(base_dir, dtype_name, device), encoded, device)  # loaded as the merge is
    gc.collect()
    return compare(full, rounded, encoded)


def bounds(floor: dict | None, dtype_name: str) -> dict:
    """Pass bounds: the measured rounding floor plus the dtype's allowance (THRESHOLDS) for the merge itself."""
    allow = THRESHOLDS[dtype_name]
    if floor is None:
        return dict(allow)
    return {"kl_mean": floor["kl_mean"] + allow["kl_mean"], "kl_max": floor["kl_max"] + allow["kl_max"],
            "top1_min": min(allow["top1_min"], floor["top1"] - (1 - allow["top1_min"])),
            "ppl_rel": floor["ppl_rel"] + allow["ppl_rel"]}


def judge(metrics: dict, bounds: dict) -> list[str]:
    failures = []
    if not metrics["kl_mean"] <= bounds["kl_mean"]:
        failures.append(f"KL mean {metrics['kl_mean']:.3g} > {bounds['kl_mean']:g}")
    if not metrics["kl_max"] <= bounds["kl_max"]:
        failures.append(f"KL max {metrics['kl_max']:.3g} > {bounds['kl_max']:g}")
    if not metrics["top1"] >= bounds["top1_min"]:
        failures.append(f"top-1 agreement {metrics['top1']:.4f} < {bounds['top1_min']:g}")
    if not metrics["ppl_rel"] <= bounds["ppl_rel"]:
        failures.append(f"perplexity {metrics['ppl_candidate']:.3f} vs {metrics['ppl_reference']:.3f} "
                        f"differs by {metrics['ppl_rel']:.2%} > {bounds['ppl_rel']:.2%}")
    return failures


def peft_view(base_dir: Path, adapter_dir: Path, device: str, dtype_name: str = "fp32", nf4=None, bnb=None):
    """The adapter on a base in PEFT, unmerged.

    nf4: the base's linear weights replaced by bitsandbytes' NF4 round trip, computed in fp32: the QLoRA training
    view, exactly (bitsandbytes trains by dequantizing to the compute dtype and multiplying). bnb: the base loaded
    through bitsandbytes 4-bit as it serves (on CPUs with AVX512-BF16 its kernel computes in bf16 whatever the
    compute dtype, which is why the training view is not built this way).
    """
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    dtype = torch_dtype(dtype_name)
    if bnb:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=bnb["quant_type"],
                                   bnb_4bit_compute_dtype=dtype, bnb_4bit_use_double_quant=bnb["double_quant"])
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype, quantization_config=quant,
                                                     device_map=device)
    else:
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=dtype).to(device)
    if nf4:
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name in nf4.keys:
                    param.copy_(nf4(param))
    return PeftModel.from_pretrained(model, str(adapter_dir), autocast_adapter_dtype=False).to(device)


def load_merged(path: Path, dtype_name: str, device: str):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(path), dtype=torch_dtype(dtype_name)).to(device)
