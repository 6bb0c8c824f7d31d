"""The long recipe's two memory plugins on CPU, where their GPU kernels cannot run: the logic around the kernels.

training/plugins/long_attention.py: cuDNN's calls are swapped for exact math stand-ins (SDPA's math kernel and its
autograd), so what is checked is the plugin's own work: one call per K/V head with the query heads that share it,
the outputs and gradients written into the right slices, the routing of calls, the fallback when a kernel refuses.
The GPU host checks the kernels themselves against SDPA (benchmarks/gpu/attention_memory.py, exact gradients).
training/plugins/embedding_offload.py: the lookup hooks on a tiny random Llama with LoRA under checkpointing.
"""

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

from training.plugins import embedding_offload, long_attention


def math_attend(q, k, v, scale):
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    s, d = q.shape[2], q.shape[3]
    scores = (q @ k.repeat_interleave(q.shape[1] // k.shape[1], 1).transpose(-1, -2)) * (scale or d ** -0.5)
    lse = scores.masked_fill(~torch.ones(s, s, dtype=torch.bool).tril(), float("-inf")).logsumexp(-1, keepdim=True)
    return out, lse, None, None


CALLS = []


def math_backward(grad_out, q, k, v, out, lse, seed, offset, scale):
    CALLS.append((q.shape[1], k.shape[1]))
    with torch.enable_grad():  # a backward runs with grad mode off
        leaves = [t.detach().requires_grad_() for t in (q, k, v)]
        again = F.scaled_dot_product_attention(*leaves, is_causal=True, scale=scale, enable_gqa=True)
        return torch.autograd.grad(again, leaves, grad_out)


def qkv(heads=8, kv_heads=2, s=24, d=8):
    torch.manual_seed(0)
    return [torch.randn(1, h, s, d, requires_grad=True) for h in (heads, kv_heads, kv_heads)]


def test_once_per_kv_head_gives_sdpa_output_and_gradients(monkeypatch):
    monkeypatch.setattr(long_attention, "attend", math_attend)
    monkeypatch.setattr(long_attention, "attend_backward", math_backward)
    monkeypatch.setitem(long_attention.STATE, "refused", None)
    CALLS.clear()
    q, k, v = qkv()
    grad = torch.randn(1, 8, 24, 8)
    ours = long_attention.long_causal(q, k, v)
    ours.backward(grad)
    mine = [ours.detach(), q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    theirs = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True)
    theirs.backward(grad)
    for a, b in zip(mine, [theirs.detach(), q.grad, k.grad, v.grad], strict=True):
        assert torch.allclose(a, b, atol=1e-5)
    assert CALLS == [(4, 1), (4, 1)] and long_attention.STATE["refused"] is None  # 2 K/V heads, 4 query heads each
    assert ours.transpose(1, 2).is_contiguous()  # SDPA's layout: the caller's transpose is free


def test_a_refusing_backward_falls_back_to_sdpa(monkeypatch, capsys):
    def refusing(*args):
        raise RuntimeError("cuDNN refused these strides")

    monkeypatch.setattr(long_attention, "attend", math_attend)
    monkeypatch.setattr(long_attention, "attend_backward", refusing)
    monkeypatch.setitem(long_attention.STATE, "refused", None)
    q, k, v = qkv()
    long_attention.long_causal(q, k, v).sum().backward()
    mine = [q.grad, k.grad, v.grad]
    q.grad = k.grad = v.grad = None
    F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).sum().backward()
    assert all(torch.allclose(a, b, atol=1e-5) for a, b in zip(mine, [q.grad, k.grad, v.grad]))
    assert long_attention.STATE["refused"] == "cuDNN refused these strides"
    assert "loft long attention: left off (cuDNN refused these strides)" in capsys.readouterr().out


def test_routing_takes_long_causal_rows_only(monkeypatch):
    monkeypatch.setattr(long_attention, "attend", math_attend)
    monkeypatch.setattr(long_attention, "attend_backward", math_backward)
    monkeypatch.setitem(long_attention.STATE, "refused", None)
    seen = []

    def original(module, q, k, v, mask, dropout=0.0, scaling=None, **kw):
        seen.append("sdpa")
        return F.scaled_dot_product_attention(q, k, v, is_causal=mask is None, enable_gqa=True).transpose(1, 2), None

    routed = long_attention.wrap(original, long_from=16)
    module = torch.nn.Module()
    q, k, v = qkv()
    # on CPU `takes` says no (the kernels are CUDA's): the original runs
    routed(module, q, k, v, None)
    assert seen == ["sdpa"]
    monkeypatch.setattr(long_attention, "takes", lambda *a, **kw: True)
    out, _ = routed(module, q, k, v, None)
    assert seen == ["sdpa"] and out.shape == (1, 24, 8, 8)
    routed(module, q, k, v, None, is_causal=False)  # not causal: never this path
    assert seen == ["sdpa", "sdpa"]
    assert getattr(routed, "loft_long_attention") is original


def test_takes_refuses_what_it_cannot_compute_exactly():
    q, k, _ = qkv(s=64)
    assert not long_attention.takes(q, k, None, 0.0, None, long_from=16)  # CPU
    half = q.to(torch.bfloat16)
    for mask, dropout in ((torch.ones(1), 0.0), (None, 0.1)):
        assert not long_attention.takes(half, k, mask, dropout, None, long_from=16)


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=100, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    return get_peft_model(LlamaForCausalLM(config), LoraConfig(r=4, lora_alpha=8, init_lora_weights=False,
                                                                target_modules=["q_proj", "v_proj"]))


def test_embedding_lookup_hooks_keep_loss_and_lora_gradients():
    ids = torch.randint(0, 100, (1, 20))
    results = []
    for hooked in (False, True):
        m = llama()
        m.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": True})
        m.enable_input_require_grads()  # PEFT's hook: the rows must require grad for reentrant checkpointing
        m.train()
        if hooked:
            embedding_offload.look_up_on_cpu(m.get_input_embeddings(), torch.device("cpu"))
        loss = m(input_ids=ids, labels=ids).loss
        loss.backward()
        results.append((loss.detach(), {n: p.grad for n, p in m.named_parameters() if p.requires_grad}))
    (plain, plain_grads), (hooked, hooked_grads) = results
    assert torch.allclose(plain, hooked)
    assert plain_grads.keys() == hooked_grads.keys() and plain_grads
    assert all(torch.allclose(plain_grads[n], hooked_grads[n], atol=1e-6) for n in plain_grads)


def test_embedding_stays_where_it_must():
    m = llama()
    assert "not a GPU" in embedding_offload.why_not(m)  # a CPU run: nothing to free
    assert embedding_offload.offload(m).startswith("left on the GPU")
    assert not getattr(m.get_input_embeddings(), "loft_offloaded", False)
    m.get_input_embeddings().weight.requires_grad_(True)
    assert embedding_offload.why_not(m) == "the embedding trains"
    tied = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                        num_attention_heads=2, tie_word_embeddings=True)).requires_grad_(False)
    assert "tied embeddings" in embedding_offload.why_not(tied)
