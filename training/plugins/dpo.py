"""Loft's DPO trainer, for `trainer_cls: training.plugins.dpo.LoftDPOTrainer` (Axolotl's own key, so it also works under
plain `accelerate launch -m axolotl.cli.train`). Five changes to Axolotl 0.19's AxolotlDPOTrainer:

1. No `gc.collect()` + `torch.cuda.empty_cache()` after every micro-batch (AxolotlDPOTrainer.training_step,
   axolotl/core/trainers/dpo/trainer.py). With the Axolotl stack imported a full collection takes ~1 s, and emptying
   the cache makes the next micro-batch allocate everything again: on a tiny model Axolotl's DPO took 5.4-8.9 s per
   step against TRL's 2.1-2.8 s for the same 8 micro-batches (benchmarks/RESULTS.md, DPO QLoRA at 2,048 tokens).

2. Sequence log-probabilities without the full-vocabulary logits. TRL's DPOTrainer._compute_loss runs the LM head
   on every position of chosen and rejected (2 x 2,048 x 152,064 logits for Qwen at 2,048 tokens: 1.16 GiB in bf16,
   plus the log-softmax and its gradient), and Liger's fused DPO loss still takes one whole pair per chunk. Here the
   decoder's hidden states are gathered at the completion tokens only (the prompt's logits are never used), and the
   LM head + log-softmax run in chunks of a few hundred tokens: one chunk's logits are alive at a time, in training
   and in the reference pass; with the LM head frozen, each chunk's gradient is worked out in the forward, so the
   backward does not run the LM head again (training/plugins/dpo_logps.py). The loss and the logged metrics are
   TRL's (same names); tests/test_dpo.py checks loss and gradients against TRL's own path.

3. Axolotl's fused LoRA kernels (MLP, QKV, O), applied once TRL has wrapped the model in PEFT, before its
   precomputed reference pass: training/plugins/dpo_kernels.py says why Axolotl's loader cannot, and when they apply
   (and why it casts the frozen 4-bit biases to bf16 for them).

4. No padding mask on TRL's right-padded pairs (see _logps): SDPA runs causal, which on Hopper is cuDNN's fused
   kernel, instead of a masked kernel on K/V copied out to every head (one H200, 2026-11-30: 0.94× Unsloth with it
   and the lean step, 0.78× before; benchmarks/RESULTS.md, fourth round).

5. The reference pass switches the model to its base by the layers' own flags (_base_model_pass), not through
   TRL's use_adapter + disable_gradient_checkpointing, which walk the model each micro-batch while the GPU waits; and
   with `activation_offloading: hidden_states` only Axolotl's offloader runs, not TRL's offload-everything one
   inside it (one H200, 2026-12-01: 0.99× Unsloth, from 0.94×; benchmarks/RESULTS.md, fifth round). With the LM
   head's gradient taken in the forward (2.) and Qwen's q/k/v biases in bf16 for the kernels (3.): 1.04× (sixth round).

Configurations the chunked log-probs do not cover (other loss types, ld_alpha, WPO weighting, MoE aux loss, an
f-divergence other than reverse KL, a separate reference model, a LoRA on lm_head, vision models, a wrapped model
under DDP/FSDP) go through TRL's code unchanged.
"""

import os
from contextlib import ExitStack, contextmanager, nullcontext
from functools import cached_property

import torch
import torch.nn.functional as F
from accelerate.utils import is_peft_model
from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer
from axolotl.core.trainers.mixins.activation_checkpointing import ActivationOffloadingMixin
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers.modeling_layers import GradientCheckpointingLayer
from trl.models.utils import disable_gradient_checkpointing
from trl.trainer.dpo_trainer import DataCollatorForPreference
from trl.trainer.utils import use_adapter

# fp32 logits of one chunk: the memory estimator counts the same size
from training.checks.memory import DPO_CHUNK_BYTES as CHUNK_LOGIT_BYTES
from training.plugins import dpo_kernels
from training.plugins.dpo_logps import completion_logps, head_frozen
from training.plugins.lean import sharded

