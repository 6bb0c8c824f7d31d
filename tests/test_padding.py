"""The continued-padding lever: Axolotl's own collator and attention path, on CPU. A one-document row stops counting
as packed (so on a GPU it reaches plain causal SDPA, cuDNN, instead of the varlen FlashAttention-2 port), a row of
several documents stays packed, and the loss and every gradient stay what they were."""

from types import SimpleNamespace

import pytest
import torch
from axolotl.monkeypatch.attention.sdpa_varlen import _is_packed, patch_sdpa_varlen, unpatch_sdpa_varlen
from axolotl.utils.collators.batching import V2BatchSamplerDataCollatorForSeq2Seq
from transformers import AutoTokenizer, Qwen2Config, Qwen2ForCausalLM

from training.axolotl import word_tokenizer
from training.plugins.padding import ContinuedPadding, ContinuedPaddingPlugin, continue_padding_positions


def row(n: int, seed: int) -> dict:
    """One tokenized document as Axolotl's packed dataset holds it (no attention mask): loss on its second half."""
    ids = torch.randint(5, 60, (n,), generator=torch.Generator().manual_seed(seed)).tolist()
    return {"input_ids": ids, "labels": [-100] * (n // 2) + ids[n // 2:], "position_ids": list(range(n))}


@pytest.fixture(scope="module")
def collator():
    tokenizer = AutoTokenizer.from_pretrained(str(word_tokenizer()))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    return V2BatchSamplerDataCollatorForSeq2Seq(tokenizer=tokenizer, padding=True, pad_to_multiple_of=64,
                                                return_tensors="pt")


def test_one_document_rows_stop_counting_as_packed(collator):
    one = collator([[row(50, 0)], [row(61, 1)]])  # two rows, one document each, padded to 64
    assert _is_packed(one["position_ids"]), "Axolotl's padding restarts positions: counted as a second document"
    wrapped = ContinuedPadding(collator)([[row(50, 0)], [row(61, 1)]])
    assert not _is_packed(wrapped["position_ids"])
    assert wrapped["position_ids"][0].tolist() == list(range(64))
    assert wrapped["position_ids"][1].tolist() == list(range(64))
    assert torch.equal(wrapped["input_ids"], one["input_ids"]) and torch.equal(wrapped["labels"], one["labels"])

    two = ContinuedPadding(collator)([[row(20, 2), row(30, 3)]])  # two documents in one row, then padding
    assert _is_packed(two["position_ids"])
    assert two["position_ids"][0].tolist() == list(range(20)) + list(range(44))  # the second one, continued


def test_only_a_last_segment_with_nothing_to_learn_is_continued():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2]])
    silent = torch.tensor([[-100, 7, 8, -100, 9, -100, -100, -100]])
    got = continue_padding_positions({"position_ids": pos.clone(), "labels": silent})["position_ids"]
    assert got.tolist() == [[0, 1, 2, 0, 1, 2, 3, 4]]  # the first two documents keep their own positions
    learned = torch.tensor([[-100, 7, 8, -100, 9, -100, 3, -100]])  # the last document has a label: a document
    assert torch.equal(continue_padding_positions({"position_ids": pos.clone(), "labels": learned})["position_ids"],
                       pos)
    one = torch.tensor([[0, 1, 2, 3]])  # a single segment has nothing before it to continue
    assert torch.equal(continue_padding_positions({"position_ids": one.clone(),
                                                   "labels": torch.full((1, 4), -100)})["position_ids"], one)
    assert torch.equal(continue_padding_positions({"position_ids": pos.clone()})["position_ids"], pos)  # no labels


def loss_and_grads(model, batch):
    model.zero_grad()
    out = model(input_ids=batch["input_ids"], labels=batch["labels"], position_ids=batch["position_ids"])
    out.loss.backward()
    return out.loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_loss_and_gradients_unchanged_through_axolotls_attention(collator):
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(Qwen2Config(vocab_size=collator.tokenizer.vocab_size + 8, hidden_size=32,
                                         intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                                         num_key_value_heads=2, attn_implementation="sdpa"))
    features = [[row(50, 4)], [row(23, 5), row(27, 6)]]
    assert patch_sdpa_varlen()  # Axolotl's packed-row attention, as in training (CPU: its masked fallback)
    try:
        before, grads_before = loss_and_grads(model, collator(features))
        after, grads_after = loss_and_grads(model, ContinuedPadding(collator)(features))
    finally:
        unpatch_sdpa_varlen()
    torch.testing.assert_close(after, before, rtol=1e-6, atol=1e-6)
    assert grads_after.keys() == grads_before.keys() and grads_before
    for name, grad in grads_before.items():
        torch.testing.assert_close(grads_after[name], grad, rtol=1e-5, atol=1e-6, msg=name)


def test_plugin_wraps_the_training_collator_once():
    plugin, inner = ContinuedPaddingPlugin(), object()
    trainer = SimpleNamespace(data_collator=inner, train_data_collator=inner)
    plugin.post_trainer_create({"sample_packing": True}, trainer)
    plugin.post_trainer_create({"sample_packing": True}, trainer)
    assert isinstance(trainer.data_collator, ContinuedPadding) and trainer.data_collator.inner is inner
    assert trainer.train_data_collator is trainer.data_collator
    unpacked = SimpleNamespace(data_collator=inner, train_data_collator=inner)
    plugin.post_trainer_create({"sample_packing": False}, unpacked)
    assert unpacked.data_collator is inner
    with pytest.raises(ValueError, match="attn_implementation: sdpa"):
        plugin.pre_model_load({"attn_implementation": "eager"})
