"""training/plugins/rope.py with Axolotl's own attention rewrite on a tiny random Llama with LoRA, on CPU: in
Axolotl's order (the rewrite first, then a plugin puts a fused RoPE into the model's module, as LigerPlugin does)
the rewritten attention never calls the fused function; after the plugin every layer does, with the same logits.
The fused function here wraps transformers' own RoPE (Liger's is a Triton kernel: GPU only); what the plugin fixes
is which function the rewritten forward finds by name, the same for either."""

import tempfile

import pytest
import torch
from axolotl.monkeypatch import lora_kernels as ax
from axolotl.utils.dict import DictDefault
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM
from transformers.models.llama import modeling_llama

from training.plugins.rope import NAME, FusedRopePlugin


@pytest.fixture
def rewritten(monkeypatch):
    """Axolotl's class-level rewrite of LlamaAttention, undone afterwards (other tests in this process build
    Llamas without apply_qkv)."""
    cls = modeling_llama.LlamaAttention
    monkeypatch.setattr(cls, "forward", cls.forward)
    monkeypatch.setattr(ax, NAME, getattr(ax, NAME, None), raising=False)
    config = LlamaConfig(vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    with tempfile.TemporaryDirectory() as folder:
        config.save_pretrained(folder)
        try:
            ax.patch_self_attn_lora(DictDefault(base_model=folder, lora_qkv_kernel=True, lora_o_kernel=True))
            yield config
        finally:
            if "_original_forward" in cls.__dict__:
                del cls._original_forward


def test_liger_style_rope_reaches_the_attention_axolotl_rewrote(rewritten, monkeypatch):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(rewritten), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]))
    ax.apply_lora_kernel_patches(model, DictDefault(lora_qkv_kernel=True, lora_o_kernel=True,
                                                    lora_mlp_kernel=False))
    stock = modeling_llama.apply_rotary_pos_emb
    calls = []

    def fused(q, k, cos, sin, *args, **kwargs):
        calls.append(q.shape)
        return stock(q, k, cos, sin, *args, **kwargs)

    monkeypatch.setattr(modeling_llama, NAME, fused)  # what LigerPlugin's pre_model_load does, after the rewrite
    ids = torch.randint(0, 128, (2, 16))
    with torch.no_grad():
        before = model(input_ids=ids).logits
        assert calls == []  # the rewritten attention kept transformers' RoPE: liger_rope would do nothing
        plugin = FusedRopePlugin()
        plugin.post_model_build({}, model)
        after = model(input_ids=ids).logits
    assert len(calls) == rewritten.num_hidden_layers and torch.allclose(before, after, atol=1e-6)
    assert type(model.base_model.model.model.layers[0].self_attn).forward.__name__ == "axolotl_attn_forward"
    assert plugin.post_model_build({}, model) is None  # nothing more to change


def test_a_model_without_the_rewrite_is_left_alone():
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    from training.plugins.rope import point_rope_at_model_module
    assert point_rope_at_model_module(model) is None
