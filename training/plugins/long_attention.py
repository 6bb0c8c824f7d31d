"""Causal attention over a very long row, run once per K/V head: its backward holds half what SDPA's does.

    plugins:
      - training.plugins.long_attention.LongAttentionPlugin

Why: on a one-document row with no mask, transformers hands grouped-query K/V to SDPA (`enable_gqa`), and on Hopper
SDPA runs cuDNN's fused attention both ways. cuDNN's backward for grouped heads works out dK and dV for every query
head in fp32 and adds the groups up afterwards (its `fmha_reduce_head` kernel): on Llama-3.1-8B (32 query heads of
128) that buffer is 32 KB a token, beside an fp32 dQ accumulator of 16 KB a token. At 61,440 tokens it is one
1.88 GiB allocation, the one that broke a 12 GiB cap for Loft and Unsloth alike (H200, 2026-11-30). Measured at
65,536 tokens, Llama-3.1-8B's shape, forward + backward (benchmarks/results/attention-memory-2026-12-01.json):
SDPA as transformers calls it holds 3.27 GiB above its inputs (largest block 2.01 GiB), with K/V repeated 4.02,
forced to FlashAttention-2 4.27 (and 1.7x the time); once per K/V head 1.70 GiB (largest 0.50), in 221 ms against
SDPA's 217, with the same gradients.

What changes: rows longer than LONG_FROM tokens (one row per micro-batch, no mask, causal, no dropout, CUDA bf16 or
fp16) run cuDNN's own kernels (the ones SDPA picks) once for each K/V head with the 4 query heads that share it,
forward and backward, writing into whole output and gradient tensors: each call's fp32 buffers cover 4 heads, not
32. Shorter, masked or packed rows and CPU runs go to SDPA as before. Should a kernel refuse its inputs, the plugin
says so once and SDPA takes over.
"""

import torch

from training.plugins import lever

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object

# Rows up to this length go to SDPA unchanged: the lengths the recipes train at fit without the saving, and a
# number measured there stays the recipe's.
LONG_FROM = 49152


def attend(q, k, v, scale):
    """cuDNN's fused causal attention, as SDPA calls it: (out, log-sum-exp, philox seed, philox offset)."""
    out, lse, _, _, _, _, seed, offset, _ = torch.ops.aten._scaled_dot_product_cudnn_attention(
        q, k, v, None, True, 0.0, True, False, scale=scale)
    return out, lse, seed, offset


def attend_backward(grad_out, q, k, v, out, lse, seed, offset, scale):
    """cuDNN's backward for attend: (dq, dk, dv). None stands for the tensors a dense causal call leaves undefined."""
    s = q.shape[2]
    return torch.ops.aten._scaled_dot_product_cudnn_attention_backward(
        grad_out, q, k, v, out, lse, seed, offset, None, None, None, s, s, 0.0, True, scale=scale)


