"""cuDNN's fused attention for grouped-query models under `attn_implementation: sdpa` (a measured lever).

    plugins:
      - axolotl.integrations.liger.LigerPlugin
      - training.plugins.attention.CudnnAttentionPlugin

Why: profiled on one H200 (2026-11-30, benchmarks/results/vs-peers-2026-11-30.json), Loft's packed and full-length
rows reached PyTorch's SDPA with no mask and ran its FlashAttention-2 port (backward 126 ms per Qwen2.5-7B step at
8,192 tokens), while TRL and Unsloth ran cuDNN's Hopper kernels (75 ms). Without a mask, transformers passes
grouped-query K/V to SDPA as they are, with `enable_gqa=True`; with a mask it first repeats them to the query
heads. Putting cuDNN first in SDPA's order alone changed nothing (0.99x), so this plugin also makes transformers
repeat K/V (its `use_gqa_in_sdpa` answers no), the way the peers' calls reach cuDNN. The repeated K/V are
transient: one layer's at a time, recomputed under gradient checkpointing. Every backend stays enabled, so an
input cuDNN cannot take falls back to the next backend as before; on CPU nothing but the K/V layout changes.
Whether it wins is `benchmarks/gpu/vs-peers.sh`'s lever runs; benchmarks/gpu/attention_backends.py times the
attention alone.
"""

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object

ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
_held = contextlib.ExitStack()  # open for the life of the process: the training run is the process
_original = {}


def _no_gqa(attention_mask, key, value) -> bool:
    return False


def prefer_cudnn() -> None:
    """cuDNN first in SDPA's order, K/V repeated to the query heads by transformers (idempotent)."""
    from transformers.integrations import sdpa_attention

    if not _original:
        _original["use_gqa_in_sdpa"] = sdpa_attention.use_gqa_in_sdpa
        sdpa_attention.use_gqa_in_sdpa = _no_gqa
    if not _held._exit_callbacks:
        _held.enter_context(sdpa_kernel(ORDER, set_priority=True))


def restore() -> None:
    """PyTorch's own order and transformers' own GQA choice again (tests; a process that trains twice)."""
    from transformers.integrations import sdpa_attention

    if _original:
        sdpa_attention.use_gqa_in_sdpa = _original.pop("use_gqa_in_sdpa")
    _held.close()


class CudnnAttentionPlugin(BasePlugin):
    """`plugins: [training.plugins.attention.CudnnAttentionPlugin]`: SDPA on cuDNN for grouped-query models."""

    def pre_model_load(self, cfg):
        if cfg.get("attn_implementation") not in (None, "sdpa") or cfg.get("flash_attention"):
            raise ValueError("training.plugins.attention.CudnnAttentionPlugin orders PyTorch's SDPA backends: it "
                             "needs attn_implementation: sdpa (remove the plugin, or set attn_implementation: sdpa)")
        prefer_cudnn()
