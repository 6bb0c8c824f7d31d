"""The `trl` runner of `loft bench speed --vs`: TRL + PEFT written the way TRL's own docs advise for speed and memory.

Same model loading, LoRA and hyperparameters as the naive runner (benchmarks/baseline_trl.py), plus what TRL's
"Reducing Memory Usage" and "Liger Kernel Integration" pages recommend (huggingface.co/docs/trl/v1.9.0/
reducing_memory_usage, .../liger_kernel_integration):

  * use_liger_kernel=True: Liger's RMSNorm, RoPE, SwiGLU and fused linear cross-entropy (no logits tensor);
    for DPO, Liger's fused DPO loss. Liger's kernels are Triton on a GPU: on a CPU the runner trains without
    them and its settings say so.
  * packing=True with TRL's default "bfd" strategy for short rows (the harness passes --packing when the recipe
    packs and rows are shorter than the sequence). TRL turns on padding-free batching with it: rows share one
    flattened sequence, kept apart by position_ids (PyTorch SDPA gets a block-diagonal mask from transformers;
    TRL warns that only FlashAttention is "known to" handle this, and no flash-attn wheel exists for the GPU
    host's torch). Full-length rows are not packed, as TRL's docs do not advise it there.
  * gradient checkpointing as the recipe has it (TRL's default is on), with TRL's and transformers' defaults
    for how (non-reentrant in transformers 5).
DPO's padding_free is "temporarily unavailable" in TRL 1.9 (DPOTrainer warns and falls back), so DPO pads.

SFT rows are rendered to text with the tokenizer's chat template first, as Unsloth's runner does, so both tuned
runners train on identical token sequences.
"""

import sys

import torch

from benchmarks import baseline_trl
from benchmarks.peers import flags, versions
from benchmarks.speed_probe import measure


def settings(args) -> dict:
    gpu = torch.cuda.is_available()
    out = dict(flags.settings(args), liger=gpu, packing=bool(args.packing and args.task == "sft"))
    out["packing_strategy"] = "bfd (padding-free)" if out["packing"] else None
    if not gpu:
        out["liger_off_because"] = "no CUDA GPU here: Liger's kernels are Triton"
    return out


def render_text(data, tokenizer):
    """{"messages": [...]} -> {"text": the chat template applied}, the format Unsloth's docs train on."""
    return data.map(lambda row: {"text": tokenizer.apply_chat_template(row["messages"], tokenize=False)},
                    remove_columns=data.column_names)


def build_trainer(args, callback):
    from transformers import AutoTokenizer
    from trl import DPOConfig, DPOTrainer, SFTConfig, SFTTrainer

    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    gpu = torch.cuda.is_available()
    rows = baseline_trl.load_rows(args)
    if args.task == "sft":
        rows = render_text(rows, tokenizer)
        config = SFTConfig(packing=args.packing, packing_strategy="bfd", use_liger_kernel=gpu,
                           dataset_text_field="text", **baseline_trl.trainer_args(args))
        trainer_cls = SFTTrainer
    else:
        config = DPOConfig(beta=args.beta, use_liger_kernel=gpu, **baseline_trl.trainer_args(args))
        trainer_cls = DPOTrainer
    return trainer_cls(model=baseline_trl.load_model(args), args=config, train_dataset=rows,
                       processing_class=tokenizer, peft_config=baseline_trl.lora_config(args), callbacks=[callback])


def main(argv=None) -> int:
    args = flags.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    return measure(args, "trl", build_trainer, {"settings": settings(args), "versions": versions()})


if __name__ == "__main__":
    sys.exit(main())
