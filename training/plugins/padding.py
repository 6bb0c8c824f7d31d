"""Padding that continues the last document of a packed row, so a row holding one document reaches cuDNN's attention.

    plugins:
      - axolotl.integrations.liger.LigerPlugin
      - training.plugins.padding.ContinuedPaddingPlugin

Why: with `sample_packing` and `attn_implementation: sdpa`, Axolotl 0.19 counts the documents of a row by the
position ids that restart at 0, and sends any row with more than one to `torch.nn.attention.varlen.varlen_attn`,
PyTorch's FlashAttention-2 port; a row with one document goes to plain causal SDPA, which on Hopper picks cuDNN's
fused attention. Its collator pads a row with position ids that restart too (0, 1, 2, ...), so one long document
plus a few padding tokens counts as two documents and takes the slower kernel. Measured on one H200 (2026-11-30,
benchmarks/results/attention-backends-2026-11-30.json), causal attention forward + backward at Qwen2.5-7B's shape,
8,192 tokens: 6.0 ms in the FlashAttention-2 port, 3.2 ms in cuDNN; the profiles of full-length rows showed Loft on
the former and TRL and Unsloth on the latter.

What changes: the padding tail of each row gets the positions that continue its last document (…, n-1, n, n+1)
instead of new ones (0, 1, 2). Nothing a loss sees changes: padding is last in the row, its labels are -100, and
under causal attention no real token attends to a later position, so every real token's output and gradient are
the same; only the padding's own (ignored) outputs differ. Rows of several documents still take the varlen kernel,
with one document fewer. Rows padded on the left, or with no attention mask to tell padding apart, are left as they
are. Whether it wins is `benchmarks/gpu/vs-peers.sh`'s `levers-padding` group.
"""

import torch

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


def continue_padding_positions(batch):
    """Give each row's padding tail (attention_mask 0 after the last real token) the positions that continue the
    row's last document. The batch is changed in place and returned; rows with padding anywhere but at the end
    are left as they are."""
    pos, mask = batch.get("position_ids"), batch.get("attention_mask")
    if not isinstance(pos, torch.Tensor) or not isinstance(mask, torch.Tensor) or pos.shape != mask.shape:
        return batch
    if pos.dim() != 2:
        return batch
    index = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
    real = (mask != 0).sum(-1, keepdim=True)  # Axolotl's packed mask: 1, 2, 3... per document, 0 on padding
    tail = index >= real
    rows = (tail == (mask == 0)).all(-1, keepdim=True) & (real > 0)  # padding only at the end, something real
    last = pos.gather(-1, (real - 1).clamp(min=0))
    continued = last + 1 + (index - real)
    batch["position_ids"] = torch.where(tail & rows, continued, pos)
    return batch


class ContinuedPadding:
    """A collator around Axolotl's: its batches, with continue_padding_positions applied."""

    def __init__(self, inner):
        self.inner = inner

    def __call__(self, features, return_tensors=None):
        return continue_padding_positions(self.inner(features, return_tensors=return_tensors))

    def __getattr__(self, name):  # the trainer reads .tokenizer and others from its collator
        if name == "inner":
            raise AttributeError(name)
        return getattr(self.inner, name)


class ContinuedPaddingPlugin(BasePlugin):
    """`plugins: [training.plugins.padding.ContinuedPaddingPlugin]`: one-document rows on plain causal SDPA."""

    def pre_model_load(self, cfg):
        if cfg.get("attn_implementation") not in (None, "sdpa") or cfg.get("flash_attention"):
            raise ValueError("training.plugins.padding.ContinuedPaddingPlugin picks between Axolotl's SDPA paths: "
                             "it needs attn_implementation: sdpa (remove the plugin, or set attn_implementation: sdpa)")

    def post_trainer_create(self, cfg, trainer):
        if cfg.get("sample_packing") and not isinstance(trainer.data_collator, ContinuedPadding):
            trainer.data_collator = ContinuedPadding(trainer.data_collator)
            if getattr(trainer, "train_data_collator", None) is not None:
                trainer.train_data_collator = trainer.data_collator
