"""The input embedding table in CPU RAM: the frozen 128K x 4,096 lookup no longer takes 1 GB of a small card.

    plugins:
      - training.plugins.embedding_offload.EmbeddingOffloadPlugin

Why: LoRA and QLoRA never train the input embedding, and a step reads only the rows of the tokens it sees. On
Llama-3.1-8B the table is 128,256 x 4,096 bf16 = 0.98 GiB, kept in full on the GPU (bitsandbytes quantizes linear
layers, not embeddings): on a 12 GB card that is room for ~9,000 more tokens of a long row. Unsloth does the same
(its `offload_embedding`); the lookup of one step's tokens on the CPU and their copy to the GPU
(4,096 x 2 bytes a token) cost milliseconds next to a long row's step.

What changes: when training begins (after the trainer has placed the model, which would otherwise move it back) the
input embedding goes to CPU RAM; its forward looks the ids up there and hands the GPU the result, a new leaf that
keeps the caller's requires_grad (PEFT's checkpointing hook sets it), so the backward never reaches the CPU. Left
alone when the embedding trains (full fine-tuning, `modules_to_save`), when the lm_head shares its weight (tied
embeddings: the head needs it on the GPU), under DeepSpeed/FSDP, and on CPU runs.
"""

import torch
from transformers import TrainerCallback

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


def why_not(model) -> str | None:
    """None when the input embedding can live in CPU RAM, else the reason it stays."""
    embedding = model.get_input_embeddings()
    weight = getattr(embedding, "weight", None)
    if not isinstance(embedding, torch.nn.Embedding) or weight is None:
        return "the input embedding is not a plain lookup table"
    if weight.requires_grad:
        return "the embedding trains"
    head = model.get_output_embeddings()
    if head is not None and getattr(head, "weight", None) is not None and head.weight.data_ptr() == weight.data_ptr():
        return "the LM head shares its weight (tied embeddings)"
    if weight.device.type != "cuda":
        return f"the table is on {weight.device.type}, not a GPU"
    return None


def offload(model) -> str:
    """Move the input embedding to CPU RAM and make its forward return GPU tensors; what happened, in words."""
    reason = why_not(model)
    if reason:
        return f"left on the GPU ({reason})"
    embedding = model.get_input_embeddings()
    size = embedding.weight.numel() * embedding.weight.element_size()
    look_up_on_cpu(embedding, embedding.weight.device)
    return f"in CPU RAM ({size / 2**30:.2f} GiB off the GPU)"


def look_up_on_cpu(embedding: torch.nn.Embedding, device) -> None:
    """The table to CPU RAM; ids go there for the lookup and the rows come back to `device` as a new leaf."""
    embedding.to("cpu")

    def ids_to_cpu(module, args, kwargs):
        if args:
            return (args[0].to("cpu"), *args[1:]), kwargs
        return args, {**kwargs, "input": kwargs["input"].to("cpu")}

    def rows_to_device(module, args, kwargs, output):
        # first among the forward hooks: PEFT's (which makes the rows require grad for checkpointing) then acts
        # on the leaf on the GPU, and no backward ever reaches the table
        return output.detach().to(device, non_blocking=True).requires_grad_(output.requires_grad)

    embedding.register_forward_pre_hook(ids_to_cpu, with_kwargs=True, prepend=True)
    embedding.register_forward_hook(rows_to_device, with_kwargs=True, prepend=True)
    embedding.loft_offloaded = True


class OffloadOnTrainBegin(TrainerCallback):
    def on_train_begin(self, args, state, control, model=None, **kwargs):
        embedding = model.get_input_embeddings() if model is not None else None
        if embedding is None or getattr(embedding, "loft_offloaded", False):
            return
        try:
            note = offload(model)
        except Exception as err:  # a memory lever must never cost the run
            note = f"left on the GPU ({type(err).__name__}: {err})"
        if state.is_world_process_zero:
            print(f"loft embedding offload: input embedding {note}", flush=True)


class EmbeddingOffloadPlugin(BasePlugin):
    """`plugins: [training.plugins.embedding_offload.EmbeddingOffloadPlugin]`: the input embedding in CPU RAM."""

    def add_callbacks_post_trainer(self, cfg, trainer):
        from training.plugins.lean import sharded

        if sharded(trainer) or not torch.cuda.is_available():
            return []
        return [OffloadOnTrainBegin()]
