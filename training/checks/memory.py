"""Peak GPU memory of a recipe, from arithmetic on its architecture: no GPU, no weights, no torch import.

    peak allocated = weights (at their precision)
                   + trainable state (LoRA or full: fp32 params, grads, optimizer states)
                   + activations (per token: checkpointed layer inputs + one layer's working set)
                   + logits (tokens × vocab × bytes, or tokens × hidden with a fused cross-entropy)
                   + fixed workspace (cuBLAS, misc)
                   + a second copy of the weights when DPO loads a separate reference model
    needed         = peak allocated × (1 + allocator slack) + CUDA context

The per-token and logits constants are fitted to peaks measured on an H100: benchmarks/calibration.py holds the
evidence (the shared/gpu-host README's points, `loft doctor --measure` runs and recipe runs committed in
benchmarks/results/), and `python -m benchmarks.calibration` prints estimate vs measured (benchmarks/MEMORY.md).
Architectures come from training/arch.py (training/archs/*.json or the base model's local config.json).
"""

import math
import re
from dataclasses import dataclass, field

from training.arch import Arch, find_arch
from training.parallel import option, per_gpu, strategy
from training.recipe import RecipeFacts

GIB = 1024**3

# Usable memory as the driver reports it (nvidia-smi total), GiB.
PROFILES = {
    "rtx5070-12gb": 11.9,
    "rtx5090-32gb": 31.8,
    "a100-40gb": 39.4,
    "a100-80gb": 79.2,
    "h100-80gb": 79.6,
}

# ---- constants (bytes unless noted); the fitted ones are marked and checked by benchmarks/calibration.py
NF4 = 0.5  # 4-bit weight
ABSMAX = 4 / 64  # one fp32 absmax per 64-weight block
ABSMAX_DQ = 1 / 64 + 4 / (64 * 256)  # double quant: 8-bit absmax + one fp32 per 256 blocks
CUDA_CONTEXT_GIB = 0.5  # driver + kernels, not in torch's allocated count
SLACK = 0.06  # reserved / allocated - 1 (measured 1.04 to 1.16 on the host)
LAYER_FACTOR = 1.4  # fitted: working set of the layer being recomputed, incl. its gradient buffers
LOGIT_BYTES = 10.0  # fitted: per logit without a fused CE (bf16 logits + fp32 upcast + fp32 grad)
REF_LOGIT_BYTES = 4.0  # fitted: DPO's reference log-probs pass keeps fp32 logits until the loss (0 if precomputed)
FUSED_CE_BYTES = 8.0  # per token × hidden with Liger FLCE / cut cross-entropy (grad of the input + chunks)
# Share of the checkpointed layer inputs each Axolotl 0.19 `activation_offloading` mode takes off the GPU. true/disk:
# TRL's stream offloader (it replaces recomputation and keeps several tensors resident), fitted at 16,384 tokens;
# hidden_states: the checkpointed inputs themselves (recomputation kept; +4.5/+5.0% at 20K/24K); legacy (synchronous)
# offloads more than those and measured 0.8 GiB under this at 24K: counted like hidden_states. Llama-3.1-8B QLoRA, long rows in 12 GiB.
OFFLOADED = {True: 0.35, "disk": 0.35, "hidden_states": 1.0, "legacy": 1.0}
DPO_CHUNK_BYTES = 256 * 2**20  # fp32 logits of one chunk in training.plugins.dpo (which imports it from here)
CHUNK_BUFFERS = 3  # fitted (2 DPO runs): fp32 logits, the entropy metric's softmax or the gradient, a temporary
WORKSPACE_GIB = 0.05  # fitted: cuBLAS workspace, RoPE caches, masks (QLoRA dequant tiles fit in the gaps)
# training.plugins.tiled_mlp (which imports them from here): rows longer than this run the MLP in pieces of at most
# MLP_TILE_TOKENS. Untiled up to the long recipe's own 24,576 tokens: they fit a 12 GB card without tiling (10.91 GiB
# reserved, H100 capped at 12 GiB, 2026-11-22), and tiling costs one more MLP forward per layer.
MLP_TILE_TOKENS = 8192
MLP_UNTILED_UP_TO = 24576
EMBEDDING_OFFLOAD = "training.plugins.embedding_offload.EmbeddingOffloadPlugin"
TILED_MLP = "training.plugins.tiled_mlp.TiledMLPPlugin"


# ---------------------------------------------------------------- what the recipe asks for
def _on(value) -> bool:
    return value is True or (isinstance(value, str) and value.lower() in ("true", "auto"))


