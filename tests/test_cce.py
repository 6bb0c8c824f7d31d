"""training/plugins/cce.py on the CPU: the patched causal-LM forward returns exactly the loss (and gradients)
transformers computes, with and without the trainer's num_items_in_batch, and the plugin refuses what it cannot serve.
The cut-cross-entropy kernel itself is Triton on CUDA: on the CPU the plain fp32 loss stands in for it."""

import pytest
import torch

from benchmarks import speed
from training.plugins import cce


@pytest.fixture
def tiny(monkeypatch):
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.models.qwen2 import modeling_qwen2

    monkeypatch.setattr(modeling_qwen2.Qwen2ForCausalLM, "forward", modeling_qwen2.Qwen2ForCausalLM.forward)
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_config(AutoConfig.for_model(**speed.TINY))


def _batch():
    ids = torch.randint(10, 4000, (2, 24))
    labels = ids.clone()
    labels[:, :8] = cce.IGNORE  # a masked prompt
    labels[1, 20:] = cce.IGNORE
    return ids, labels


@pytest.mark.parametrize("num_items", [None, 29])
def test_fused_forward_gives_the_models_own_loss_and_gradients(tiny, num_items):
    ids, labels = _batch()
    extra = {"num_items_in_batch": torch.tensor(num_items)} if num_items else {}
    expected = tiny(input_ids=ids, labels=labels, **extra)
    expected.loss.backward()
    grads = [p.grad.clone() for p in tiny.parameters()]
    tiny.zero_grad()

    cls = cce.patch("qwen2", loss_fn=cce.reference_loss)
    assert cls.forward.loft_fused_loss is cce.reference_loss
    got = tiny(input_ids=ids, labels=labels, **extra)
    assert got.logits is None  # the point: no logits tensor
    assert torch.allclose(got.loss, expected.loss, atol=1e-5)
    got.loss.backward()
    for before, p in zip(grads, tiny.parameters()):
        assert torch.allclose(before, p.grad, atol=1e-5)
    assert tiny(input_ids=ids).logits.shape == (2, 24, speed.TINY["vocab_size"])  # no labels: the original forward
    cce.patch("qwen2", loss_fn=cce.reference_loss)  # patching twice wraps the original, not the patch
    assert cls.forward.loft_original.__qualname__ == "Qwen2ForCausalLM.forward"


def test_plugin_refuses_a_second_fused_loss_and_unknown_models():
    with pytest.raises(ValueError, match="liger_fused_linear_cross_entropy: false"):
        cce.CutCrossEntropyPlugin().pre_model_load({"liger_fused_linear_cross_entropy": True,
                                                    "plugins": ["axolotl.integrations.liger.LigerPlugin"],
                                                    "model_config_type": "qwen2"})
    with pytest.raises(ValueError, match="supports llama, mistral, qwen2, not `gemma2`"):
        cce.patch("gemma2")


def test_plugin_names_the_missing_package():
    import importlib.util

    if importlib.util.find_spec("cut_cross_entropy"):
        pytest.skip("cut-cross-entropy is installed here")
    with pytest.raises(ImportError, match="needs cut-cross-entropy"):
        cce.CutCrossEntropyPlugin().pre_model_load({"model_config_type": "qwen2"})
