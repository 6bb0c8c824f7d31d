"""Axolotl's fused LoRA kernels on LoftDPOTrainer's model, applied once TRL has made it a PEFT model.

Why here and not through the recipe's `lora_*_kernel` keys: with `rl: dpo`, Axolotl 0.19 builds only the LoRA
config and TRL's DPOTrainer wraps the model in PEFT inside its __init__, but Axolotl's loader applies the kernels
before that (patch_manager._apply_lora_kernel_patch) and raises "Model must be a PeftModelForCausalLM". So the DPO
recipes keep the keys false, and the trainer calls the same Axolotl functions after the wrap and before TRL's
precomputed reference pass (when there is one).

The reference stays the adapter-disabled model: each kernel reads its projection through Axolotl's
get_lora_parameters, which hands back no LoRA A/B while the adapter is disabled, i.e. inside TRL's
use_adapter(model, None).

Where they run: the MLP kernel's SwiGLU/GeGLU is Triton, so CUDA only; the QKV and O kernels are torch matmuls,
so on CPU those two run when the base weights are plain floats (Axolotl's NF4 dequantisation calls CUDA).
tests/test_dpo.py checks loss, gradients and reference log-probs on CPU against the unpatched model.

Off switch: LOFT_DPO_LORA_KERNELS=0 in the environment. A recipe key cannot carry it: the `lora_*_kernel` keys must
stay false (see above) and the trainer is not handed Axolotl's config.
"""

import os
import tempfile
import types

import torch
from axolotl.model_support import check_capability, get_model_support
from axolotl.monkeypatch import lora_kernels as ax
from axolotl.utils.dict import DictDefault
from peft import LoraConfig, PeftModelForCausalLM

from training.plugins.lean import sharded

ENV = "LOFT_DPO_LORA_KERNELS"
FLAGS = {"mlp": "lora_mlp_kernel", "qkv": "lora_qkv_kernel", "o": "lora_o_kernel"}  # Axolotl's keys


def kernels_for(device: str, weights: str, activation: str | None) -> list[str]:
    """Which kernels can run: device "cuda" or other, weights "plain" | "4bit" | "8bit"."""
    if weights == "8bit":
        return []  # Axolotl refuses its kernels on LLM.int8 bases too
    if device != "cuda":
        return [] if weights == "4bit" else ["qkv", "o"]
    activation = "gelu" if activation and "gelu" in activation else activation  # as Axolotl maps it
    return (["mlp"] if activation in ax.SUPPORTED_ACTIVATIONS else []) + ["qkv", "o"]


def refusal(trainer, model) -> str | None:
    """Why the kernels must not be applied to this model, or None."""
    if os.environ.get(ENV, "1") == "0":
        return f"{ENV}=0"
    if sharded(trainer):
        return "DeepSpeed/FSDP shard the weights the kernels read whole"
    if not isinstance(model, PeftModelForCausalLM):
        return f"the model is a {type(model).__name__}, not a PEFT causal LM"
    if len(model.active_adapters) != 1:
        return "more than one active adapter"
    configs = list(model.peft_config.values())
    if not all(isinstance(c, LoraConfig) for c in configs):
        return "not a LoRA adapter"
    if any(c.lora_dropout for c in configs):
        return "lora_dropout is not 0"
    if any(c.bias != "none" for c in configs) or any(c.use_dora for c in configs):
        return "LoRA bias or DoRA (not covered by Loft's tests)"
    targets = {repr(c.target_modules if isinstance(c.target_modules, str) else sorted(c.target_modules or []))
               for c in configs}
    if len(targets) > 1:  # a "ref" adapter on other modules: the kernels would look for the wrong A/B
        return "adapters on different modules"
    try:
        check_capability(get_model_support(model.config.model_type), "lora_kernels", model.config.model_type)
    except ValueError as e:  # Axolotl's own list of architectures its kernels break
        return str(e)
    return None


