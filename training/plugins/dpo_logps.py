"""Sequence log-probabilities for LoftDPOTrainer without the full-vocabulary logits: the LM head and log-softmax run
on completion tokens only, a chunk of a few hundred at a time, so one chunk's logits are alive at once.

Two ways to give the policy pass its gradient:
- the LM head frozen (LoRA, the recipes): each chunk's gradient with respect to its hidden states is worked out in
  the forward, while its logits are at hand (d log p(label) / d logits = one-hot - softmax, times the head's
  weight), and kept: [tokens, hidden] in the model's dtype, 29 MB for 4,096 Qwen2.5-7B tokens. The backward only
  scales it by each sequence's upstream gradient. Liger's fused linear cross-entropy does the same for a mean loss.
- the LM head trained (or its bias): each chunk under activation checkpointing, so the backward runs the LM head
  and log-softmax a second time and autograd gives the weight its gradient.
The first saves, per policy pass, one LM-head matmul over every completion token and one log-sum-exp over its
logits. tests/test_dpo.py checks both against TRL's own loss and gradients.
"""

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint


def _head(hidden, weight, bias, labels):
    """One chunk through the LM head: its fp32 logits [c, V], their log-sum-exp and log p(label)."""
    logits = F.linear(hidden, weight, bias).float()
    logz = torch.logsumexp(logits, dim=-1)
    return logits, logz, logits.gather(-1, labels[:, None]).squeeze(-1) - logz


def chunk_logps(hidden, weight, bias, labels, with_stats=True):
    """log p(label) for each row of hidden [c, h], with detached per-token stats for TRL's metrics (the reference
    pass logs none: with_stats=False skips them)."""
    logits, logz, logps = _head(hidden, weight, bias, labels)
    return logps, _stats(logits, logz, labels) if with_stats else logps.new_zeros(3, len(labels))


def _stats(logits, logz, labels):
    with torch.no_grad():
        entropy = logz - (torch.softmax(logits, dim=-1) * logits).sum(-1)
        return torch.stack([logits.mean(-1), entropy, (logits.argmax(-1) == labels).float()])


class FrozenHeadLogps(torch.autograd.Function):
    """Per-token log p(label) over chunks of states [N, h] through a frozen LM head, its gradient with respect to the
    states computed chunk by chunk in the forward (see the module's docstring)."""

    @staticmethod
    def forward(ctx, states, weight, bias, labels, chunk_tokens: int, with_stats: bool):
        logps = states.new_empty(len(labels), dtype=torch.float32)
        stats = states.new_zeros(3, len(labels), dtype=torch.float32)
        grad = torch.empty_like(states)
        for start in range(0, len(labels), chunk_tokens):
            rows = slice(start, start + chunk_tokens)
            h, y = states[rows], labels[rows]
            logits, logz, logps[rows] = _head(h, weight, bias, y)  # log p(label) stored into its rows
            if with_stats:
                stats[:, rows] = _stats(logits, logz, y)
            # in place, to hold no second chunk of logits: softmax, then one-hot minus softmax
            d_logits = logits.sub_(logz[:, None]).exp_().neg_()
            d_logits[torch.arange(len(y), device=y.device), y] += 1.0
            grad[rows] = d_logits.to(weight.dtype) @ weight
        ctx.save_for_backward(grad)
        ctx.mark_non_differentiable(stats)
        return logps, stats

    @staticmethod
    def backward(ctx, grad_logps, _grad_stats):
        (grad,) = ctx.saved_tensors
        return (grad.float() * grad_logps[:, None]).to(grad.dtype), None, None, None, None, None


def head_frozen(lm_head) -> bool:
    """No parameter of the LM head trains: its gradient with respect to the states can be taken in the forward."""
    return not any(p.requires_grad for p in lm_head.parameters())


def completion_logps(hidden, lm_head, input_ids, completion_mask, chunk_tokens: int, with_stats: bool = True):
    """Per-sequence sum of completion-token log-probs, and per-token stats [3, M] (logit mean, entropy, argmax hit)
    with the row of each of the M completion tokens. hidden: the decoder's last hidden state [R, T, h]."""
    mask = completion_mask[:, 1:].bool()  # position t predicts token t + 1
    rows = mask.nonzero(as_tuple=True)[0]
    states, labels = hidden[:, :-1][mask], input_ids[:, 1:][mask]
    if torch.is_grad_enabled() and states.requires_grad and head_frozen(lm_head):
        token_logps, stats = FrozenHeadLogps.apply(states, lm_head.weight, lm_head.bias, labels, chunk_tokens,
                                                   with_stats)
    else:
        pieces, chunks = [], []
        for start in range(0, len(labels), chunk_tokens):
            args = (states[start:start + chunk_tokens], lm_head.weight, lm_head.bias,
                    labels[start:start + chunk_tokens], with_stats)
            if torch.is_grad_enabled():
                logps, stat = checkpoint(chunk_logps, *args, use_reentrant=False)
            else:
                logps, stat = chunk_logps(*args)
            pieces.append(logps)
            chunks.append(stat)
        token_logps = torch.cat(pieces) if pieces else states.new_zeros(0, dtype=torch.float32)
        stats = torch.cat(chunks, dim=1) if chunks else token_logps.new_zeros(3, 0)
    seq = torch.zeros(hidden.shape[0], dtype=torch.float32, device=hidden.device).index_add(0, rows, token_logps)
    return seq, stats, rows
