"""`loft serve`: put a model behind an OpenAI-compatible API.

MODEL picks the engine (or --engine does):
  *.gguf        -> llama.cpp's llama-server (the cached build), with production flags:
                   -c CTX×PARALLEL with --parallel slots (every slot gets the full --ctx), continuous
                   batching (-cb), --jinja (the chat template embedded in the GGUF renders the prompts),
                   -fa auto, --no-slots (no endpoint listing live prompts), --metrics (Prometheus), -ngl 999
                   only when nvidia-smi sees a GPU (this build is CPU-only unless rebuilt with CUDA;
                   --gpu-layers overrides). The chat web page at / when setup built it (--no-ui: none).
                   The API key goes to the child via LLAMA_API_KEY so it never shows in `ps`.
  a directory   -> vLLM (training/vllm_engine.py: the CUDA `vllm` on a GPU machine, else the CPU build in its
                   own venv from `make setup-vllm`): --dtype from config.json, --max-model-len, --chat-template
                   from the directory, --served-model-name. --dry-run prints the command anywhere.
--adapter NAME=DIR (repeatable) serves LoRA adapters beside the base, unmerged (training/adapters.py): vLLM as
models named NAME, llama-server as GGUF LoRAs that a request switches on with "lora": [{"id": i, "scale": 1}].
Bound to 127.0.0.1 unless --host says otherwise. Startup waits for GET /health (fails with the server's
last log lines if it dies); Ctrl-C stops the server (SIGTERM to the child, SIGKILL after 10 s, then anything
left in its process group).
--smoke sends one chat completion with the `openai` client, prints the answer and latency, then stops.

Python: `with llama_server("model.gguf") as base_url:` (or `vllm_server("merged_dir")`) starts a server on a
free port and yields the OpenAI base URL (http://127.0.0.1:PORT/v1); `openai.OpenAI(base_url=base_url, ...)`.
"""

import contextlib
import os
import re
import shlex
import sys
import time
from pathlib import Path

from training import adapters as lora
from training import llama_cpp, vllm_engine
from training.errors import LoftError
from training.process import (STARTUP_TIMEOUT, Server, check_port, client_host, free_port, serving,
                              signals_as_keyboard_interrupt, temp_log)

HELP = "Serve a GGUF with llama-server (or a merged HF dir with vLLM), adapters too, behind an OpenAI-compatible API."
EXAMPLE = "loft serve merged_models/smollm2-shakespeare/gguf/smollm2-shakespeare-Q4_K_M.gguf --api-key sk-local --smoke"

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 8080
DEFAULT_CTX = 4096
DEFAULT_PARALLEL = 4
SMOKE_PROMPT = "What is the capital of France? Answer in one word."


# ---------------------------------------------------------------- llama.cpp
# llama.cpp's own words for a GGUF it cannot read, most telling first (the loader's reason, then its summary).
_LOAD_FAILURES = (r"gguf_init\w*: .*|error loading model.*", r"failed to load model.*")


def gguf_load_failure(gguf_path: Path, log: str) -> str | None:
    """The line from llama-server's log saying why the GGUF did not load, as a message with the fix."""
    for pattern in _LOAD_FAILURES:
        match = re.search(pattern, log)
        if match:
            return (f"llama-server could not load {gguf_path.name}: \"{match.group(0).strip()[:200]}\"; the file is "
                    "damaged or cut short (an interrupted copy or export): export it again with `loft export "
                    "MERGED_DIR` and serve the new .gguf")
    return None


def _check_gguf(gguf_path: Path) -> None:
    if not gguf_path.is_file():
        raise LoftError(f"{gguf_path} does not exist; export one with `loft export MERGED_DIR`")
    with open(gguf_path, "rb") as fh:
        if fh.read(4) != b"GGUF":
            raise LoftError(f"{gguf_path} is not a GGUF file; export one with `loft export MERGED_DIR`")


def start_llama_server(
    gguf_path,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    api_key: str | None = None,
    ctx: int = DEFAULT_CTX,
    parallel: int = DEFAULT_PARALLEL,
    gpu_layers: int | None = None,
    threads: int | None = None,
    timeout: float = STARTUP_TIMEOUT,
    log_path=None,
    loras: list | None = None,
    ui: Path | None = None,
) -> Server:
    """Start llama-server and wait until /health answers 200. port=None picks a free one (retried if taken)."""
    gguf_path = Path(gguf_path).expanduser().resolve()
    _check_gguf(gguf_path)
    env = llama_cpp.tool_env()
    env.pop("LLAMA_API_KEY", None)
    if api_key:
        env["LLAMA_API_KEY"] = api_key
    log_path = Path(log_path) if log_path is not None else temp_log("loft-llama-server-")
    check_port(host, port)
    attempts = 3 if port is None else 1
    for attempt in range(attempts):
        chosen = port if port is not None else free_port(host)
        cmd = llama_cpp.server_command(gguf_path, host, chosen, ctx, parallel, gpu_layers, threads, loras=loras, ui=ui)
        server = Server(cmd, env, f"http://{client_host(host)}:{chosen}", log_path, "llama-server")
        server.diagnose = lambda log: gguf_load_failure(gguf_path, log)
        try:
            return server.start_and_wait(timeout)
        except LoftError:
            if attempt + 1 < attempts and "couldn't bind" in server.log_tail(40):
                continue  # someone took the free port between our check and the bind
            raise


