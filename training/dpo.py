"""Axolotl's DPO trainer without its per-micro-batch cleanup, for `trainer_cls: training.dpo.LoftDPOTrainer`.

Axolotl 0.19's AxolotlDPOTrainer.training_step (axolotl/core/trainers/dpo/trainer.py) runs `gc.collect()` and
`torch.cuda.empty_cache()` after every micro-batch. With the Axolotl stack imported a full collection takes ~1 s
(663K objects on the dev machine), and emptying the cache makes the next micro-batch allocate everything again:
on a tiny model Axolotl's DPO took 5.4-8.9 s per step against TRL's 2.1-2.8 s for the same 8 micro-batches
(benchmarks/RESULTS.md, target 3). This subclass goes straight to TRL's step, as a hand-written DPOTrainer does.

`trainer_cls` is Axolotl's own key, so it works under plain `accelerate launch -m axolotl.cli.train`. The cache is
then never emptied between micro-batches: on a card with no headroom, reserved memory can sit higher than with
Axolotl's trainer. Not yet measured on a GPU (benchmarks/gpu/targets-next.sh).
"""

from axolotl.core.trainers.dpo.trainer import AxolotlDPOTrainer


class LoftDPOTrainer(AxolotlDPOTrainer):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        if self.is_world_process_zero():
            print("loft: LoftDPOTrainer, no gc.collect()/empty_cache() after each micro-batch", flush=True)

    def training_step(self, model, inputs, num_items_in_batch=None):
        # the next class after AxolotlDPOTrainer in the MRO: its mixins, then TRL's DPOTrainer
        return super(AxolotlDPOTrainer, self).training_step(model, inputs, num_items_in_batch)
