"""LoRA adapters served unmerged by llama-server: the PEFT folder converted by llama.cpp's own
convert_lora_to_gguf.py, loaded at scale 0 (--lora-scaled FILE:0), switched on per request. (vLLM's side: tests/test_vllm.py.)

The models are tests/lora_models.py's: SmolLM2-135M in fp32, an adapter that changes its answer, and the same
adapter merged. Base and merged are exported to f32 GGUFs, so the only difference between "adapter on base" and
"merged" is the order of the arithmetic, and greedy answers must agree.
"""

import json
import subprocess
import sys

import openai
import pytest

import lora_models
from training import adapters, llama_cpp
from training.errors import LoftError
from training.serve import llama_server

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return lora_models.models(tmp_path_factory)


@pytest.fixture(scope="module")
def ggufs(models, tmp_path_factory):
    base, _, merged = models
    out = tmp_path_factory.mktemp("gguf-f32")
    files = {}
    for name, folder in (("base", base), ("merged", merged)):
        files[name] = out / f"{name}-f32.gguf"
        llama_cpp.convert_hf_to_gguf(folder, files[name], "f32")
    return files


def greedy(base_url: str, lora: list | None = None) -> str:
    client = openai.OpenAI(base_url=base_url, api_key="none", max_retries=0, timeout=300)
    extra = {"cache_prompt": False} | ({"lora": lora} if lora is not None else {})
    resp = client.chat.completions.create(model="any", messages=lora_models.PROMPT, temperature=0,
                                          max_tokens=lora_models.TOKENS, extra_body=extra)
    return resp.choices[0].message.content.strip()


def test_adapter_answers_as_the_merged_model_and_the_base_as_the_base(models, ggufs):
    _, adapter, _ = models
    loras = adapters.for_llama_cpp(ggufs["base"], {"sea": adapter})  # what `loft serve --adapter sea=DIR` loads
    assert len(loras) == 1 and loras[0].read_bytes()[:4] == b"GGUF"
    assert adapters.for_llama_cpp(ggufs["base"], {"sea": adapter}) == loras, "converted once, then cached"
    with llama_server(ggufs["base"], ctx=512, parallel=1, loras=loras) as url:
        # Adapter first: a request that names no adapter must not inherit the one before it.
        via_adapter, via_base = greedy(url, [{"id": 0, "scale": 1.0}]), greedy(url)
    with llama_server(ggufs["merged"], ctx=512, parallel=1) as url:
        merged = greedy(url)
    assert via_adapter == merged
    assert via_base != via_adapter, "the adapter changes the answer, so the equality above means something"


def test_adapter_of_another_model_is_refused_before_anything_starts(models, ggufs, tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    tiny = tmp_path / "tiny-base"
    AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                                 num_hidden_layers=2, num_attention_heads=4)).save_pretrained(tiny)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny), LoraConfig(r=4, target_modules=["q_proj"]))
    model.save_pretrained(tmp_path / "a")
    cfg = json.loads((tmp_path / "a" / "adapter_config.json").read_text())
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tiny)}))
    with pytest.raises(LoftError, match=r"adapter tiny was trained on tiny-base \(hidden_size 64\), but base-f32.gguf"):
        adapters.for_llama_cpp(ggufs["base"], {"tiny": tmp_path / "a"})
    proc = subprocess.run([sys.executable, "-m", "training.cli", "serve", str(ggufs["base"]), "--adapter",
                           f"tiny={tmp_path / 'a'}", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr, proc.stderr


def test_cli_dry_run_loads_the_adapters_switched_off(models, ggufs):
    _, adapter, _ = models
    proc = subprocess.run([sys.executable, "-m", "training.cli", "serve", str(ggufs["base"]), "--adapter",
                           f"sea={adapter}", "--dry-run"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    argv = proc.stdout.split()
    assert argv[argv.index("--lora-scaled") + 1].endswith("sea-f32.gguf:0"), "loaded switched off"
