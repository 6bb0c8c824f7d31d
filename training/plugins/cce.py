"""Cut Cross-Entropy for Loft recipes: the loss from the last hidden states and the LM head's weight, without logits.

    plugins:
      - axolotl.integrations.liger.LigerPlugin        # Liger's RMSNorm/RoPE/SwiGLU stay
      - training.plugins.cce.CutCrossEntropyPlugin
    liger_fused_linear_cross_entropy: false          # one of the two owns the loss

Why a Loft plugin: Axolotl 0.19's own cut_cross_entropy integration refuses to run without Axolotl's git fork of
the package (it checks for `cut_cross_entropy.transformers.patch.AXOLOTL_CCE_FORK`), and the PyPI release, Apple's
cut-cross-entropy 25.1.1, ships only the kernel. This plugin calls that kernel directly (Wijmans et al., "Cut Your
Losses in Large-Vocabulary Language Models", 2024: the loss and its gradient are computed blockwise in on-chip
memory, and gradient entries below bf16's resolution are skipped), in place of Liger's fused linear
cross-entropy, which materialises the logits of one chunk of tokens at a time in fp32. Whether it is faster here
is a measurement (benchmarks/gpu/vs-peers.sh); the loss it returns is the causal-LM loss transformers computes
(next-token shift, -100 ignored, summed over `num_items_in_batch` when the trainer passes it), which the CPU tests
check against the model's own loss.
"""

import torch
from torch.nn import functional

from training.recipe import RecipeFacts

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object

IGNORE = -100
PATCHABLE = {"llama": ("transformers.models.llama.modeling_llama", "LlamaForCausalLM"),
             "qwen2": ("transformers.models.qwen2.modeling_qwen2", "Qwen2ForCausalLM"),
             "mistral": ("transformers.models.mistral.modeling_mistral", "MistralForCausalLM")}


def reference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    """The causal-LM loss the plain way (full logits in fp32): what every fused loss must equal."""
    logits = (hidden[:, :-1] @ weight.T).float()
    loss = functional.cross_entropy(logits.flatten(0, 1), labels[:, 1:].flatten(), ignore_index=IGNORE,
                                    reduction="sum" if num_items else "mean")
    return loss / num_items if num_items else loss


def cce_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, num_items=None) -> torch.Tensor:
    from cut_cross_entropy import linear_cross_entropy

    loss = linear_cross_entropy(hidden, weight, labels, ignore_index=IGNORE, shift=True,
                                reduction="sum" if num_items else "mean")
    return loss / num_items if num_items else loss


def fused_forward(original, loss_fn):
    """A ForCausalLM.forward that returns the loss from hidden states (no logits) when it is given labels, and is
    the original forward otherwise (generation, evaluation without labels)."""

    def forward(self, input_ids=None, labels=None, logits_to_keep=0, **kwargs):
        if labels is None:
            return original(self, input_ids=input_ids, logits_to_keep=logits_to_keep, **kwargs)
        from transformers.modeling_outputs import CausalLMOutputWithPast

        num_items = kwargs.pop("num_items_in_batch", None)
        out = self.model(input_ids=input_ids, **kwargs)
        loss = loss_fn(out.last_hidden_state, self.lm_head.weight, labels, num_items)
        return CausalLMOutputWithPast(loss=loss, logits=None, past_key_values=out.past_key_values,
                                      hidden_states=out.hidden_states, attentions=out.attentions)

    forward.loft_fused_loss = loss_fn
    return forward


def patch(model_type: str, loss_fn=cce_loss) -> type:
    """Replace the causal-LM class's forward for `model_type` (once); returns the class."""
    import importlib

    if model_type not in PATCHABLE:
        raise ValueError(f"training.plugins.cce.CutCrossEntropyPlugin supports {', '.join(sorted(PATCHABLE))}, not "
                         f"`{model_type}`; remove the plugin from this recipe")
    module, name = PATCHABLE[model_type]
    cls = getattr(importlib.import_module(module), name)
    original = getattr(cls.forward, "loft_original", cls.forward)
    cls.forward = fused_forward(original, loss_fn)
    cls.forward.loft_original = original
    return cls


class CutCrossEntropyPlugin(BasePlugin):
    """`plugins: [training.plugins.cce.CutCrossEntropyPlugin]`: the loss through Apple's cut-cross-entropy kernel."""

    def pre_model_load(self, cfg):
        if RecipeFacts.of(cfg).fused_cross_entropy:
            raise ValueError("training.plugins.cce.CutCrossEntropyPlugin computes the loss itself: set "
                             "liger_fused_linear_cross_entropy: false (and no cut_cross_entropy) in this recipe")
        try:  # fail here, naming the package, not inside the first training step
            import cut_cross_entropy  # noqa: F401
        except ImportError as err:
            raise ImportError("training.plugins.cce.CutCrossEntropyPlugin needs cut-cross-entropy (pip install "
                              "cut-cross-entropy==25.1.1; the GPU host's wheelhouse from fetch-wheels-slim.sh "
                              f"--unsloth has it): {err}") from None
        patch(cfg.get("model_config_type"))
