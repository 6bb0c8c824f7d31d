"""cuDNN first for PyTorch's scaled-dot-product attention, in an Axolotl run.

    plugins:
      - axolotl.integrations.liger.LigerPlugin
      - training.attention.CudnnAttentionPlugin

Why: with `attn_implementation: sdpa` and no mask (packed or full rows), PyTorch 2.11 picks its own FlashAttention-2
port, which has no Hopper-specific (wgmma) kernel. Given a padding mask, as TRL and Unsloth pass one, it picks
cuDNN's fused attention instead, which does. Profiled on one H200 (2026-11-30, benchmarks/results/vs-peers-*.json):
the backward pass took 88 ms per step in FlashAttention-2 and 53 ms in cuDNN for the same Llama-3.1-8B shapes, and
126 vs 75 ms for Qwen2.5-7B at 8,192 tokens. This plugin only moves cuDNN to the front of PyTorch's priority
list; every backend stays enabled, so an input cuDNN cannot take (a head size it lacks, a CPU tensor) falls back
to the next backend exactly as before.
"""

import contextlib

from torch.nn.attention import SDPBackend, sdpa_kernel

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object

ORDER = [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH]
# Held open for the life of the process: the training run is the process.
_held = contextlib.ExitStack()


def prefer_cudnn() -> None:
    """Put cuDNN first in SDPA's priority order, all backends enabled (idempotent)."""
    if not _held._exit_callbacks:
        _held.enter_context(sdpa_kernel(ORDER, set_priority=True))


def restore() -> None:
    """Back to PyTorch's own order (tests; a process that trains twice)."""
    _held.close()


class CudnnAttentionPlugin(BasePlugin):
    """`plugins: [training.attention.CudnnAttentionPlugin]`: cuDNN's fused attention ahead of FlashAttention-2."""

    def pre_model_load(self, cfg):
        if cfg.get("attn_implementation") not in (None, "sdpa") or cfg.get("flash_attention"):
            raise ValueError("training.attention.CudnnAttentionPlugin orders PyTorch's SDPA backends: it needs "
                             "attn_implementation: sdpa (remove the plugin, or set attn_implementation: sdpa)")
        prefer_cudnn()
