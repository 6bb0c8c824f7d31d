"""training/plugins/lean.py against transformers' own Trainer: the same weights, losses and FLOPs count after a few
steps with and without it, on a tiny random Llama with LoRA; a NaN loss reaches the log instead of being averaged
away; and the walks it saves are really gone (counted)."""

import math

import pytest
import torch
from peft import LoraConfig, get_peft_model
from torch.utils.data import Dataset
from transformers import LlamaConfig, LlamaForCausalLM, Trainer, TrainerCallback, TrainingArguments

from training.plugins.lean import make_lean


class Rows(Dataset):
    def __init__(self, n=16, length=24, vocab=200):
        g = torch.Generator().manual_seed(0)
        self.ids = torch.randint(1, vocab, (n, length), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


class Losses(TrainerCallback):
    def __init__(self):
        self.losses = []

    def on_log(self, args, state, control, logs=None, **kwargs):
        if logs and "loss" in logs:
            self.losses.append(logs["loss"])


def counted_calls(monkeypatch, owner, name) -> dict:
    """owner.name replaced, until the test ends, by a wrapper that counts its calls in the returned {"n": ...}."""
    calls = {"n": 0}
    stock = getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls["n"] += 1
        return stock(*args, **kwargs)
    monkeypatch.setattr(owner, name, wrapper)
    return calls


def train(tmp_path, lean: bool, steps=4, accum=2, poison=None):
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=200, hidden_size=32, intermediate_size=64, num_hidden_layers=3,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    model = get_peft_model(LlamaForCausalLM(config), LoraConfig(
        r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path / ("lean" if lean else "stock")), max_steps=steps,
                             per_device_train_batch_size=2, gradient_accumulation_steps=accum, learning_rate=1e-2,
                             logging_steps=1, save_strategy="no", report_to=[], use_cpu=True, seed=0,
                             max_grad_norm=0.5, dataloader_num_workers=0)
    log = Losses()
    trainer = Trainer(model=model, args=args, train_dataset=Rows(), callbacks=[log])
    if poison is not None:  # one micro-batch's loss becomes NaN (its gradients too: the optimizer skips nothing)
        stock = trainer.compute_loss

        def compute_loss(model, inputs, **kw):
            loss = stock(model, inputs, **kw)
            trainer._calls = getattr(trainer, "_calls", 0) + 1
            return loss * float("nan") if trainer._calls == poison else loss
        trainer.compute_loss = compute_loss
    walks = {"n": 0}
    stock_parameters = model.parameters

    def counted(*a, **kw):  # every walk over the whole model
        walks["n"] += 1
        return stock_parameters(*a, **kw)
    model.parameters = counted
    if lean:
        make_lean(trainer)
    trainer.train()
    weights = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    return weights, log.losses, trainer.state.total_flos, walks["n"], model


def test_lean_step_trains_exactly_as_the_stock_trainer_with_fewer_model_walks(tmp_path):
    stock_w, stock_losses, stock_flos, stock_walks, _ = train(tmp_path, lean=False)
    lean_w, lean_losses, lean_flos, lean_walks, model = train(tmp_path, lean=True)
    assert stock_losses == lean_losses and len(lean_losses) == 4
    assert stock_w.keys() == lean_w.keys() and all(torch.equal(stock_w[k], lean_w[k]) for k in stock_w)
    assert lean_flos == stock_flos > 0
    assert all(p.grad is None for p in model.base_model.parameters())  # zeroed after the last step
    # stock: a walk per clip and per zero_grad each step (+ the count's own); lean: the first listing only
    assert stock_walks >= 2 * 4 and lean_walks < stock_walks - 4


def test_a_nan_loss_reaches_the_log_instead_of_the_running_average(tmp_path):
    _, stock_losses, *_ = train(tmp_path, lean=False, poison=3)
    _, lean_losses, *_ = train(tmp_path, lean=True, poison=3)
    assert all(math.isfinite(x) for x in stock_losses)  # transformers' filter hid it
    assert math.isnan(lean_losses[1])  # step 2 holds micro-batches 3 and 4


def test_where_the_trainable_set_changes_only_the_count_is_cached(tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(vocab=50))
    applied = make_lean(trainer, trainable_set_changes=True)
    assert "zero_grad" not in vars(model) and "_clip_grad_norm" not in vars(trainer)
    assert len(applied) == 3 and trainer.args.logging_nan_inf_filter is False


def test_train_mode_and_unwrapped_model_are_kept_between_steps_and_evaluation_still_switches(tmp_path):
    torch.manual_seed(0)
    model = get_peft_model(LlamaForCausalLM(LlamaConfig(
        vocab_size=50, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1)), LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, report_to=[], use_cpu=True)
    trainer = Trainer(model=model, args=args, train_dataset=Rows(vocab=50))
    make_lean(trainer)
    leaf = model.base_model.model.model.layers[1].mlp.down_proj
    calls = {"n": 0}
    stock_leaf_train = leaf.train

    def counted(mode=True):
        calls["n"] += 1
        return stock_leaf_train(mode)
    leaf.train = counted
    model.train()
    first = calls["n"]
    for _ in range(3):  # the Trainer's call at each micro-batch: no walk down to the leaf while all is training
        assert model.train() is model
    assert calls["n"] == first
    model.eval()  # evaluation switches every module, and the next train() switches them all back
    assert not leaf.training and not any(m.training for m in model.modules())
    model.train()
    assert all(m.training for m in model.modules()) and calls["n"] == first + 2
    leaf.eval()  # one module switched on its own: the next train() is the full walk again
    model.train()
    assert leaf.training

    import accelerate.utils.other as other
    with pytest.MonkeyPatch.context() as mp:
        looked = counted_calls(mp, other, "has_compiled_regions")
        outs = [trainer.accelerator.unwrap_model(model) for _ in range(3)]
    assert all(o is model for o in outs) and looked["n"] == 1


def test_axolotl_attention_router_reads_a_batch_s_documents_once_not_once_per_layer(monkeypatch):
    """Axolotl's real SDPA router on a tiny Llama forward with packed position ids: its document count (a host
    sync on a GPU) runs once per forward pass instead of once per layer; the logits are the same."""
    from axolotl.monkeypatch.attention import sdpa_varlen

    from training.plugins.lean import PREPARE, route_once
    counted = counted_calls(monkeypatch, sdpa_varlen, "_is_packed")
    assert sdpa_varlen.patch_sdpa_varlen()
    try:
        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=4,
                             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
        model = LlamaForCausalLM(config).eval()
        model.config._attn_implementation = "sdpa"
        ids = torch.randint(0, 64, (1, 24))
        pos = torch.cat([torch.arange(10), torch.arange(14)])[None]  # two documents in one row
        with torch.no_grad():
            stock_logits = model(input_ids=ids, position_ids=pos).logits
            assert counted["n"] == 4  # one sync per layer
            assert "documents per row read once per batch" in route_once()
            assert route_once()  # idempotent: nothing wrapped twice
            counted["n"] = 0
            once = model(input_ids=ids, position_ids=pos).logits
            assert counted["n"] == 1 and torch.equal(stock_logits, once)
            model(input_ids=ids, position_ids=pos.clone())  # a new batch's tensor: asked again
            assert counted["n"] == 2
            pos2 = pos.clone()
            model(input_ids=ids, position_ids=pos2)
            pos2[0, 12] = 0  # written in place: asked again
            model(input_ids=ids, position_ids=pos2)
            assert counted["n"] == 4
        # the router's starts-and-lengths helper (FlashAttention path, CUDA only) now answers with int lengths
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        wrapper = ALL_ATTENTION_FUNCTIONS["sdpa"]
        prepare = wrapper.__closure__[wrapper.__code__.co_freevars.index(PREPARE)].cell_contents
        (cu_q, _), (max_q, max_k) = prepare(pos)
        assert cu_q.tolist() == [0, 10, 24] and (max_q, max_k) == (14, 14) and isinstance(max_q, int)
        assert prepare(pos) is prepare(pos)
    finally:
        sdpa_varlen.unpatch_sdpa_varlen()


def test_a_lever_that_fails_says_so_in_one_line_and_never_raises(capsys):
    """training.plugins.lever, the wrapper of every speed and memory lever: what it did, nothing, or why not."""
    from training.plugins import lever

    assert lever("x", lambda: ["a", "b"], "; ".join) == ["a", "b"]
    assert capsys.readouterr().out == "loft x: a; b\n"
    assert lever("x", lambda: []) == [] and capsys.readouterr().out == ""
    assert lever("x", lambda: 1 / 0, failed="left as it is") is None
    assert capsys.readouterr().out == "loft x: left as it is (ZeroDivisionError: division by zero)\n"
