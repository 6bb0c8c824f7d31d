"""Liger's fused RoPE inside the attention that Axolotl's LoRA kernels rewrite, where `liger_rope: true` asks for it.

    plugins:
      - axolotl.integrations.liger.LigerPlugin
      - training.plugins.rope.FusedRopePlugin
    liger_rope: true

Why: with the fused LoRA kernels for Q/K/V and O (Axolotl 0.19 turns `lora_qkv_kernel` on by itself on one GPU),
Axolotl rewrites the attention's `forward` from its source text and runs the new function in the namespace of
`axolotl.monkeypatch.lora_kernels`, importing into it, by name, what the model's module holds at that moment,
`apply_rotary_pos_emb` among them. That happens among Axolotl's own patches, before any plugin's `pre_model_load`,
so before LigerPlugin puts Liger's fused RoPE into the model's module: the rewritten attention keeps calling
transformers' RoPE (rotate_half: a cat, a neg, two muls and an add per tensor, each way), and `liger_rope: true`
changes nothing, without a word. One profiled Llama-3.1-8B bf16 LoRA step on an H200 (2026-11-30, two 4,096-token
rows) shows it: 256 `aten::mul`, 128 `aten::neg` and 64 `aten::cat` (~35 ms of the step's 548 ms of GPU work with
the adds), where Unsloth's fused RoPE kernel took 2.9 ms.

What changes: once the model is built, the rewritten attention's name `apply_rotary_pos_emb` is pointed at what the
model's module holds now (Liger's `liger_rotary_pos_emb` when `liger_rope` is on). Nothing else: without Liger's
RoPE, or where Axolotl did not rewrite the attention, the two are already the same function and the plugin does
nothing. Liger's kernel computes the same rotation as transformers' (tests/test_rope.py on CPU checks the name the
rewritten forward resolves; Liger's own tests check the kernel against transformers').
"""

import sys

from training.plugins import lever

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object

NAME = "apply_rotary_pos_emb"


def rewritten_attention(model):
    """(attention class, the namespace its forward looks names up in) for the attention Axolotl's LoRA kernels
    rewrote in this model (on the class, or bound to each module as Loft's DPO trainer does), or None."""
    for module in model.modules():
        forward = getattr(module, "forward", None)
        func = getattr(forward, "__func__", forward)
        if getattr(func, "__name__", "") == "axolotl_attn_forward":
            return type(module), func.__globals__
    return None


def point_rope_at_model_module(model) -> str | None:
    """Make the rewritten attention call the RoPE function its model's module holds now; returns what changed, or
    None when nothing needed to."""
    found = rewritten_attention(model)
    if found is None:
        return None
    cls, names = found
    current = getattr(sys.modules.get(cls.__module__), NAME, None)
    held = names.get(NAME)
    if current is None or held is None or held is current:
        return None
    names[NAME] = current
    return (f"{cls.__name__} (rewritten for the LoRA kernels) now calls {getattr(current, '__name__', current)} "
            f"instead of {getattr(held, '__name__', held)}")


class FusedRopePlugin(BasePlugin):
    """`plugins: [training.plugins.rope.FusedRopePlugin]`: `liger_rope: true` reaches the LoRA kernels' attention."""

    def post_model_build(self, cfg, model):
        lever("rope", lambda: point_rope_at_model_module(model), failed="left as it is")