CHUNKED_LOSSES = {"sigmoid", "hinge", "ipo", "robust"}
# 1: keep TRL's own offloader beside Axolotl's hidden_states one (the trainer as measured before they were untangled)
TRL_OFFLOADER_ENV = "LOFT_DPO_TRL_OFFLOADER"


class LoftDPOTrainer(ActivationOffloadingMixin, AxolotlDPOTrainer):
    """ActivationOffloadingMixin is Axolotl's own, the one its SFT trainers carry: AxolotlDPOTrainer has none, so a
    recipe's `activation_offloading` (e.g. hidden_states: the checkpointed layer inputs in CPU RAM) did nothing
    for DPO. training_step below enters its context."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)  # with precompute_ref_log_probs, TRL runs compute_ref_log_probs in here
        self._lora_kernels()
        if self.args.activation_offloading == "hidden_states" and os.environ.get(TRL_OFFLOADER_ENV) != "1":
            # Axolotl passes the mode on to TRL's arguments, and TRL's DPOTrainer then wraps every step in its own
            # offloader as well, which moves every saved activation to CPU RAM (the mode that replaces
            # recomputation), nested inside the mixin's: "hidden_states" means the checkpointed inputs only
            self.maybe_activation_offload_context = nullcontext()
        if self.is_world_process_zero():
            how = (f"LM head in chunks of {self._chunk_tokens()} completion tokens"
                   f"{', its gradient taken in the forward' if head_frozen(self._parts()[2]) else ''}" if self._chunked
                   else "TRL's log-probs (configuration not covered by the chunked path)")
            print(f"loft: LoftDPOTrainer, no gc.collect()/empty_cache() per micro-batch; {how}", flush=True)

    def _lora_kernels(self):
        """Once, as soon as TRL has wrapped the model: the first call may come from TRL's __init__ (precompute)."""
        if "_lora_kernels_note" not in self.__dict__:
            self._lora_kernels_note = dpo_kernels.apply(self)
            if self.is_world_process_zero():
                print(f"loft: LoftDPOTrainer, {self._lora_kernels_note}", flush=True)

    def _precompute_ref_logps(self, dataset, name, batch_size):
        self._lora_kernels()  # so the reference pass before step 1 runs the kernels too
        return super()._precompute_ref_logps(dataset, name, batch_size)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the next class after AxolotlDPOTrainer in the MRO: its mixins, then TRL's DPOTrainer; inside the
        # activation-offloading context (a null one unless the recipe sets activation_offloading)
        with getattr(self, "activation_offload_context", None) or nullcontext():
            return super(AxolotlDPOTrainer, self).training_step(model, inputs, num_items_in_batch)

    # ------------------------------------------------------------ chunked log-probs
    def _parts(self):
        """(causal LM, its decoder, lm_head) of the unwrapped model; found once (unwrap_model walks every module, and
        this is asked several times a micro-batch; the wrappers do not change once training runs)."""
        if "_parts_found" not in self.__dict__:
            unwrapped = self.accelerator.unwrap_model(self.model)
            causal = unwrapped.base_model.model if is_peft_model(unwrapped) else unwrapped
            self._parts_found = (unwrapped, causal.base_model, causal.get_output_embeddings())
        return self._parts_found

    def _toggles(self):
        """(every LoRA layer, every checkpointed decoder layer) of the unwrapped model, found once."""
        if "_toggles_found" not in self.__dict__:
            modules = list(self._parts()[0].modules())
            self._toggles_found = ([m for m in modules if isinstance(m, BaseTunerLayer)],
                                   [m for m in modules if isinstance(m, GradientCheckpointingLayer)])
        return self._toggles_found

    @contextmanager
    def _base_model_pass(self):
        """The reference pass's model: every LoRA layer off and no checkpointing (under no_grad it would only re-run
        work), as TRL's use_adapter(None) and disable_gradient_checkpointing leave it, set on the layers directly.
        Those two walk the model and back: PEFT asks every module for its adapter status, then toggles each adapter
        parameter's requires_grad, and transformers re-enables checkpointing module by module. In a profiled Qwen2.5-7B
        DPO step (one H200, 2026-12-01) that was ~38 ms of host time per micro-batch with the GPU idle, 7% of the
        step; the flags themselves are all the forward reads."""
        lora, checkpointed = self._toggles()
        adapters_off = [m._disable_adapters for m in lora]
        checkpointing = [m.gradient_checkpointing for m in checkpointed]
        try:
            for m in lora:
                m._disable_adapters = True
            for m in checkpointed:
                m.gradient_checkpointing = False
            yield
        finally:
            for m, off in zip(lora, adapters_off):
                m._disable_adapters = off
            for m, on in zip(checkpointed, checkpointing):
                m.gradient_checkpointing = on

    @cached_property
    def _right_padded(self) -> bool:
        """TRL's preference collator pads every row on the right (padding_side="right", trl 1.9
        DataCollatorForPreference): then the padding mask can go, see _logps."""
        return isinstance(getattr(self, "data_collator", None), DataCollatorForPreference)

    @cached_property
    def _chunked(self) -> bool:  # first read may come from TRL's __init__ (precompute), so not set in ours
        if self.use_liger_kernel or self._is_vlm or self.ld_alpha is not None or self.use_weighting:
            return False
        if sharded(self):
            return False  # sharded lm_head / wrapped forward: TRL's path handles those
        if self.aux_loss_enabled or str(self.f_divergence_type).split(".")[-1].lower() != "reverse_kl":
            return False
        if not set(self.loss_types) <= CHUNKED_LOSSES or (self.ref_model is not None and not self.precompute_ref_logps):
            return False
        unwrapped, _, lm_head = self._parts()
        if not isinstance(lm_head, torch.nn.Linear) or hasattr(lm_head, "lora_A"):
            return False
        return is_peft_model(unwrapped) or self.precompute_ref_logps

    def _chunk_tokens(self) -> int:
        vocab = self._parts()[2].weight.shape[0]
        return max(16, CHUNK_LOGIT_BYTES // (vocab * 4))

    def _logps(self, inputs, reference: bool):
        unwrapped, decoder, lm_head = self._parts()
        kwargs = {k: v for k, v in inputs.items() if k not in ("completion_mask", "ref_chosen_logps", "ref_rejected_logps")}
        kwargs["use_cache"] = False
        if self._right_padded:
            # Under causal attention no real token attends to the padding after it, the positions are 0, 1, 2, ...
            # either way, and padded positions carry no completion label: without the mask every log-prob is the
            # same, and SDPA runs causal (cuDNN's fused kernel on Hopper) instead of a masked kernel on K/V copied
            # out to every query head.
            kwargs.pop("attention_mask", None)
        with ExitStack() as stack:
            if reference:  # no graph, and the adapter disabled (or the frozen "ref" adapter) for the whole pass
                ref = "ref" if "ref" in getattr(unwrapped, "peft_config", {}) else None
                stack.enter_context(torch.no_grad())
                if is_peft_model(unwrapped) and ref is None:
                    stack.enter_context(self._base_model_pass())
                else:
                    stack.enter_context(disable_gradient_checkpointing(self.model,
                                                                       self.args.gradient_checkpointing_kwargs))
                    if is_peft_model(unwrapped):
                        stack.enter_context(use_adapter(unwrapped, adapter_name=ref))
            hidden = decoder(**kwargs).last_hidden_state
            return completion_logps(hidden, lm_head, inputs["input_ids"], inputs["completion_mask"],
                                    self._chunk_tokens(), with_stats=not reference)

    def compute_ref_log_probs(self, model, inputs):
        if not self._chunked:
            return super().compute_ref_log_probs(model, inputs)
        return self._logps(inputs, reference=True)[0].chunk(2, dim=0)

    def _compute_loss(self, model, inputs, return_outputs):
        if not self._chunked or return_outputs or model is not self.accelerator.unwrap_model(model):
            return super()._compute_loss(model, inputs, return_outputs)
        mode = "train" if self.model.training else "eval"
        logps, stats, rows = self._logps(inputs, reference=False)
        chosen_logps, rejected_logps = logps.chunk(2, dim=0)
        if self.precompute_ref_logps:
            ref_chosen, ref_rejected = inputs["ref_chosen_logps"], inputs["ref_rejected_logps"]
        else:
            ref_chosen, ref_rejected = self._logps(inputs, reference=True)[0].chunk(2, dim=0)
        chosen_ratio, rejected_ratio = chosen_logps - ref_chosen, rejected_logps - ref_rejected
        delta = chosen_ratio - rejected_ratio

        # TRL 1.9 DPOTrainer._compute_loss, for the loss types in CHUNKED_LOSSES
        loss = 0.0
        for loss_type, weight in zip(self.loss_types, self.loss_weights, strict=True):
            if loss_type == "sigmoid":
                per_pair = -F.logsigmoid(self.beta * delta)
            elif loss_type == "hinge":
                per_pair = torch.relu(1 - self.beta * delta)
            elif loss_type == "ipo":
                chosen_mask, rejected_mask = inputs["completion_mask"].chunk(2, dim=0)
                ipo = chosen_ratio / chosen_mask.sum(1).clamp(min=1.0) - rejected_ratio / rejected_mask.sum(1).clamp(min=1.0)
                per_pair = (ipo - 1 / (2 * self.beta)) ** 2
            else:  # robust
                per_pair = (-(1 - self.label_smoothing) * F.logsigmoid(self.beta * delta)
                            + self.label_smoothing * F.logsigmoid(-self.beta * delta)) / (1 - 2 * self.label_smoothing)
            loss += per_pair.mean() * weight

        self._log_metrics(mode, inputs, stats, rows, len(logps) // 2, chosen_logps, rejected_logps,
                          self.beta * chosen_ratio.detach(), self.beta * rejected_ratio.detach())
        return loss

    def _log_metrics(self, mode, inputs, stats, rows, n_pairs, chosen_logps, rejected_logps, chosen_r, rejected_r):
        def total(t):
            return self.accelerator.gather_for_metrics(t).sum()

        chosen = rows < n_pairs  # the batch is [chosen..., rejected...]
        n_chosen, n_rejected = total(chosen.sum()), total((~chosen).sum())
        metrics = self._metrics[mode]
        metrics["entropy"].append((total(stats[1].sum()) / max(n_chosen + n_rejected, 1)).item())
        if mode == "train":
            self._total_train_tokens += total(inputs["attention_mask"].sum()).item()
        metrics["num_tokens"] = [self._total_train_tokens]
        metrics["logits/chosen"].append((total(stats[0][chosen].sum()) / max(n_chosen, 1)).item())
        metrics["logits/rejected"].append((total(stats[0][~chosen].sum()) / max(n_rejected, 1)).item())
        metrics["mean_token_accuracy"].append((total(stats[2][chosen].sum()) / max(n_chosen, 1)).item())
        metrics["rewards/chosen"].append(self.accelerator.gather(chosen_r).mean().item())
        metrics["rewards/rejected"].append(self.accelerator.gather(rejected_r).mean().item())
        metrics["rewards/accuracies"].append(self.accelerator.gather((chosen_r > rejected_r).float()).mean().item())
        metrics["rewards/margins"].append(self.accelerator.gather(chosen_r - rejected_r).mean().item())
        metrics["logps/chosen"].append(self.accelerator.gather(chosen_logps.detach()).mean().item())
        metrics["logps/rejected"].append(self.accelerator.gather(rejected_logps.detach()).mean().item())
