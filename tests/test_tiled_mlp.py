"""training/plugins/tiled_mlp.py on a tiny random Llama with LoRA on CPU: tiled, the loss, the LoRA gradients and
the input-embedding gradient are those of the untiled model (same weights, same row), with gradient checkpointing
on as in the long recipe; short rows and several-row batches run untiled."""

import copy

import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from training.plugins import tiled_mlp


def model():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, lora_dropout=0.0, init_lora_weights=False,
        target_modules=["q_proj", "v_proj", "gate_proj", "up_proj", "down_proj"]))


def step(m, ids):
    m.zero_grad()
    embeds = m.get_input_embeddings()(ids).detach().requires_grad_(True)
    loss = m(inputs_embeds=embeds, labels=ids).loss
    loss.backward()
    return loss.detach(), embeds.grad, {n: p.grad.clone() for n, p in m.named_parameters() if p.requires_grad}


def test_tiled_mlp_gives_the_untiled_loss_and_gradients():
    plain = model()
    tiled = copy.deepcopy(plain)
    for m in (plain, tiled):
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()
        m.train()
    found = tiled_mlp.mlps(tiled)
    assert len(found) == 2 and all(tiled_mlp.tile(mlp, tile_tokens=16, untiled_up_to=24) for mlp in found)
    assert not tiled_mlp.tile(found[0], tile_tokens=16)  # already tiled: not wrapped twice
    calls = []
    inner = found[0].forward

    def counted(x, *a, **kw):
        calls.append(x.shape[1])
        return inner(x, *a, **kw)
    found[0].forward = counted
    ids = torch.randint(0, 100, (1, 72))  # 72 tokens, at most 16 a piece: 5 pieces (torch.chunk: 15, 15, 15, 15, 12)
    ours, theirs = step(tiled, ids), step(plain, ids)
    assert torch.allclose(ours[0], theirs[0], atol=1e-6)
    assert torch.allclose(ours[1], theirs[1], atol=1e-6)
    assert ours[2].keys() == theirs[2].keys()
    for name, grad in theirs[2].items():
        assert torch.allclose(ours[2][name], grad, atol=1e-6), name
    assert calls == [72, 72]  # forward, and the checkpoint's recomputation, each through the tiled wrapper

    lengths = []  # what the MLP's own layers saw: pieces on a long row, the whole of a short row or a batch
    hook = found[1].down_proj.register_forward_hook(lambda mod, args, out: lengths.append(args[0].shape[1]))
    try:
        with torch.no_grad():
            tiled(input_ids=ids)
            assert lengths == [15, 15, 15, 15, 12]
            lengths.clear()
            tiled(input_ids=ids[:, :24])  # up to untiled_up_to: whole
            tiled(input_ids=ids.repeat(2, 1))
            assert lengths == [24, 72]
    finally:
        hook.remove()
