"""The flags every runner of `loft bench speed` takes, and the settings record they share; torch-free, so the
Unsloth runner can read them before Unsloth is imported (it must come before transformers, PEFT and TRL)."""

import argparse


def build_parser(description: str) -> argparse.ArgumentParser:
    """The flags every runner takes (benchmarks/peers/harness.py builds them from the recipe)."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--task", choices=["sft", "dpo"], required=True)
    p.add_argument("--model", required=True, help="HF model directory (weights)")
    p.add_argument("--tokenizer", help="tokenizer directory (default: --model)")
    p.add_argument("--data", required=True, help="JSONL: {messages} rows for sft, {prompt, chosen, rejected} for dpo")
    p.add_argument("--out", required=True, help="where the measurement JSON goes")
    p.add_argument("--seq-len", type=int, required=True)
    p.add_argument("--micro-batch", type=int, default=1)
    p.add_argument("--grad-accum", type=int, default=1)
    p.add_argument("--steps", type=int, required=True, help="optimizer steps in all (warm-up included)")
    p.add_argument("--learning-rate", type=float, default=2e-4)
    p.add_argument("--optimizer", default="paged_adamw_8bit")
    p.add_argument("--lora-r", type=int, default=16)
    p.add_argument("--lora-alpha", type=int, default=32)
    p.add_argument("--lora-dropout", type=float, default=0.05)
    p.add_argument("--rslora", action="store_true")
    p.add_argument("--load-in-4bit", action="store_true")
    p.add_argument("--load-in-8bit", action="store_true")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--tf32", action="store_true", help="allow TF32 matmuls (the recipe's tf32)")
    p.add_argument("--packing", action="store_true", help="pack short rows into --seq-len (tuned runners only)")
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--pad-id", type=int, default=0, help="padding id, for the token counter")
    p.add_argument("--cap-gib", type=float, help="emulate a card of this many GiB")
    p.add_argument("--profile-step", type=int, help="profile this optimizer step (not timed)")
    return p


def quantization(args) -> str:
    return "nf4 + double quant, bf16 compute" if args.load_in_4bit else "int8" if args.load_in_8bit else "bf16"


def settings(args) -> dict:
    """What this runner does, for the results file (every runner records its own)."""
    return {"quantization": quantization(args), "attention": "sdpa", "packing": False, "liger": False,
            "gradient_checkpointing": args.gradient_checkpointing, "lora_targets": "all-linear",
            "micro_batch": args.micro_batch, "grad_accum": args.grad_accum, "max_length": args.seq_len,
            "optimizer": args.optimizer, "tf32": args.tf32}
