"""training/plugins/dpo.py's chunked log-probs against TRL's own DPO loss: same loss, same gradients, same metrics.

TRL 1.9's DPOTrainer._compute_loss is the oracle: both methods run on one trainer object (a tiny random Llama with
a LoRA adapter, the reference = adapter disabled), on the same padded batch of prompt + completion pairs.
"""

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch

pytest.importorskip("axolotl")

from accelerate import Accelerator  # noqa: E402
from peft import LoraConfig, get_peft_model  # noqa: E402
from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402
from trl import DPOTrainer  # noqa: E402

from training.plugins import dpo  # noqa: E402

VOCAB = 300


def trainer(loss_types=("sigmoid",), precompute=False):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "up_proj"], init_lora_weights=False)
    model = get_peft_model(LlamaForCausalLM(config), lora)  # random B: policy and reference differ
    t = object.__new__(dpo.LoftDPOTrainer)
    t.__dict__.update(
        accelerator=Accelerator(cpu=True), model=model, ref_model=None, beta=0.1, loss_types=list(loss_types),
        loss_weights=[1.0] * len(loss_types), label_smoothing=0.1 if "robust" in loss_types else 0.0, ld_alpha=None,
        use_weighting=False, aux_loss_enabled=False, f_divergence_type="reverse_kl", use_liger_kernel=False,
        _is_vlm=False, precompute_ref_logps=precompute, args=SimpleNamespace(gradient_checkpointing_kwargs=None),
        _metrics={"train": defaultdict(list), "eval": defaultdict(list)}, _total_train_tokens=0)
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