@contextlib.contextmanager
def llama_server(gguf_path, *, log_path=None, **options):
    """Run llama-server on a GGUF for the duration of a `with` block; yield the OpenAI base URL (…/v1).

    options: start_llama_server's (port, api_key, ctx, parallel, host, gpu_layers, threads, timeout, loras, ui).
    The native endpoints (/health, /tokenize, /apply-template) live at the URL without the /v1 suffix.
    The log goes to log_path (default: a temp file, deleted afterwards unless startup failed).
    """
    server = start_llama_server(gguf_path, log_path=log_path, **options)
    with serving(server, keep_log=log_path is not None) as base_url:
        yield base_url


# ---------------------------------------------------------------- vLLM
def start_vllm(
    model_dir,
    host: str = DEFAULT_HOST,
    port: int | None = None,
    api_key: str | None = None,
    ctx: int = DEFAULT_CTX,
    adapters: dict | None = None,
    timeout: float = STARTUP_TIMEOUT,
    log_path=None,
) -> Server:
    """Start vLLM on a merged HF directory (LoRA adapters {name: dir} on it, unmerged) and wait for /health."""
    check_port(host, port)
    port = port or free_port(host)
    cmd, extra = vllm_engine.command(model_dir, host, port, ctx, adapters)
    env = {**os.environ, **extra}
    env.pop("VLLM_API_KEY", None)
    if api_key:
        env["VLLM_API_KEY"] = api_key
    log_path = Path(log_path) if log_path is not None else temp_log("loft-vllm-")
    server = Server(vllm_engine.runnable(cmd), env, f"http://{client_host(host)}:{port}", log_path, "vllm")
    return server.start_and_wait(timeout)


@contextlib.contextmanager
def vllm_server(model_dir, *, log_path=None, **options):
    """vLLM for the duration of a `with` block (options: start_vllm's); yields the OpenAI base URL, like llama_server()."""
    server = start_vllm(model_dir, log_path=log_path, **options)
    with serving(server, keep_log=log_path is not None) as base_url:
        yield base_url


# ---------------------------------------------------------------- smoke test
def smoke(base_url: str, api_key: str | None = None, prompt: str = SMOKE_PROMPT, max_tokens: int = 32) -> dict:
    """One greedy chat completion through the real `openai` client: {"model", "answer", "latency_s"}."""
    from openai import OpenAI

    client = OpenAI(base_url=base_url, api_key=api_key or "none", max_retries=0, timeout=120)
    model = client.models.list().data[0].id
    start = time.perf_counter()
    resp = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens, temperature=0
    )
    return {"model": model, "answer": resp.choices[0].message.content, "latency_s": time.perf_counter() - start}


# ---------------------------------------------------------------- CLI
def add_arguments(parser) -> None:
    parser.add_argument("model", metavar="MODEL", help="a .gguf file (llama.cpp) or a merged HF directory (vLLM)")
    parser.add_argument("--engine", choices=("llama.cpp", "vllm"), help="default: llama.cpp for .gguf, vllm for a directory")
    parser.add_argument("--host", default=DEFAULT_HOST, help=f"address to bind (default {DEFAULT_HOST}: this machine only)")
    parser.add_argument("--port", type=int, default=DEFAULT_PORT, help=f"port (default {DEFAULT_PORT}; 0 = any free port)")
    parser.add_argument("--api-key", help="require this key (Authorization: Bearer KEY) on every request")
    parser.add_argument("--ctx", type=int, default=DEFAULT_CTX, help=f"context per request in tokens (default {DEFAULT_CTX})")
    parser.add_argument("--parallel", type=int, default=DEFAULT_PARALLEL, help=f"llama.cpp slots (default {DEFAULT_PARALLEL})")
    parser.add_argument("--gpu-layers", type=int, help="llama.cpp layers on the GPU (default: 999 when nvidia-smi finds one, else 0)")
    parser.add_argument("--threads", type=int, help="llama.cpp CPU threads (default: llama.cpp's choice)")
    parser.add_argument("--timeout", type=float, default=STARTUP_TIMEOUT, help="seconds to wait for the server to be ready")
    parser.add_argument("--log", help="server log file (default: a file in the temp dir, printed at startup)")
    parser.add_argument("--adapter", action="append", metavar="NAME=DIR",
                        help="serve a LoRA adapter folder beside the base, unmerged (repeat for several)")
    parser.add_argument("--no-ui", action="store_true",
                        help="llama.cpp: no chat web page (default: served at / when setup built it)")
    parser.add_argument("--smoke", action="store_true", help="send one chat completion, print answer and latency, stop")
    parser.add_argument("--dry-run", action="store_true", help="print the server command line and exit")