def applied(model) -> tuple[dict[str, int], int]:
    """How many decoder layers run each kernel, and how many layers there are."""
    counts = dict.fromkeys(FLAGS, 0)
    try:
        layers = ax.get_layers(model)
    except (AttributeError, NotImplementedError):  # not a PEFT decoder LM: nothing was patched
        return counts, 0
    for layer in layers:
        mlp_forward = getattr(getattr(layer, "mlp", None), "forward", None)
        counts["mlp"] += getattr(mlp_forward, "__func__", None) in ax.APPLY_FN_MAPPING.values()
        for attn in ax.find_self_attn_in_layer(layer):
            if attn.forward.__name__ == "axolotl_attn_forward":
                counts["qkv"] += attn.apply_qkv.__func__ in (ax.apply_lora_qkv, ax.apply_lora_qk)
                counts["o"] += attn.apply_o.__func__ is ax.apply_lora_o
    return counts, len(layers)


def _attention_forward(model, cfg: DictDefault) -> None:
    """Axolotl's rewritten attention forward (it calls the apply_qkv/apply_o that apply_lora_kernel_patches set),
    bound to this model's attention modules only. Axolotl patches the class, which would break every other
    instance in the process (another model, a test's) that has no apply_qkv: the class is restored here."""
    attns = [a for layer in ax.get_layers(model) for a in ax.find_self_attn_in_layer(layer)]
    if not attns:
        return
    cls = type(attns[0])
    if cls.forward.__name__ == "axolotl_attn_forward":
        return  # Axolotl's loader already patched the class (an SFT load in this process): nothing to bind
    original = cls.forward
    with tempfile.TemporaryDirectory() as folder:
        model.config.save_pretrained(folder)  # Axolotl finds the attention class from a config folder
        target = ax.get_attention_cls_from_config(DictDefault(base_model=folder))
        if target is not cls:
            return
        try:
            ax.patch_self_attn_lora(DictDefault(cfg, base_model=folder))
            patched = cls.forward
        finally:
            cls.forward = original
            if hasattr(cls, "_original_forward"):
                del cls._original_forward
    if patched is not original:
        for attn in attns:
            attn.forward = types.MethodType(patched, attn)


def compute_dtype_biases(model) -> int:
    """Frozen biases of 4-bit base layers (Qwen's q/k/v) in the layer's compute dtype; returns how many were cast.
    PEFT's k-bit preparation upcasts them to fp32, and bitsandbytes' own Linear4bit.forward casts them back to the
    input's dtype on its first call; Axolotl's kernels bypass that forward and add the fp32 bias to each bf16
    projection output (a non-vectorised mixed-dtype add: 15 ms of a 1.06 s Qwen2.5-7B DPO step on an H200,
    2026-12-01). Cast here, the kernels add what bitsandbytes' path would."""
    cast = 0
    for module in model.modules():
        bias, dtype = getattr(module, "bias", None), getattr(module, "compute_dtype", None)
        if (isinstance(bias, torch.nn.Parameter) and isinstance(dtype, torch.dtype) and not bias.requires_grad
                and bias.dtype != dtype and getattr(getattr(module, "weight", None), "quant_state", None) is not None):
            bias.data = bias.data.to(dtype)
            cast += 1
    return cast


def apply(trainer) -> str:
    """Apply what is safe to the trainer's model; return the one line to print. An error here must not cost the
    run: what did get applied is exact (each patch is whole per module), and the line says what that is."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    try:
        why = refusal(trainer, model)
        if why:
            return f"no fused LoRA kernels: {why}"
        params = list(model.parameters())  # 4-bit: Params4bit carries a quant_state, stored as uint8 or bf16/fp32
        weights = ("8bit" if any(p.dtype == torch.int8 for p in params)
                   else "4bit" if any(getattr(p, "quant_state", None) is not None for p in params) else "plain")
        device = next((p.device.type for p in params if p.requires_grad), "cpu")
        kernels = kernels_for(device, weights, getattr(model.config.get_text_config(), "hidden_act", None))
        if not kernels:
            return f"no fused LoRA kernels: {weights} base weights on {device}"
        cfg = DictDefault({flag: name in kernels for name, flag in FLAGS.items()})
        ax.apply_lora_kernel_patches(model, cfg)
        _attention_forward(model, cfg)
        compute_dtype_biases(model)
        stopped = "" if device == "cuda" else "; MLP kernel: Triton, CUDA only"
    except Exception as e:
        stopped = f"; stopped: {type(e).__name__}: {e}"
    counts, layers = applied(model)
    done = ", ".join(f"{name.upper()} on {n}/{layers} layers" for name, n in counts.items() if n)
    return f"{'Axolotl fused LoRA kernels: ' + done if done else 'no fused LoRA kernels'}{stopped} ({ENV}=0: off)"