@dataclass
class Setup:
    """The memory-relevant settings of a recipe, with Axolotl's defaults."""

    quant: str = "none"  # "4bit" | "8bit" | "none"
    double_quant: bool = True
    dtype_bytes: int = 2
    adapter: str | None = None
    lora_r: int = 0
    lora_targets: list[str] = field(default_factory=list)
    lora_dropout: float = 0.0
    modules_to_save: list[str] = field(default_factory=list)
    optimizer: str = "adamw_torch_fused"
    seq: int = 2048
    micro_batch: int = 1
    checkpointing: bool = False
    offload: float = 0.0  # share of the checkpointed layer inputs moved to CPU
    fused_ce: bool = False
    liger_layers: bool = False
    rl: str | None = None
    paired: bool = False  # chosen and rejected: two sequences per row
    reference: bool = False  # DPO/IPO compare with a reference model
    separate_reference: bool = False  # DPO/IPO without an adapter loads the model twice
    precompute_ref: bool = False  # reference log-probs computed once before training
    chunked_logps: bool = False  # training.plugins.dpo.LoftDPOTrainer: LM head in chunks over completion tokens
    upcast_embeddings: bool = False  # k-bit loading casts embeddings/lm_head to fp32 (then back): a loading peak
    embedding_offload: bool = False  # training.plugins.embedding_offload: the frozen input embedding in CPU RAM
    mlp_tile: int = 0  # training.plugins.tiled_mlp: rows longer than its threshold run the MLP in pieces of this many
    plugins: list[str] = field(default_factory=list)
    parallel: str = "none"  # "ddp" | "zero1" | "zero2" | "zero3" | "fsdp1" | "fsdp2" (training/parallel.py reads it)
    world: int = 1  # processes (GPUs) in the run, all hosts together
    offload_params: bool = False  # ZeRO-3 offload_param / FSDP offload_params: weight shards in CPU RAM
    offload_optimizer: bool = False  # ZeRO offload_optimizer: optimizer state and fp32 master weights in CPU RAM
    grad_accum: int = 1  # micro-batches per optimizer step (FSDP keeps whole gradients while accumulating)

    @classmethod
    def from_recipe(cls, cfg: dict, world: int = 1) -> "Setup":
        def num(key, default):
            value = cfg.get(key)
            return value if isinstance(value, (int, float)) and not isinstance(value, bool) and value > 0 else default

        facts = RecipeFacts.of(cfg)
        plugins = [p for p in cfg.get("plugins") or [] if isinstance(p, str)]
        quant = {4: "4bit", 8: "8bit"}.get(facts.bits, "none")
        bnb = cfg.get("bnb_config_kwargs") if isinstance(cfg.get("bnb_config_kwargs"), dict) else {}
        full_precision = not (_on(cfg.get("bf16")) or _on(cfg.get("fp16")))
        targets = cfg.get("lora_target_modules") or []
        targets = [targets] if isinstance(targets, str) else [t for t in targets if isinstance(t, str)]
        if cfg.get("lora_target_linear"):
            targets = list(Arch.linear_shapes(Arch("", 1, 1, 1, 1, 1, 1, 1, False)))
        gc = cfg.get("gradient_checkpointing")
        if option(facts.fsdp_options, "activation_checkpointing"):
            gc = True  # FSDP's own per-layer checkpointing
        parallel, offload_params, offload_optimizer = strategy(cfg, world)
        saved = [m for m in cfg.get("lora_modules_to_save") or [] if isinstance(m, str)]
        return cls(
            quant=quant,
            double_quant=bnb.get("bnb_4bit_use_double_quant", True) is not False,
            dtype_bytes=4 if full_precision and quant == "none" else 2,
            adapter=facts.adapter,
            lora_r=int(num("lora_r", 8)),
            lora_targets=targets,
            lora_dropout=float(num("lora_dropout", 0.0)),
            modules_to_save=saved,
            optimizer=str(cfg.get("optimizer") or "adamw_torch_fused"),
            seq=facts.sequence_len,
            micro_batch=int(num("micro_batch_size", 1)),
            grad_accum=int(num("gradient_accumulation_steps", 1)),
            checkpointing=bool(gc) and gc not in ("false", "False"),
            offload=offloaded_share(cfg.get("activation_offloading"), gc),
            fused_ce=facts.fused_cross_entropy,
            liger_layers=facts.liger_layers,
            rl=facts.rl,
            paired=facts.paired,
            reference=facts.reference,
            separate_reference=facts.reference and not facts.adapter,
            precompute_ref=bool(cfg.get("precompute_ref_log_probs")),
            chunked_logps=str(cfg.get("trainer_cls") or "").endswith("LoftDPOTrainer") and facts.reference,
            # PEFT's prepare_model_for_kbit_training (Axolotl runs it for k-bit adapters) upcasts every unquantized
            # weight to fp32; Axolotl converts them back, and skips the embeddings with embeddings_skip_upcast (4-bit)
            upcast_embeddings=quant != "none" and facts.adapter is not None
            and not (quant == "4bit" and _on(cfg.get("embeddings_skip_upcast")))
            and parallel not in ("zero3", "fsdp1", "fsdp2"),  # Axolotl skips that preparation when sharding
            # the plugins' own conditions (they step aside under DeepSpeed/FSDP; the embedding must be frozen, untied)
            embedding_offload=EMBEDDING_OFFLOAD in plugins and facts.adapter is not None and parallel == "none"
            and "embed_tokens" not in saved,
            mlp_tile=MLP_TILE_TOKENS if TILED_MLP in plugins and parallel == "none" else 0,
            plugins=plugins,
            parallel=parallel,
            world=max(1, int(world)),
            offload_params=offload_params,
            offload_optimizer=offload_optimizer,
        )


