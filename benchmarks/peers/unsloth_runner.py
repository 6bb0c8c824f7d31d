"""The `unsloth` runner of `loft bench speed --vs`: Unsloth written the way Unsloth's docs advise.

  * FastLanguageModel.from_pretrained (4-bit NF4 for QLoRA recipes, else 16-bit) and
    FastLanguageModel.get_peft_model with the recipe's rank, alpha and dropout on the seven projections, bias
    "none", use_gradient_checkpointing="unsloth" (its offloaded checkpointing) when the recipe checkpoints, False
    when it does not (docs.unsloth.ai/get-started/fine-tuning-llms-guide: its checkpointing offloads
    activations to CPU RAM asynchronously).
  * TRL's SFTTrainer/SFTConfig as Unsloth patches them on import; packing=True for short rows (the harness passes
    --packing when the recipe packs and rows are shorter than the sequence), and Unsloth's own padding-free
    batching otherwise (on by default; unsloth.ai/docs/blog/3x-faster-training-packing). SFT rows are rendered
    with the chat template into a "text" column first, as Unsloth's notebooks do.
  * DPO: PatchDPOTrainer(), then TRL's DPOTrainer with ref_model=None (the adapter disabled is the reference;
    docs.unsloth.ai/basics/reward-modelling-dpo-and-orpo). UNSLOTH_FUSED_PREFERENCE_LOSS=1 in the environment
    turns on Unsloth's opt-in chunked DPO loss; the settings record whether it was on.
  * The trainer config leaves gradient_checkpointing unset, so Unsloth's choice on the model stands (Unsloth
    turns TRL's default back off when the model was set up without it).

Unsloth must be imported before transformers, PEFT and TRL (it patches them), so nothing here imports those at
module level. Unsloth's fast path is Triton kernels on CUDA; without a GPU, or without the package, the runner
records why it cannot run instead of measuring Unsloth's plain CPU fallback.
"""

import importlib.util
import os
import sys

from benchmarks.peers import cannot_run, flags, versions

SEVEN = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
INSTALL = ("pip install unsloth==2026.10.9 unsloth-zoo==2026.10.9, or on the GPU host carry the wheelhouse of "
           "fetch-wheels-slim.sh --unsloth")


def checkpointing(args):
    return "unsloth" if args.gradient_checkpointing else False


def settings(args) -> dict:
    out = dict(flags.settings(args), gradient_checkpointing=checkpointing(args),
               packing=bool(args.packing and args.task == "sft"), lora_targets=SEVEN,
               attention="Unsloth's choice (SDPA without xformers/flash-attn)",
               liger=False, kernels="Unsloth's (fused LoRA MLP/QKV/O, RoPE, RMSNorm, chunked cross-entropy)")
    if args.task == "sft" and not out["packing"]:
        out["padding_free"] = "Unsloth's default (auto)"
    if args.task == "sft":  # Unsloth's tiled MLP: its loader reads this (unsloth_tiled_mlp=True sets "arctic")
        out["tiled_mlp"] = os.environ.get("UNSLOTH_TILED_MLP", "0")
    out["offload_embedding"] = "always" if offload_embedding_forced() else "auto"
    if args.task == "dpo":
        out["fused_preference_loss"] = os.environ.get("UNSLOTH_FUSED_PREFERENCE_LOSS", "0") == "1"
    return out


def offload_embedding_forced() -> bool:
    """Unsloth's input-embedding offload is "auto" (its default: to CPU RAM only when it judges the card tight)
    unless LOFT_UNSLOTH_OFFLOAD_EMBEDDING=1 asks for it always; where the table ended up is recorded after loading."""
    return os.environ.get("LOFT_UNSLOTH_OFFLOAD_EMBEDDING") == "1"


def why_not() -> str | None:
    """Why Unsloth cannot be measured here, or None. Checked before `import unsloth`, which on a machine
    without a GPU would switch to its CPU fallback (stock transformers + PEFT: not what is being compared)."""
    import torch

    reasons = []
    if not torch.cuda.is_available():
        reasons.append("no CUDA GPU (Unsloth's fast path is Triton kernels on CUDA)")
    if importlib.util.find_spec("unsloth") is None:
        reasons.append(f"unsloth is not installed ({INSTALL})")
    return "; ".join(reasons) or None


def build_trainer(args, callback):
    import torch
    from unsloth import FastLanguageModel, PatchDPOTrainer

    from benchmarks import baseline_trl
    from benchmarks.peers.trl_tuned import render_text

    offload = {"offload_embedding": True} if offload_embedding_forced() else {}
    model, tokenizer = FastLanguageModel.from_pretrained(
        model_name=args.model, tokenizer_name=args.tokenizer or args.model, max_seq_length=args.seq_len,
        dtype=torch.bfloat16, load_in_4bit=args.load_in_4bit, load_in_8bit=args.load_in_8bit,
        load_in_16bit=not (args.load_in_4bit or args.load_in_8bit), full_finetuning=False,
        use_gradient_checkpointing=checkpointing(args), **offload)
    model = FastLanguageModel.get_peft_model(
        model, r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout, target_modules=SEVEN,
        bias="none", use_gradient_checkpointing=checkpointing(args), use_rslora=args.rslora, random_state=3407)
    callback.meta["settings"]["input_embedding_on"] = model.get_input_embeddings().weight.device.type
    common = {k: v for k, v in baseline_trl.trainer_args(args).items() if k != "gradient_checkpointing"}
    rows = baseline_trl.load_rows(args)
    if args.task == "sft":
        from trl import SFTConfig, SFTTrainer

        config = SFTConfig(packing=args.packing, dataset_text_field="text", **common)
        return SFTTrainer(model=model, args=config, train_dataset=render_text(rows, tokenizer),
                          processing_class=tokenizer, callbacks=[callback])
    PatchDPOTrainer()
    from trl import DPOConfig, DPOTrainer

    return DPOTrainer(model=model, ref_model=None, args=DPOConfig(beta=args.beta, **common), train_dataset=rows,
                      processing_class=tokenizer, callbacks=[callback])


def main(argv=None) -> int:
    args = flags.build_parser(__doc__.splitlines()[0]).parse_args(argv)
    reason = why_not()
    if reason is None:
        try:
            import unsloth  # noqa: F401  (first: it patches transformers, PEFT and TRL as they load)
        except Exception as exc:  # a broken install is a reason too, in one line
            reason = f"import unsloth failed: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"
    if reason:
        cannot_run(args.out, "unsloth", reason, settings(args))
        print(f"unsloth cannot run here: {reason}", file=sys.stderr)
        return 0
    from benchmarks.speed_probe import measure

    return measure(args, "unsloth", build_trainer, {"settings": settings(args), "versions": versions()})


if __name__ == "__main__":
    sys.exit(main())