def _engine(model: Path, engine: str | None) -> str:
    if engine is None:
        if model.is_dir():
            return "vllm"
        if model.suffix.lower() == ".gguf":
            return "llama.cpp"
        raise LoftError(f"{model}: pass a .gguf file (llama.cpp) or a merged model directory (vLLM)")
    if engine == "llama.cpp" and model.is_dir():
        raise LoftError(f"llama.cpp serves a .gguf file, and {model} is a directory; run `loft export {model}` and pass a .gguf from it")
    if engine == "vllm" and model.suffix.lower() == ".gguf":
        raise LoftError("the vllm engine serves a merged HF directory here; pass the directory, or use --engine llama.cpp")
    return engine


def run(args) -> int:
    with signals_as_keyboard_interrupt():  # Ctrl-C or SIGTERM (systemd, docker stop) stop the server
        return _run(args)


def _run(args) -> int:
    model = Path(args.model).expanduser()
    engine = _engine(model, args.engine)
    if args.ctx < 128 or args.parallel < 1 or not 0 <= args.port < 65536:
        raise LoftError("--ctx must be >= 128, --parallel >= 1 and --port in 0..65535")
    if args.host not in ("127.0.0.1", "localhost", "::1") and not args.api_key:
        print(f"loft serve: warning: listening on {args.host} without --api-key: anyone who can reach it can use it",
              file=sys.stderr)
    port = args.port or (None if not args.dry_run else DEFAULT_PORT)

    adapters = lora.parse(args.adapter)
    loras, ui = [], None
    if engine == "vllm":
        for name, folder in adapters.items():
            lora.check_matches(name, folder, model.resolve())
        cmd, env = vllm_engine.command(model, args.host, port or free_port(args.host), args.ctx, adapters)
        if args.dry_run:
            shown = {**env, **({"VLLM_API_KEY": "***"} if args.api_key else {})}
            print(" ".join(f"{k}={v}" for k, v in shown.items()) + " " + shlex.join(cmd))
            return 0
        vllm_engine.runnable(cmd)  # a missing vLLM: one line, before anything starts
    else:
        _check_gguf(model.resolve())
        loras = lora.for_llama_cpp(model.resolve(), adapters)
        ui = None if args.no_ui else llama_cpp.ui_dir()
        if args.dry_run:
            cmd = llama_cpp.server_command(model.resolve(), args.host, port, args.ctx, args.parallel, args.gpu_layers,
                                       args.threads, loras=loras, ui=ui)
            print(("LLAMA_API_KEY=*** " if args.api_key else "") + shlex.join(cmd))
            return 0
    server = None

    clean = False
    try:
        if engine == "vllm":
            print(f"loft serve: starting vLLM on {model} (CPU: about a minute) ...", flush=True)
            server = start_vllm(model, args.host, port, args.api_key, args.ctx, adapters, args.timeout, args.log)
        else:
            print(f"loft serve: starting llama-server on {model.name} ...", flush=True)
            server = start_llama_server(model, args.host, port, args.api_key, args.ctx, args.parallel,
                                        args.gpu_layers, args.threads, args.timeout, args.log, loras=loras, ui=ui)
        print(f"loft serve: ready at {server.base_url}  (OpenAI base_url; log: {server.log_path})", flush=True)
        if engine == "llama.cpp" and ui is not None:
            print(f"loft serve: chat page at {server.root_url}/", flush=True)
        for i, name in enumerate(adapters):
            how = f'model "{name}"' if engine == "vllm" else f'"lora": [{{"id": {i}, "scale": 1.0}}] in the request'
            print(f"loft serve: adapter {name}: {how} (the base answers without it)", flush=True)
        if args.smoke:
            result = smoke(server.base_url, args.api_key)
            print(f"loft serve: smoke: {result['answer']!r}  ({result['latency_s']:.2f}s, model {result['model']})")
            clean = True
            return 0
        print("loft serve: Ctrl-C to stop", flush=True)
        code = server.proc.wait()
        print(server.log_tail(), file=sys.stderr)
        raise LoftError(f"{server.name} exited with code {code} (log: {server.log_path})")
    except KeyboardInterrupt:
        print("loft serve: stopping", file=sys.stderr)
        clean = True
        return 0
    finally:
        if server is not None:
            server.stop()
            if clean and not args.log:  # a temp log is only worth keeping when something went wrong
                server.log_path.unlink(missing_ok=True)
