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

What changes: when the last segment of a row (from the last position id 0 to the end) has no label to learn
(all -100: the collator's padding, or a document with nothing to train on), it gets the positions that continue the
segment before it (…, n-1, n, n+1) instead of new ones (0, 1, 2). Nothing a loss sees changes: that segment is last
in the row, so under causal attention no earlier token attends to it, and none of its own outputs predicts a label;
every loss term and gradient is the same. Rows of several documents still take the varlen kernel, with one segment
fewer. The batches of Axolotl's packing collator carry no attention mask (seen in a 2-step CPU run), so padding is
told apart by its labels.
"""

import torch

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


def continue_padding_positions(batch, ignore_index: int = -100):
    """Give each row's last segment the positions that continue the segment before it, when none of its labels
    is learned. The batch is changed in place and returned; rows without such a segment are left as they are."""
    pos, labels = batch.get("position_ids"), batch.get("labels")
    if not isinstance(pos, torch.Tensor) or not isinstance(labels, torch.Tensor) or pos.shape != labels.shape:
        return batch
    if pos.dim() != 2:
        return batch
    index = torch.arange(pos.shape[1], device=pos.device).expand_as(pos)
    start = torch.where(pos == 0, index, torch.zeros_like(index)).amax(-1, keepdim=True)  # the last segment's start
    tail = index >= start
    silent = ((labels == ignore_index) | ~tail).all(-1, keepdim=True)  # nothing to learn from start to the end
    rows = silent & (start > 0)
    before = pos.gather(-1, (start - 1).clamp(min=0))
    continued = before + 1 + (index - start)
    batch["position_ids"] = torch.where(tail & rows, continued, pos)
    return batch


class ContinuedPadding:
    """A collator around Axolotl's: its batches, with continue_padding_positions applied."""

    def __init__(self, inner):
        self.inner = inner
        self.reported = False

    def __call__(self, features, return_tensors=None):
        batch = self.inner(features, return_tensors=return_tensors)
        if self.reported:  # every batch after the first: no copy, no count
            return continue_padding_positions(batch)
        before = batch.get("position_ids")
        before = before.clone() if isinstance(before, torch.Tensor) else None
        batch = continue_padding_positions(batch)
        if before is not None:  # once, so a run's log shows the lever at work
            self.reported = True
            changed = int((batch["position_ids"] != before).any(-1).sum())
            print(f"loft padding: first batch, {changed} of {before.shape[0]} rows end in a segment with nothing to "
                  "learn; its positions now continue the segment before it", flush=True)
        return batch

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
