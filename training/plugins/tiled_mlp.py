"""The MLP of every layer run over the sequence in tiles, so a long row's MLP activations exist one tile at a time.

    plugins:
      - training.plugins.tiled_mlp.TiledMLPPlugin

Why: with gradient checkpointing and the checkpointed layer inputs offloaded to CPU RAM, what is left on the card
at the longest sequences is one layer's recomputation, and most of it is the MLP's: the gate, up and SwiGLU
tensors are 14,336 wide on Llama-3.1-8B (3.5 times the hidden size), ~28 KB a token each in bf16, and the fused
LoRA MLP keeps them for its backward. Tiling cuts the sequence into pieces of at most 8,192 tokens for the MLP
only (attention still sees the whole row): the forward runs piece by piece without keeping anything, and the
backward recomputes one piece at a time and adds up the LoRA gradients. It costs one more MLP forward per layer.

How: Axolotl 0.19 has this idea (`tiled_mlp: true`, from Snowflake's ALST), but its switch patches the MLP class
before the model exists, and Axolotl's fused LoRA MLP kernel is then set on each MLP instance, which hides the
class's forward: with the kernels on, `tiled_mlp: true` tiles nothing (and it imports DeepSpeed to choose an
implementation). This plugin wraps each MLP's forward as it is once the trainer is built (the LoRA kernel, or
PEFT's layers) in Axolotl's own single-device autograd function, `axolotl.monkeypatch.tiled_mlp.base.TiledMLP`.
Rows of up to 24,576 tokens (the recipe's own length) and micro-batches of several rows run untiled. Not under
DeepSpeed or FSDP (sharded weights need their engines' gathering; Axolotl's own switch covers those).
"""

import math

# the longest piece (short enough that a piece's MLP tensors are small next to the model), and the longest row that
# runs untiled, at full speed: decided beside the memory estimator, which counts them
from training.checks.memory import MLP_TILE_TOKENS as TILE_TOKENS
from training.checks.memory import MLP_UNTILED_UP_TO as UNTILED_UP_TO
from training.plugins import lever

try:  # Axolotl is only needed in Axolotl's own process
    from axolotl.integrations.base import BasePlugin
except ImportError:  # pragma: no cover - every Loft environment has Axolotl
    BasePlugin = object


def mlps(model):
    """Every gated MLP (gate_proj, up_proj, down_proj) in the model."""
    return [m for m in model.modules() if all(hasattr(m, n) for n in ("gate_proj", "up_proj", "down_proj"))]


def tile(mlp, tile_tokens: int = TILE_TOKENS, untiled_up_to: int = UNTILED_UP_TO) -> bool:
    """Wrap this MLP's current forward (whatever is set on the instance, else its class's) in tiles; False when it
    already is."""
    if getattr(mlp.forward, "loft_tiled", False):
        return False
    from axolotl.monkeypatch.tiled_mlp.base import TiledMLP

    inner = mlp.forward
    trainable = [p for p in mlp.parameters() if p.requires_grad]

    def forward(x, *args, **kwargs):
        shards = math.ceil(x.shape[1] / tile_tokens) if x.dim() == 3 and x.shape[1] > untiled_up_to else 1
        if shards <= 1 or x.shape[0] != 1 or args or kwargs:  # its backward cuts one row's flat storage
            return inner(x, *args, **kwargs)
        return TiledMLP.apply(lambda _, piece: inner(piece), mlp, x, shards, trainable)

    forward.loft_tiled = True
    mlp.forward = forward
    return True


class TiledMLPPlugin(BasePlugin):
    """`plugins: [training.plugins.tiled_mlp.TiledMLPPlugin]`: each MLP over a long row in pieces of 8,192 tokens."""

    def post_trainer_create(self, cfg, trainer):
        from training.plugins.lean import sharded

        if sharded(trainer):
            print("loft tiled MLP: left off (DeepSpeed/FSDP hold the weights)", flush=True)
            return
        def apply():
            found = mlps(trainer.model)
            return sum(tile(m) for m in found), len(found)

        lever("tiled MLP", apply, lambda counts: f"{counts[0]} of {counts[1]} MLPs run in pieces of {TILE_TOKENS:,} "
              f"tokens on rows longer than {UNTILED_UP_TO:,}")
