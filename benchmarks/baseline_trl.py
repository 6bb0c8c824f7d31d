"""The naive runner `loft bench speed --vs naive` compares against (results key `baseline`).

What a practitioner writes without Axolotl, straight from the TRL and PEFT quickstarts: the model loaded with
a BitsAndBytesConfig (NF4, double quantization, bf16 compute) or in bf16, a LoraConfig on all linear layers,
TRL's SFTTrainer (no packing, padding to the longest row of each micro-batch) or DPOTrainer (reference = the
same model with the adapter disabled), SDPA attention, and the recipe's hyperparameters, which the harness
passes as flags. Nothing else: no Liger, no fused LoRA kernels, no sample packing. benchmarks/peers/ holds the
runners written for speed (TRL as its docs advise, Unsloth); they share this module's flags and loading.

It measures itself with the same callback as the Axolotl run (benchmarks/speed_probe.py).

    python -m benchmarks.baseline_trl --task sft --model DIR --data rows.jsonl --out result.json \\
        --seq-len 2048 --micro-batch 1 --grad-accum 8 --steps 12 --load-in-4bit --gradient-checkpointing
"""

import sys

import torch

from benchmarks.peers import versions
from benchmarks.peers.flags import build_parser, settings
from benchmarks.speed_probe import measure


def parse_args(argv=None):
    return build_parser(__doc__.splitlines()[0]).parse_args(argv)


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


def lora_config(args):
    from peft import LoraConfig

    return LoraConfig(r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                      target_modules="all-linear", use_rslora=args.rslora, task_type="CAUSAL_LM")


def trainer_args(args) -> dict:
    """TrainingArguments every runner shares: the recipe's batch shape, schedule and optimizer."""
    gpu = torch.cuda.is_available()
    return dict(
        output_dir=str(args.out) + ".trainer", per_device_train_batch_size=args.micro_batch,
        gradient_accumulation_steps=args.grad_accum, max_steps=args.steps, learning_rate=args.learning_rate,
        lr_scheduler_type="cosine", optim=args.optimizer if gpu else "adamw_torch", bf16=gpu,
        tf32=bool(args.tf32 and gpu), gradient_checkpointing=args.gradient_checkpointing, max_length=args.seq_len,
        logging_steps=1, save_strategy="no", report_to="none", dataloader_num_workers=0, seed=42, use_cpu=not gpu,
    )


def load_rows(args):
    """The harness's rows; DPO pairs get the same ChatML wrapping as Axolotl's `chatml.default` type, so every
    runner sees the same tokens."""
    from datasets import load_dataset

    data = load_dataset("json", data_files=args.data, split="train")
    if args.task == "dpo":
        data = data.map(lambda row: {
            "prompt": f"<|im_start|>user\n{row['prompt']}<|im_end|>\n<|im_start|>assistant\n",
            "chosen": f"{row['chosen']}<|im_end|>", "rejected": f"{row['rejected']}<|im_end|>"})
    return data


def build_trainer(args, callback):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    if args.task == "sft":
        config, trainer_cls = SFTConfig(packing=False, **trainer_args(args)), SFTTrainer
    else:
        config, trainer_cls = DPOConfig(beta=args.beta, **trainer_args(args)), DPOTrainer
    return trainer_cls(model=load_model(args), args=config, train_dataset=load_rows(args), processing_class=tokenizer,
                       peft_config=lora_config(args), callbacks=[callback])


def main(argv=None) -> int:
    args = parse_args(argv)
    return measure(args, "baseline", build_trainer, {"settings": settings(args), "versions": versions()})


if __name__ == "__main__":
    sys.exit(main())
