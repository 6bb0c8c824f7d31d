"""The cuDNN-first attention plugin changes only SDPA's priority order: every backend stays on, results unchanged."""

import pytest
import torch
from torch.nn import functional

from training.attention import ORDER, CudnnAttentionPlugin, restore


@pytest.fixture
def plugin():
    yield CudnnAttentionPlugin()
    restore()


def enabled():
    return (torch.backends.cuda.flash_sdp_enabled(), torch.backends.cuda.mem_efficient_sdp_enabled(),
            torch.backends.cuda.math_sdp_enabled(), torch.backends.cuda.cudnn_sdp_enabled())


def test_cudnn_first_every_backend_kept(plugin):
    before_order, before_enabled = torch._C._get_sdp_priority_order(), enabled()
    q, k, v = (torch.randn(1, 2, 16, 8) for _ in range(3))
    want = functional.scaled_dot_product_attention(q, k, v, is_causal=True)
    plugin.pre_model_load({"attn_implementation": "sdpa"})
    plugin.pre_model_load({"attn_implementation": "sdpa"})  # twice is once
    assert torch._C._get_sdp_priority_order()[: len(ORDER)] == [int(b) for b in ORDER]
    assert enabled() == (True, True, True, True)
    assert torch.equal(functional.scaled_dot_product_attention(q, k, v, is_causal=True), want)  # CPU: same kernel
    restore()
    assert torch._C._get_sdp_priority_order() == before_order and enabled() == before_enabled


@pytest.mark.parametrize("cfg", [{"attn_implementation": "eager"}, {"flash_attention": True}])
def test_refuses_other_attention(plugin, cfg):
    with pytest.raises(ValueError, match="attn_implementation: sdpa"):
        plugin.pre_model_load(cfg)
