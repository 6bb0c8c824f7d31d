"""The process launch behind `loft train`: one process, N GPUs on this host, or N GPUs on each of several hosts.

accelerate only starts the processes (torchrun underneath); the recipe's own Axolotl keys choose how they share
the work, exactly as under a plain `accelerate launch --num_processes N -m axolotl.cli.train RECIPE`:

    no deepspeed: / fsdp_config:   DDP: every rank holds the whole model, gradients are averaged
    deepspeed: recipes/deepspeed/zero2.json, zero3.json, zero3-offload.json    DeepSpeed ZeRO
    fsdp_version: 2 + fsdp_config:  PyTorch FSDP2

Axolotl turns those keys into accelerate's settings inside each rank (ACCELERATE_USE_DEEPSPEED / _FSDP), so the
launch line is the same for all three. Several hosts: the same command on each, differing only in --node-rank
(recipes/README.md, "More than one GPU").
"""

import os
import sys
from dataclasses import dataclass

from training.errors import LoftError
from training.paths import private_env

DEFAULT_PORT = 29500


@dataclass
class Topology:
    gpus: int = 1  # processes (GPUs) per host
    nodes: int = 1
    node_rank: int = 0
    master_addr: str | None = None
    master_port: int | None = None

    @property
    def world(self) -> int:
        return self.gpus * self.nodes

    def check(self) -> None:
        if self.gpus < 1 or self.nodes < 1:
            raise LoftError(f"--gpus and --nodes must be at least 1 (got --gpus {self.gpus} --nodes {self.nodes})")
        if self.nodes > 1:
            if not self.master_addr:
                raise LoftError(f"--nodes {self.nodes} needs --master-addr: the address of the node with --node-rank 0, "
                                "reachable from every node (e.g. --master-addr 10.0.0.1)")
            if not 0 <= self.node_rank < self.nodes:
                raise LoftError(f"--node-rank {self.node_rank} is outside 0..{self.nodes - 1}: number the hosts "
                                f"0 to {self.nodes - 1}, 0 on the --master-addr host")
        elif self.node_rank or self.master_addr:
            raise LoftError("--node-rank and --master-addr only mean something with --nodes 2 or more")


def command(resolved, topo: Topology | None = None) -> list[str]:
    """The accelerate command that trains `resolved` (a recipe file) with this topology."""
    topo = topo or Topology()
    cmd = [sys.executable, "-m", "accelerate.commands.launch"]
    if topo.world > 1:
        # --multi_gpu is accelerate's name for "start torchrun": also on a CPU-only machine, where the ranks talk gloo
        cmd += ["--multi_gpu", "--num_processes", str(topo.world), "--num_machines", str(topo.nodes)]
        if topo.nodes > 1:
            cmd += ["--machine_rank", str(topo.node_rank), "--main_process_ip", topo.master_addr,
                    "--main_process_port", str(topo.master_port or DEFAULT_PORT)]
        else:  # 0: a free port, so two runs on one host do not collide on torchrun's default
            cmd += ["--main_process_port", str(topo.master_port or 0)]
    return cmd + ["-m", "axolotl.cli.train", str(resolved)]


def environment(topo: Topology | None = None) -> dict:
    """The launch environment: all CPU threads shared between this host's ranks (accelerate defaults a non-CPU
    launch to one OpenMP thread per process), and CPU ranks on gloo where no GPU is visible."""
    topo = topo or Topology()
    # Private even when called from Python rather than through `loft`, which sets these for its own process.
    env = private_env(dict(os.environ))
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // topo.gpus)))
    if topo.world > 1 and visible_gpus() == 0:
        # without it the Trainer of each rank sees no GPU, finds no distributed setup it knows and trains alone
        env.setdefault("ACCELERATE_USE_CPU", "true")
        # accelerate would name each CPU rank's device "cpu:0", a location torch.load cannot map to: resuming, the
        # Trainer loads the optimizer state onto the rank's device and fails. Every CPU rank is plain "cpu".
        env.setdefault("ACCELERATE_TORCH_DEVICE", "cpu")
    env.update(allocator_env(env))
    return env


# Where a user has set any of these, the allocator is theirs.
ALLOCATOR_KEYS = ("PYTORCH_ALLOC_CONF", "PYTORCH_CUDA_ALLOC_CONF")


def allocator_env(env: dict, proc_version: str | None = None) -> dict:
    """PyTorch's caching allocator with expandable segments: a block grows in place instead of a new, differently
    sized one being cut, so the memory reserved from the card stays near what tensors hold. Unsloth sets the same on
    import (unsloth_zoo/__init__.py, 2026.10.9); on the same H200 runs, Loft without it reserved 0.4-1.4 GiB more
    than it allocated, Unsloth 0.1-0.5 (benchmarks/results/vs-peers-2026-11-30.json). Not under WSL, where the CUDA
    virtual-memory calls behind it fail ("CUDA driver error: unknown error", unslothai/unsloth#3511)."""
    if any(key in env for key in ALLOCATOR_KEYS):
        return {}
    if proc_version is None:
        try:
            proc_version = open("/proc/version").read()
        except OSError:
            proc_version = ""
    if "microsoft" in proc_version.lower() or env.get("WSL_DISTRO_NAME") or env.get("WSL_INTEROP"):
        return {}
    return {"PYTORCH_ALLOC_CONF": "expandable_segments:True"}


def visible_gpus() -> int:
    """CUDA devices this process can see (0 on a CPU-only build or machine)."""
    try:
        import torch

        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


def check_devices(topo: Topology, visible: int | None = None) -> str | None:
    """Refuse more ranks per host than visible GPUs; on a machine without any, ranks run on the CPU (gloo): say so."""
    visible = visible_gpus() if visible is None else visible
    if topo.gpus > 1 and 0 < visible < topo.gpus:
        raise LoftError(f"--gpus {topo.gpus} but this host sees {visible} GPU(s) (CUDA_VISIBLE_DEVICES="
                        f"{os.environ.get('CUDA_VISIBLE_DEVICES', 'unset')}); use --gpus {visible} or free the others")
    if topo.gpus > 1 and visible == 0:
        return (f"no GPU visible: {topo.gpus} CPU processes on gloo instead (checks the multi-process launch; "
                "training on CPU is slow)")
    return None
