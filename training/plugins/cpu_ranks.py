"""`loft train --gpus N` on a machine without a GPU: N ranks on the CPU, talking gloo.

It exists so the multi-process launch (the same accelerate/torchrun path a GPU host takes) can be run and tested
on any laptop or CI box. Axolotl pins every rank of a multi-process run to `device_map {"": LOCAL_RANK}`, a CUDA
index, which a CPU-only torch cannot address; this plugin points each rank's model at the CPU instead. It acts
only where torch sees no CUDA device, and `loft train` lists it only then.
"""

from axolotl.integrations.base import BasePlugin


class CPURanksPlugin(BasePlugin):
    """`plugins: [training.plugins.cpu_ranks.CPURanksPlugin]`, added by `loft train --gpus N` when no GPU is visible."""

    def load_datasets(self, cfg, preprocess: bool = False):
        # Axolotl calls this first in its train command, after the config is normalised and before the model is
        # loaded: the one point where the rank's device map can still be changed. Returning None leaves the
        # datasets to Axolotl.
        import torch

        if not torch.cuda.is_available() and (cfg.world_size or 1) > 1:
            cfg.device_map = {"": "cpu"}
        return None
