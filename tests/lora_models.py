"""Real models for the serving tests: SmolLM2-135M in fp32, a LoRA adapter on it that really changes its answers,
and the same adapter merged (PEFT's merge_and_unload), built once per test session in its base temp dir.

fp32 throughout: vLLM takes --dtype from config.json, so the served base, the adapter applied by the server and
the merged model all compute in fp32, and greedy answers can be compared token for token.
"""

import json
import shutil
from pathlib import Path

from training.model import ensure_default_model

# A question whose answer the adapter visibly changes (checked by the tests, not assumed).
PROMPT = [{"role": "user", "content": "Write one sentence about the sea."}]
TOKENS = 24


def fp32_base(root: Path) -> Path:
    out = root / "smollm2-fp32"
    if (out / "config.json").is_file():
        return out
    import torch
    from transformers import AutoModelForCausalLM

    src = ensure_default_model(quiet=True)
    tmp = root / "smollm2-fp32.partial"
    AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).save_pretrained(tmp)
    for f in src.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            shutil.copy(f, tmp / f.name)
    tmp.rename(out)
    return out


def adapter(base: Path, root: Path, name: str = "sea", seed: int = 0) -> Path:
    """LoRA r=8 on the attention projections, A and B random (B at the size of a trained delta)."""
    out = root / f"adapter-{name}"
    if (out / "adapter_model.safetensors").is_file():
        return out
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32),
                           LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "o_proj"],
                                      init_lora_weights=False))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                torch.nn.init.normal_(p, std=0.02)
    model.save_pretrained(out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = str(base)
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def merged(base: Path, adapter_dir: Path, root: Path) -> Path:
    out = root / f"merged-{adapter_dir.name}"
    if (out / "config.json").is_file():
        return out
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    PeftModel.from_pretrained(model, adapter_dir).merge_and_unload().save_pretrained(out)
    for f in base.iterdir():
        if f.name.startswith(("tokenizer", "chat_template", "special_tokens", "generation_config")):
            shutil.copy(f, out / f.name)
    return out


def models(tmp_path_factory) -> tuple[Path, Path, Path]:
    """(fp32 base, adapter, merged) in the session's base temp dir, shared by every test file."""
    root = tmp_path_factory.getbasetemp() / "lora-models"
    root.mkdir(exist_ok=True)
    base = fp32_base(root)
    ad = adapter(base, root)
    return base, ad, merged(base, ad, root)


def hf_greedy(model_dir: Path, messages=PROMPT, max_tokens: int = TOKENS) -> str:
    from benchmarks.generate import hf_chat

    return hf_chat(model_dir, [messages], max_tokens=max_tokens, use_cache=False)[0]