class GroupedCausalAttention(torch.autograd.Function):
    """Causal attention, q [B, Hq, S, D], k/v [B, Hkv, S, D] (Hq a multiple of Hkv), no mask, no dropout: cuDNN's
    kernels once per K/V head (with the query heads that share it), forward and backward, the outputs and gradients
    written into whole tensors."""

    @staticmethod
    def forward(ctx, q, k, v, scale):
        per = q.shape[1] // k.shape[1]
        # SDPA's own output layout, [B, S, H, D] in memory: the caller's transpose(1, 2).contiguous() costs nothing
        out = q.new_empty(q.shape[0], q.shape[2], q.shape[1], q.shape[3]).transpose(1, 2)
        lses = []
        for g in range(k.shape[1]):
            h = slice(g * per, (g + 1) * per)
            o, lse, seed, offset = attend(q[:, h], k[:, g:g + 1], v[:, g:g + 1], scale)
            out[:, h].copy_(o)
            lses.append(lse)
        ctx.save_for_backward(q, k, v, out, *lses)
        ctx.scale, ctx.philox = scale, (seed, offset)
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, *lses = ctx.saved_tensors
        per = q.shape[1] // k.shape[1]
        grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        try:
            for g in range(k.shape[1]):
                h, kv = slice(g * per, (g + 1) * per), slice(g, g + 1)
                gq, gk, gv = attend_backward(grad_out[:, h], q[:, h], k[:, kv], v[:, kv], out[:, h], lses[g],
                                             *ctx.philox, ctx.scale)
                dq[:, h].copy_(gq)
                dk[:, kv].copy_(gk)
                dv[:, kv].copy_(gv)
        except RuntimeError as err:  # a kernel that refuses these inputs: SDPA's own backward, said once
            if "out of memory" in str(err).lower():
                raise
            refuse(err)
            with torch.enable_grad():
                leaves = [t.detach().requires_grad_() for t in (q, k, v)]
                again = torch.nn.functional.scaled_dot_product_attention(*leaves, is_causal=True, scale=ctx.scale,
                                                                         enable_gqa=True)
                dq, dk, dv = torch.autograd.grad(again, leaves, grad_out)
        return dq, dk, dv, None


def long_causal(q, k, v, scale=None):
    return GroupedCausalAttention.apply(q, k, v, scale)


STATE = {"refused": None}  # the first error of a kernel that refused; the path stays off after it


def refuse(err: BaseException) -> None:
    if STATE["refused"] is None:
        STATE["refused"] = str(err).splitlines()[0][:160]
        print(f"loft long attention: left off ({STATE['refused']})", flush=True)


def takes(query, key, attention_mask, dropout, position_ids, long_from: int = LONG_FROM) -> bool:
    """Whether a call is one long causal document this path computes exactly as SDPA would."""
    if attention_mask is not None or dropout or not query.is_cuda or query.dtype not in (torch.bfloat16,
                                                                                         torch.float16):
        return False
    if query.shape[0] != 1 or query.shape[2] <= long_from or query.shape[2] != key.shape[2]:
        return False
    if position_ids is not None:  # several documents in the row: Axolotl's varlen path keeps them apart
        try:
            from axolotl.monkeypatch.attention.sdpa_varlen import _is_packed
        except ImportError:
            return False
        if _is_packed(position_ids):
            return False
    return True


def wrap(original, long_from: int = LONG_FROM):
    """transformers' attention-function contract: (module, q, k, v, mask, dropout, scaling, **kw) ->
    (out [B, S, Hq, D], None)."""

    def attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, **kwargs):
        causal = kwargs.get("is_causal", getattr(module, "is_causal", True))
        if (causal and STATE["refused"] is None
                and takes(query, key, attention_mask, dropout, kwargs.get("position_ids"), long_from)):
            try:
                return long_causal(query, key, value, scaling).transpose(1, 2).contiguous(), None
            except RuntimeError as err:  # a kernel that refuses these inputs: SDPA from now on, said once
                if "out of memory" in str(err).lower():
                    raise
                refuse(err)
        return original(module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs)

    attention.loft_long_attention = original
    return attention


def install(long_from: int = LONG_FROM) -> bool:
    """Wrap whatever 'sdpa' attention is registered now (Axolotl's packed-row router included); False when it
    already is wrapped."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    current = ALL_ATTENTION_FUNCTIONS["sdpa"]
    if getattr(current, "loft_long_attention", None) is not None:
        return False
    ALL_ATTENTION_FUNCTIONS.register("sdpa", wrap(current, long_from))
    return True


class LongAttentionPlugin(BasePlugin):
    """`plugins: [training.plugins.long_attention.LongAttentionPlugin]`: rows over 49,152 tokens attend once per K/V
    head."""

    def post_model_build(self, cfg, model):
        if getattr(cfg, "attn_implementation", None) not in (None, "sdpa"):
            return
        lever("long attention", install, lambda _: f"rows over {LONG_FROM:,} tokens attend once per K/V head")
