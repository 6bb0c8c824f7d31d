"""The cuDNN attention lever: SDPA's order with cuDNN first, every backend still on, grouped K/V repeated by
transformers instead of passed with enable_gqa; the model's output is unchanged and everything is undone."""

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM
from transformers.integrations import sdpa_attention

from training.plugins.attention import ORDER, CudnnAttentionPlugin, restore


@pytest.fixture
def plugin():
    yield CudnnAttentionPlugin()
    restore()


def enabled():
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())


def tiny_gqa_model():
    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, attn_implementation="sdpa")
    return Qwen2ForCausalLM(cfg).eval()


def test_grouped_kv_repeated_cudnn_first_output_unchanged(plugin, monkeypatch):
    model, ids = tiny_gqa_model(), torch.randint(0, 64, (1, 12))
    calls = []
    real = torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        calls.append((q.shape[1], k.shape[1], kwargs.get("enable_gqa", False)))
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy)
    before_order, before_enabled = torch._C._get_sdp_priority_order(), enabled()
    with torch.no_grad():
        want = model(ids).logits
    assert calls[0] == (4, 2, True), "without a mask transformers passes grouped K/V (what the lever changes)"

    calls.clear()
    plugin.pre_model_load({"attn_implementation": "sdpa"})
    plugin.pre_model_load({"attn_implementation": "sdpa"})  # twice is once
    assert torch._C._get_sdp_priority_order()[: len(ORDER)] == [int(b) for b in ORDER]
    assert enabled() == (True, True, True, True)
    with torch.no_grad():
        got = model(ids).logits
    assert calls[0] == (4, 4, False), "K/V repeated to the query heads, as the peers' masked calls are"
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    restore()
    assert torch._C._get_sdp_priority_order() == before_order and enabled() == before_enabled
    assert sdpa_attention.use_gqa_in_sdpa(None, torch.zeros(1, 2, 3, 8), torch.zeros(1, 2, 3, 8))


@pytest.mark.parametrize("cfg", [{"attn_implementation": "eager"}, {"flash_attention": True}])
def test_refuses_other_attention(plugin, cfg):
    with pytest.raises(ValueError, match="attn_implementation: sdpa"):
        plugin.pre_model_load(cfg)