def offloaded_share(mode, gradient_checkpointing) -> float:
    if gradient_checkpointing in ("offload", "offload_disk"):  # Axolotl maps these to activation_offloading
        mode = True if gradient_checkpointing == "offload" else "disk"
    if not isinstance(mode, (bool, str)) or not mode:
        return 0.0
    return OFFLOADED.get(mode, OFFLOADED[True])


def optimizer_state_bytes(name: str) -> float:
    """Optimizer state per trainable parameter."""
    name = name.lower()
    if "sgd" in name:
        return 0.0
    if "adafactor" in name:
        return 0.1  # factored second moment
    if "4bit" in name:
        return 1.0
    if "8bit" in name:
        return 2.0  # two 8-bit moments
    if "lion" in name:
        return 4.0
    return 8.0  # two fp32 moments


# ---------------------------------------------------------------- the estimate
@dataclass
class Estimate:
    arch: Arch
    setup: Setup
    parts: dict  # GiB by component of the training peak
    notes: list[str]
    loading: float = 0.0  # GiB: the peak while the model loads, when it can exceed training's

    @property
    def training(self) -> float:
        return sum(self.parts.values())

    @property
    def allocated(self) -> float:
        """Peak of the whole process: training's, or loading's where that is higher."""
        return max(self.training, self.loading)

    @property
    def needed(self) -> float:
        return self.allocated * (1 + SLACK) + CUDA_CONTEXT_GIB

    def verdict(self, gpu_gib: float) -> str:
        return "fits" if self.needed <= 0.9 * gpu_gib else "tight" if self.needed <= gpu_gib else "does not fit"

    def to_dict(self) -> dict:
        return {"model": self.arch.name, "arch_source": self.arch.source, "params_b": round(self.arch.params / 1e9, 3),
                "parts_gib": {k: round(v, 3) for k, v in self.parts.items()},
                "loading_gib": round(self.loading, 2), "allocated_gib": round(self.allocated, 2),
                "needed_gib": round(self.needed, 2), "notes": self.notes}


