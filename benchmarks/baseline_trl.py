"""The hand-written baseline `loft bench speed --vs baseline` compares against.

What a practitioner writes without Axolotl, straight from the TRL and PEFT documentation: the model loaded with
a BitsAndBytesConfig (NF4, double quantization, bf16 compute) or in bf16, a LoraConfig on all linear layers,
TRL's SFTTrainer (no packing, padding to the longest row of each micro-batch) or DPOTrainer (reference = the
same model with the adapter disabled), SDPA attention, and the recipe's hyperparameters, which the harness
passes as flags. Nothing else: no Liger, no fused LoRA kernels, no sample packing.

It measures itself with the same callback as the Axolotl run (benchmarks/speed_probe.py).

    python -m benchmarks.baseline_trl --task sft --model DIR --data rows.jsonl --out result.json \\
        --seq-len 2048 --micro-batch 1 --grad-accum 8 --steps 12 --load-in-4bit --gradient-checkpointing
"""

import argparse
import sys

import torch

from benchmarks.speed_probe import SpeedCallback, apply_cap, does_not_fit, is_oom, keep_peaks


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--task", choices=["sft", "dpo"], required=True)
    p.add_argument("--model", required=True, help="HF model directory (weights + tokenizer)")
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
    p.add_argument("--beta", type=float, default=0.1, help="DPO beta")
    p.add_argument("--pad-id", type=int, default=0, help="padding id, for the token counter")
    p.add_argument("--cap-gib", type=float, help="emulate a card of this many GiB")
    p.add_argument("--profile-step", type=int, help="profile this optimizer step (not timed)")
    return p.parse_args(argv)


def load_model(args):
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    quant = None
    if args.load_in_4bit:
        quant = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                   bnb_4bit_compute_dtype=torch.bfloat16)
    elif args.load_in_8bit:
        quant = BitsAndBytesConfig(load_in_8bit=True)
    gpu = torch.cuda.is_available()
    return AutoModelForCausalLM.from_pretrained(
        args.model, dtype=torch.bfloat16 if gpu else torch.float32, attn_implementation="sdpa",
        quantization_config=quant, device_map={"": 0} if gpu else None)


def build_trainer(args, callback):
    from datasets import load_dataset
    from peft import LoraConfig
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = load_model(args)
    lora = LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", use_rslora=args.rslora, task_type="CAUSAL_LM")
    gpu = torch.cuda.is_available()
    common = dict(
        output_dir=str(args.out) + ".trainer", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", optim=args.optimizer if gpu else "adamw_torch", bf16=gpu,
        gradient_checkpointing=args.gradient_checkpointing, max_length=args.seq_len, logging_steps=1,
        save_strategy="no", report_to="none", dataloader_num_workers=0, seed=42, use_cpu=not gpu,
    )
    data = load_dataset("json", data_files=args.data, split="train")
    if args.task == "sft":
        config = SFTConfig(packing=False, **common)
        trainer_cls = SFTTrainer
    else:
        # The same ChatML wrapping as Axolotl's `chatml.default` DPO type, so both runners see the same tokens.
        data = data.map(lambda row: {
            "prompt": f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n",
            "chosen": f"{row['chosen']}<|im_end|>", "rejected": f"{row['rejected']}<|im_end|>"})
        config = DPOConfig(beta=args.beta, **common)
        trainer_cls = DPOTrainer
    return trainer_cls(model=model, args=config, train_dataset=data, processing_class=tokenizer,
                       peft_config=lora, callbacks=[callback])


def main(argv=None) -> int:
    args = parse_args(argv)
    keep_peaks()
    apply_cap(args.cap_gib)
    callback = SpeedCallback(args.out, "baseline", args.pad_id, cap_gib=args.cap_gib, profile_step=args.profile_step)
    try:
        build_trainer(args, callback).train()
    except Exception as exc:  # an out-of-memory error is a result ("does not fit"), anything else a failure
        if not is_oom(exc):
            raise
        does_not_fit(args.out, "baseline", args.cap_gib, exc)
    return 0


if __name__ == "__main__":
    sys.exit(main())
