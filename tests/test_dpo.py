"""training/plugins/dpo.py's chunked log-probs against TRL's own DPO loss: same loss, same gradients, same metrics.

TRL 1.9's DPOTrainer._compute_loss is the oracle: both methods run on one trainer object (a tiny random Llama with
a LoRA adapter, the reference = adapter disabled), on the same padded batch of prompt + completion pairs.
Axolotl's fused LoRA kernels (training/plugins/dpo_kernels.py) are checked against the same model unpatched.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("axolotl")

from accelerate import Accelerator  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM  # noqa: E402
from transformers.models.qwen2.modeling_qwen2 import Qwen2Attention  # noqa: E402
from trl import DPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DataCollatorForPreference  # noqa: E402

from training.plugins import dpo, dpo_kernels  # noqa: E402

VOCAB = 300


def llama():
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    return get_peft_model(LlamaForCausalLM(config), lora)  # random B: policy and reference differ


def trainer(loss_types=("sigmoid",), precompute=False, model=None):
    model = model or llama()
    t = object.__new__(dpo.LoftDPOTrainer)
    t.__dict__.update(
        accelerator=Accelerator(cpu=True), model=model, ref_model=None, beta=0.1, loss_types=list(loss_types),
        loss_weights=[1.0] * len(loss_types), label_smoothing=0.1 if "robust" in loss_types else 0.0, ld_alpha=None,
        use_weighting=False, aux_loss_enabled=False, f_divergence_type="reverse_kl", use_liger_kernel=False,
        _is_vlm=False, precompute_ref_logps=precompute, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0,
        data_collator=DataCollatorForPreference(pad_token_id=0))  # right padding: the chunked path drops the mask
    return t


def batch(pairs=3, length=40, seed=1):
    """[chosen..., rejected...], right-padded, prompts of different lengths masked out of the completion."""
    g = torch.Generator().manual_seed(seed)
    rows = 2 * pairs
    ids = torch.randint(1, VOCAB, (rows, length), generator=g)
    attention = torch.ones(rows, length, dtype=torch.long)
    completion = torch.zeros(rows, length, dtype=torch.long)
    for r in range(rows):
        prompt, end = 5 + 3 * (r % pairs), length - 4 * r
        completion[r, prompt:end] = 1
        attention[r, end:] = 0
        ids[r, end:] = 0
    return {"input_ids": ids, "attention_mask": attention, "completion_mask": completion}


def run(t, method, inputs):
    t.model.zero_grad()
    t._metrics["train"].clear()
    t._total_train_tokens = 0
    loss = method(t, t.model, inputs, False)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in t.model.named_parameters() if p.requires_grad}
    return loss.detach(), grads, {k: v[-1] for k, v in t._metrics["train"].items()}


@pytest.mark.parametrize("loss_types", [("sigmoid",), ("ipo",), ("hinge", "robust")])
def test_chunked_loss_matches_trl(loss_types, monkeypatch):
    t = trainer(loss_types)
    assert t._chunked
    monkeypatch.setattr(dpo, "CHUNK_LOGIT_BYTES", VOCAB * 4 * 16)  # 16 tokens per chunk: several chunks per batch
    assert t._chunk_tokens() == 16
    inputs = batch()
    ours = run(t, dpo.LoftDPOTrainer._compute_loss, inputs)
    theirs = run(t, DPOTrainer._compute_loss, inputs)
    assert torch.allclose(ours[0], theirs[0], rtol=1e-5, atol=1e-6), (ours[0], theirs[0])
    assert ours[1].keys() == theirs[1].keys() and ours[1]
    for name, grad in ours[1].items():
        assert torch.allclose(grad, theirs[1][name], rtol=1e-4, atol=1e-7), name
    assert set(ours[2]) == set(theirs[2]) - {"aux_loss"}
    for key, value in theirs[2].items():
        assert ours[2][key] == pytest.approx(value, rel=1e-4, abs=1e-6), key


def test_right_padded_batches_reach_the_decoder_without_the_padding_mask(monkeypatch):
    """With TRL's right-padding collator the mask is dropped (causal SDPA; the test above shows loss and gradients
    unchanged); with any other collator it is passed as it is."""
    seen = []
    t = trainer()
    decoder = t._parts()[1]
    stock = type(decoder).forward

    def forward(self, *args, **kwargs):
        seen.append(kwargs.get("attention_mask"))
        return stock(self, *args, **kwargs)
    monkeypatch.setattr(type(decoder), "forward", forward)
    inputs = batch(pairs=2)
    assert not inputs["attention_mask"].all()  # the batch has padding
    for collator, dropped in ((DataCollatorForPreference(pad_token_id=0), True), (None, False)):
        t.__dict__.pop("_right_padded", None)
        t.data_collator = collator
        seen.clear()
        dpo.LoftDPOTrainer._logps(t, inputs, reference=False)
        assert len(seen) == 1 and (seen[0] is None) == dropped


def test_reference_logps_match_trl_and_precompute_path():
    t = trainer()
    inputs = batch(pairs=2)
    ours = dpo.LoftDPOTrainer.compute_ref_log_probs(t, t.model, inputs)
    theirs = DPOTrainer.compute_ref_log_probs(t, t.model, inputs)
    for a, b in zip(ours, theirs, strict=True):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-5)
    # precomputed reference columns in the batch: the loss uses them instead of a reference pass
    p = trainer(precompute=True)
    pre = dict(inputs, ref_chosen_logps=theirs[0], ref_rejected_logps=theirs[1])
    assert torch.allclose(run(p, dpo.LoftDPOTrainer._compute_loss, pre)[0],
                          run(p, DPOTrainer._compute_loss, pre)[0], rtol=1e-5)


def test_reference_pass_leaves_adapters_and_checkpointing_as_they_were():
    t = trainer()
    t.model.gradient_checkpointing_enable({"use_reentrant": False})
    t.model.train()
    inputs = batch(pairs=2)
    policy = dpo.LoftDPOTrainer._logps(t, inputs, reference=False)[0].detach()
    reference = dpo.LoftDPOTrainer.compute_ref_log_probs(t, t.model, inputs)
    with t.model.disable_adapter(), torch.no_grad():  # PEFT's own way to the base model
        base = dpo.LoftDPOTrainer._logps(t, inputs, reference=False)[0]
    assert torch.allclose(torch.cat(reference), base, atol=1e-5) and not torch.allclose(policy, base, atol=1e-3)
    lora, checkpointed = t._toggles()
    assert lora and checkpointed
    assert all(not m.disable_adapters for m in lora) and all(m.gradient_checkpointing for m in checkpointed)
    assert torch.allclose(dpo.LoftDPOTrainer._logps(t, inputs, reference=False)[0], policy, atol=1e-6)


def test_uncovered_configurations_fall_back_to_trl():
    assert not trainer(("apo_zero",))._chunked
    t = trainer()
    t.ld_alpha = 0.5
    assert not t._chunked
    t = trainer()
    t.model.base_model.model.lm_head.lora_A = torch.nn.ModuleDict()  # a LoRA on the LM head: Liger's caveat too
    assert not t._chunked


def test_only_completion_tokens_reach_the_lm_head():
    """The prompt's and the padding's positions are never multiplied by the LM head."""
    t = trainer()
    inputs = batch(pairs=2)
    _, decoder, lm_head = t._parts()
    seen = []
    calls = dpo.F.linear

    def count(x, w, b=None):
        seen.append(x.shape[0])
        return calls(x, w, b)

    with torch.no_grad():
        hidden = decoder(input_ids=inputs["input_ids"]).last_hidden_state
    dpo.F.linear = count
    try:
        with torch.no_grad():
            dpo.completion_logps(hidden, lm_head, inputs["input_ids"], inputs["completion_mask"], 1000)
    finally:
        dpo.F.linear = calls
    assert seen == [int(inputs["completion_mask"][:, 1:].sum())]


@pytest.mark.parametrize("with_stats", [True, False])
def test_frozen_head_gradient_from_the_forward_matches_checkpointed_chunks(with_stats):
    """With the LM head frozen the gradient is worked out in the forward (dpo_logps.FrozenHeadLogps) and the backward
    never runs the head; with the head trained, chunks under checkpointing. Same log-probs, stats and state
    gradients either way, and only the trained head gets a weight gradient."""
    torch.manual_seed(0)
    head = torch.nn.Linear(16, VOCAB, bias=False)
    ids = torch.randint(0, VOCAB, (4, 23))
    completion = (torch.rand(4, 23) > 0.3).long()
    upstream = torch.randn(4)
    calls = dpo.F.linear
    results = []
    for trained in (False, True):
        head.weight.requires_grad_(trained)
        hidden = torch.randn(4, 23, 16, generator=torch.Generator().manual_seed(1), requires_grad=True)
        seen = []

        def count(x, w, b=None):
            seen.append(x.shape[0])
            return calls(x, w, b)

        dpo.F.linear = count
        try:
            seq, stats, rows = dpo.completion_logps(hidden, head, ids, completion, 7, with_stats=with_stats)
            (seq * upstream).sum().backward()
        finally:
            dpo.F.linear = calls
        tokens = int(completion[:, 1:].sum())
        assert sum(seen) == tokens * (2 if trained else 1)  # the checkpointed chunks run the head again
        assert (head.weight.grad is not None) == trained
        results.append((seq.detach(), stats, rows, hidden.grad))
        head.weight.grad = None
    for ours, theirs in zip(*results, strict=True):
        assert torch.allclose(ours, theirs, rtol=1e-5, atol=1e-6)
    assert results[0][3].abs().sum() > 0  # a gradient reached the states
    assert bool(results[0][1].abs().sum() > 0) == with_stats


def test_frozen_4bit_biases_cast_to_the_compute_dtype():
    """What bitsandbytes' Linear4bit.forward does on its first call, done up front for the fused kernels that bypass
    it: only frozen biases of quantised layers, nothing trained, nothing of a plain layer."""
    quantised = torch.nn.Linear(4, 4)
    quantised.weight.quant_state = object()  # how Params4bit marks a 4-bit weight
    quantised.compute_dtype = torch.bfloat16
    quantised.bias.requires_grad_(False)
    trained = torch.nn.Linear(4, 4)
    trained.weight.quant_state, trained.compute_dtype = object(), torch.bfloat16
    plain = torch.nn.Linear(4, 4)
    plain.compute_dtype = torch.bfloat16
    plain.bias.requires_grad_(False)
    model = torch.nn.Sequential(quantised, trained, plain)
    before = quantised.bias.detach().clone()
    assert dpo_kernels.compute_dtype_biases(model) == 1
    assert quantised.bias.dtype == torch.bfloat16 and torch.equal(quantised.bias.float(), before.bfloat16().float())
    assert trained.bias.dtype == plain.bias.dtype == torch.float32


# ---------------------------------------------------------------- Axolotl's fused LoRA kernels (dpo_kernels.py)
def qwen2(**lora):
    """A tiny Qwen2 (the DPO recipes' family: q/k/v carry a bias) with LoRA on all seven projections, wrapped as
    TRL wraps it (PeftModelForCausalLM), A and B random so policy and reference differ."""
    torch.manual_seed(0)
    config = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lora = LoraConfig(**{"r": 4, "lora_alpha": 8, "init_lora_weights": False, "task_type": "CAUSAL_LM",
                         "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
                                            "down_proj"], **lora})
    return get_peft_model(Qwen2ForCausalLM(config), lora)


def policy_and_reference(t, inputs):
    """Loss, LoRA gradients (Loft's chunked path) and reference log-probs (TRL's own pass, adapter disabled)."""
    loss, grads, _ = run(t, dpo.LoftDPOTrainer._compute_loss, inputs)
    with torch.no_grad():
        ref = torch.cat(DPOTrainer.compute_ref_log_probs(t, t.model, inputs))
    return {"loss": loss, "reference": ref, **grads}


def differ(before, after):
    return [k for k in before if not torch.allclose(before[k], after[k], rtol=1e-5, atol=1e-7)]


def kernels_applied(t, inputs):
    """Run the unpatched model, apply the kernels, run again: (values before, values after, the printed note)."""
    before = policy_and_reference(t, inputs)
    note = dpo_kernels.apply(t)
    return before, policy_and_reference(t, inputs), note


def test_lora_kernels_keep_policy_gradients_and_reference_exact():
    """On CPU the QKV and O kernels run (the MLP one is Triton): same loss, same gradient of every LoRA weight, same
    adapter-disabled reference log-probs as PEFT's own layers, fp32. Axolotl's class patch does not leak."""
    attention_forward = Qwen2Attention.forward
    t = trainer(model=qwen2())
    before, after, note = kernels_applied(t, batch())
    assert dpo_kernels.applied(t.model) == ({"mlp": 0, "qkv": 2, "o": 2}, 2), note
    assert "QKV on 2/2 layers, O on 2/2 layers" in note and "CUDA only" in note
    assert len(before) == 2 + 2 * 2 * 7  # loss, reference, A and B of 7 projections in 2 layers
    assert differ(before, after) == []
    assert Qwen2Attention.forward is attention_forward  # other Qwen2 models in the process keep PEFT's path


def test_lora_kernels_check_catches_a_reference_with_the_adapter_on(monkeypatch):
    """The comparison above can fail: kernels that ignore a disabled adapter move the reference off the SFT model
    (the reference log-probs differ, and with them the loss that is measured against it)."""
    from axolotl.kernels import lora as kernels

    honest = kernels.get_lora_parameters

    def adapter_always_on(proj):
        disabled, proj._disable_adapters = proj._disable_adapters, False
        try:
            return honest(proj)
        finally:
            proj._disable_adapters = disabled

    monkeypatch.setattr(kernels, "get_lora_parameters", adapter_always_on)
    before, after, _ = kernels_applied(trainer(model=qwen2()), batch())
    assert {"reference", "loss"} <= set(differ(before, after))


def test_lora_kernels_applied_before_trls_precomputed_reference(monkeypatch):
    """With precompute_ref_log_probs TRL runs the reference pass inside its __init__: the kernels go on first."""
    t = trainer(precompute=True, model=qwen2())
    t.is_world_process_zero = lambda: False
    seen, apply = [], dpo_kernels.apply
    monkeypatch.setattr(dpo_kernels, "apply", lambda trainer: seen.append("apply") or apply(trainer))
    monkeypatch.setattr(DPOTrainer, "_precompute_ref_logps",
                        lambda self, *a: seen.append(dpo_kernels.applied(self.model)))
    dpo.LoftDPOTrainer._precompute_ref_logps(t, None, "train", 1)
    dpo.LoftDPOTrainer._lora_kernels(t)  # the call at the end of __init__: already done
    assert seen == ["apply", ({"mlp": 0, "qkv": 2, "o": 2}, 2)]


@pytest.mark.parametrize("case, why", [
    ("off", "LOFT_DPO_LORA_KERNELS=0"), ("dropout", "lora_dropout"), ("dora", "DoRA"), ("bias", "bias"),
    ("deepspeed", "DeepSpeed"), ("plain PeftModel", "not a PEFT causal LM"),
])
def test_lora_kernels_refused_where_unsafe(case, why, monkeypatch):
    lora = {"dropout": {"lora_dropout": 0.1}, "dora": {"use_dora": True}, "bias": {"bias": "lora_only"},
            "plain PeftModel": {"task_type": None}}.get(case, {})
    t = trainer(model=qwen2(**lora))
    if case == "off":
        monkeypatch.setenv(dpo_kernels.ENV, "0")
    t.is_deepspeed_enabled = case == "deepspeed"
    note = dpo_kernels.apply(t)
    assert note.startswith("no fused LoRA kernels") and why in note, note
    assert dpo_kernels.applied(t.model)[0] == {"mlp": 0, "qkv": 0, "o": 0}


def test_lora_kernels_per_device_and_base():
    """The MLP kernel is Triton (CUDA); Axolotl dequantises NF4 with CUDA calls; it refuses 8-bit bases."""
    assert dpo_kernels.kernels_for("cuda", "4bit", "silu") == ["mlp", "qkv", "o"]
    assert dpo_kernels.kernels_for("cuda", "plain", "gelu_pytorch_tanh") == ["mlp", "qkv", "o"]
    assert dpo_kernels.kernels_for("cuda", "4bit", "relu2") == ["qkv", "o"]
    assert dpo_kernels.kernels_for("cpu", "plain", "silu") == ["qkv", "o"]
    assert dpo_kernels.kernels_for("cpu", "4bit", "silu") == []
    assert dpo_kernels.kernels_for("cuda", "8bit", "silu") == []