def estimate(arch: Arch, s: Setup) -> Estimate:
    h, i, L, V = arch.hidden, arch.intermediate, arch.layers, arch.vocab
    notes = []
    other = arch.params - arch.linear_params  # embeddings, lm_head, norms: never quantized
    if s.quant == "4bit":
        weights = arch.linear_params * (NF4 + (ABSMAX_DQ if s.double_quant else ABSMAX)) + other * 2
    elif s.quant == "8bit":
        weights = arch.linear_params * 1.0 + other * 2
    else:
        weights = arch.params * s.dtype_bytes
    # bitsandbytes' paged optimizers keep their state in CUDA managed memory: on the GPU while it fits, paged to
    # CPU RAM under pressure, and outside torch's allocator (its peaks on the host never included it)
    paged = "paged" in s.optimizer.lower()
    opt = optimizer_state_bytes(s.optimizer)

    # trainable state: LoRA adapters are fp32 (PEFT upcasts them); modules_to_save are copies in the model's dtype;
    # full fine-tuning trains every weight in place
    shapes = arch.linear_shapes()
    if s.adapter:
        targets = [t for t in s.lora_targets if t in shapes]
        lora = L * sum(s.lora_r * (shapes[t][0] + shapes[t][1]) for t in targets)
        saved = sum(V * h for m in s.modules_to_save if m in ("embed_tokens", "lm_head"))
        trainable = lora * (4 + 4) + saved * 2 * s.dtype_bytes
        state = (lora + saved) * opt
        if not targets:
            notes.append("no LoRA target matched a known projection; adapter memory counted as 0")
    else:
        targets = []
        trainable = arch.params * s.dtype_bytes
        # torch's AdamW keeps its two moments in the parameters' dtype: bf16 weights, bf16 moments
        state = arch.params * (2 * s.dtype_bytes if opt == 8.0 else opt)
    if paged:
        notes.append(f"{s.optimizer}: {state / GIB:.2f} GiB of optimizer state in CUDA managed memory (paged to CPU "
                     "RAM under pressure; not in torch's peak allocated)")
    else:
        trainable += state

    # activations, per token of one micro-batch (DPO runs chosen and rejected: twice the tokens)
    tokens = s.seq * s.micro_batch * (2 if s.paired else 1)
    q, kv = arch.heads * arch.head_dim, arch.kv_heads * arch.head_dim
    mlp = 4 * i  # SwiGLU: gate, up, their product and its input gradient
    layer = 4 * h + (q + 2 * kv) + (q + kv) + q + mlp  # norms, qkv, rope, attention out, SwiGLU
    # LoRA dropout copies of the projections' inputs did not show in the host's peaks (with and without
    # checkpointing), so they are not counted
    if s.liger_layers:
        layer -= 3 * h + i  # fused SwiGLU keeps no silu(gate); fused RMSNorm no fp32 copies (fitted on the host)
        mlp -= i
    # the tiled MLP plugin: one row longer than its threshold has its MLP tensors one piece at a time
    tiled = s.mlp_tile and s.micro_batch == 1 and tokens > MLP_UNTILED_UP_TO
    piece = math.ceil(tokens / math.ceil(tokens / s.mlp_tile)) if tiled else tokens
    if s.checkpointing:
        stored = L * h * 2 * (1 - s.offload)
        act = tokens * (stored + LAYER_FACTOR * (layer - mlp) * 2) + piece * LAYER_FACTOR * mlp * 2
    else:
        act = tokens * L * (layer - mlp) * 2 + piece * L * mlp * 2
    if s.chunked_logps:  # hidden states gathered at completion tokens + one chunk's fp32 logits, log-softmax, grads
        logits = tokens * h * FUSED_CE_BYTES + CHUNK_BUFFERS * DPO_CHUNK_BYTES
    else:
        logits = tokens * h * FUSED_CE_BYTES if s.fused_ce and not s.rl else tokens * V * LOGIT_BYTES
    if s.rl and not (s.chunked_logps or s.precompute_ref):  # Liger's FLCE: DPO calls the model without labels
        logits += tokens * V * REF_LOGIT_BYTES
    workspace = WORKSPACE_GIB * GIB

    offloaded = V * h * s.dtype_bytes if s.embedding_offload and not arch.tied else 0
    if offloaded:  # moved when training begins: loading still holds it
        weights -= offloaded
        notes.append(f"input embedding in CPU RAM during training ({offloaded / GIB:.2f} GiB off the GPU)")
    parts = {"weights": weights, "trainable (params+grads+optimizer)": trainable, "activations": act,
             "logits / loss": logits, "workspace": workspace}
    if s.parallel != "none":
        other_bytes = other * (2 if s.quant != "none" else s.dtype_bytes)
        loading_weights = per_gpu(parts, arch, s, weights, other_bytes, state if not paged else 0.0, notes,
                                  optimizer_state_bytes(s.optimizer))
    else:
        loading_weights = weights
    if s.separate_reference:
        parts["reference model"] = weights
        notes.append("DPO without an adapter loads a second (reference) model: with `adapter: qlora` the policy "
                     "with its adapter disabled is the reference, and this line disappears")
    loading = (weights + offloaded + workspace) / GIB if offloaded else 0.0
    if s.parallel != "none" and loading_weights > parts["weights"]:  # a rank holds more while loading
        loading = (loading_weights + parts["workspace"]) / GIB
    if s.upcast_embeddings:  # every embedding matrix in fp32 (2 B more each), the last one cast still in bf16 too
        matrices = 1 if arch.tied else 2
        loading = max(loading, (loading_weights + (2 * matrices + 2) * V * h) / GIB)
        if loading > sum(parts.values()) / GIB:  # measured 8.23 GiB for Qwen2.5-7B QLoRA (benchmarks/RESULTS.md, DPO)
            notes.append(f"loading peaks at {loading:.2f} GiB, above training: Axolotl upcasts the embeddings to "
                         "fp32 while preparing the k-bit model; `embeddings_skip_upcast: true` avoids it (4-bit)")
    return Estimate(arch, s, {k: v / GIB for k, v in parts.items()}, notes, loading)


def estimate_recipe(cfg: dict, arch: Arch | None = None, world: int = 1) -> Estimate | None:
    arch = arch or find_arch(cfg.get("base_model"))
    return estimate(arch, Setup.from_recipe(cfg, world)) if arch else None


def gpu_gib(profile: str) -> float:
    """A profile name or a number of GiB."""
    if profile in PROFILES:
        return PROFILES[profile]
    try:
        value = float(re.sub(r"(?i)\s*gi?b$", "", profile))
    except ValueError:
        value = 0
    if value <= 0:
        from training.errors import LoftError

        raise LoftError(f"unknown GPU profile `{profile}`; use one of {', '.join(PROFILES)} or a size in GiB (e.g. 24)")
    return value
