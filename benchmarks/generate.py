"""Completions for a list of chat prompts, from an OpenAI-compatible endpoint or a local HF model, cached.

A prompt is a list of chat messages ([{"role": "system", ...}, {"role": "user", ...}]). Generation is
deterministic for a given seed: one seed per request on an endpoint (llama-server and vLLM honour it),
torch.manual_seed(seed + i) before prompt i locally, and temperature 0 means greedy.

Cache: $LOFT_CACHE/generations/<hash>.jsonl, one file per (model identity, generation params), one line
per prompt {"key": sha256(messages), "output": ...}. The model identity is
  * a model file or folder: sha256 over every file's relative path, size and mtime (re-exporting a GGUF
    changes it, so a stale answer is never reused);
  * any other string you pass as `identity` (e.g. "gpt-4o-mini@2024-07-18"), taken as is;
  * nothing: no cache — an endpoint URL alone says nothing about which weights answer behind it.
A spec for the CLI (`NAME=WHAT`, see model_outputs) says which of these applies.
"""

import hashlib
import json
import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from training.errors import LoftError
from training.paths import cache_dir

MODEL_FILES = (".gguf", ".safetensors", ".bin", ".json", ".model", ".txt", ".jinja")


# ---------------------------------------------------------------- identity and cache
def model_identity(what) -> str:
    """sha256 of a model file/folder's files (path, size, mtime), or of the given string."""
    path = Path(str(what)).expanduser()
    h = hashlib.sha256()
    if path.is_file():
        st = path.stat()
        h.update(f"{path.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    elif path.is_dir():
        for f in sorted(p for p in path.rglob("*") if p.is_file() and p.suffix in MODEL_FILES):
            st = f.stat()
            h.update(f"{f.relative_to(path)}|{st.st_size}|{st.st_mtime_ns}\n".encode())
    else:
        h.update(f"id:{what}".encode())
    return h.hexdigest()


def _key(messages: list[dict]) -> str:
    return hashlib.sha256(json.dumps(messages, sort_keys=True, ensure_ascii=False).encode()).hexdigest()


class Cache:
    """Append-only JSONL of answers for one (model identity, params); a killed run resumes where it stopped."""

    def __init__(self, identity: str | None, params: dict, root: Path | None = None):
        self.path = None
        self.done = {}
        if identity is None:
            return
        tag = hashlib.sha256(json.dumps({"model": identity, **params}, sort_keys=True).encode()).hexdigest()[:24]
        self.path = (root or cache_dir() / "generations") / f"{tag}.jsonl"
        if self.path.exists():
            for line in self.path.read_text(encoding="utf-8").splitlines():
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    continue  # a line cut short by a kill; that prompt is generated again
                self.done[row["key"]] = row["output"]

    def put(self, key: str, output: str) -> None:
        self.done[key] = output
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with self.path.open("a", encoding="utf-8") as fh:
                fh.write(json.dumps({"key": key, "output": output}, ensure_ascii=False) + "\n")


def _progress(total: int, desc: str):
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="prompt", file=sys.stderr, mininterval=1.0, dynamic_ncols=True)


def _run_all(prompts, cache: Cache, one, desc: str, workers: int) -> list[str]:
    """Answer every prompt not yet in the cache with `one(i, messages)`, in parallel when workers > 1."""
    keys = [_key(m) for m in prompts]
    todo = [i for i, k in enumerate(keys) if k not in cache.done]
    with _progress(len(prompts), desc) as bar:
        bar.update(len(prompts) - len(todo))

        def work(i):
            out = one(i, prompts[i])
            cache.put(keys[i], out)
            bar.update(1)

        if workers > 1 and len(todo) > 1:
            with ThreadPoolExecutor(workers) as pool:
                futures = [pool.submit(work, i) for i in todo]
                try:
                    for future in futures:
                        future.result()
                except BaseException:  # the first error stops the queue: no waiting on 99 more failures
                    for future in futures:
                        future.cancel()
                    raise
        else:
            for i in todo:
                work(i)
    return [cache.done[k] for k in keys]


# ---------------------------------------------------------------- backends
def _openai_cache(model: str, identity, params: dict) -> Cache:
    return Cache(model_identity(identity) if identity is not None else None, {"model_name": model, **params})


def openai_chat(
    base_url: str,
    prompts: list[list[dict]],
    model: str = "local",
    api_key: str | None = None,
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    identity: str | Path | None = None,
    workers: int = 4,
    desc: str | None = None,
) -> list[str]:
    """Chat completions from an OpenAI-compatible endpoint (llama-server, vLLM, OpenAI), one per prompt."""
    import openai

    client = openai.OpenAI(base_url=base_url, api_key=api_key or os.environ.get("OPENAI_API_KEY") or "none",
                           max_retries=2, timeout=600)
    params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed)
    cache = _openai_cache(model, identity, params)

    def one(i, messages):
        try:
            resp = client.chat.completions.create(model=model, messages=messages, **params)
        except openai.AuthenticationError:
            raise LoftError(f"{base_url} refused the API key; pass the server's key with --api-key") from None
        except openai.APIConnectionError as err:
            raise LoftError(f"cannot reach {base_url} ({err}); start a server with `loft serve MODEL`") from None
        except openai.APIStatusError as err:
            raise LoftError(f"{base_url} answered HTTP {err.status_code}: {str(err)[:200]}") from None
        return resp.choices[0].message.content or ""

    return _run_all(prompts, cache, one, desc or model, workers)


def hf_chat(
    model_dir: str | Path,
    prompts: list[list[dict]],
    *,
    max_tokens: int = 256,
    temperature: float = 0.0,
    top_p: float = 1.0,
    seed: int = 0,
    desc: str | None = None,
    use_cache: bool = True,
) -> list[str]:
    """Chat completions from a local Hugging Face model folder with transformers' generate (CPU or one GPU)."""
    model_dir = Path(model_dir).expanduser()
    if not (model_dir / "config.json").is_file():
        raise LoftError(f"{model_dir} is not a Hugging Face model folder (no config.json)")
    params = dict(max_tokens=max_tokens, temperature=temperature, top_p=top_p, seed=seed, engine="transformers")
    cache = Cache(model_identity(model_dir) if use_cache else None, params)
    state = {}

    def one(i, messages):
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not state:  # loaded on the first uncached prompt only: a fully cached run never touches torch
            state["tok"] = AutoTokenizer.from_pretrained(model_dir)
            device = "cuda" if torch.cuda.is_available() else "cpu"
            state["model"] = AutoModelForCausalLM.from_pretrained(model_dir, dtype="auto").to(device).eval()
        tok, model = state["tok"], state["model"]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
        ids = {k: v.to(model.device) for k, v in ids.items()}
        torch.manual_seed(seed + i)
        sampling = dict(do_sample=True, temperature=temperature, top_p=top_p) if temperature > 0 else dict(do_sample=False)
        with torch.no_grad():
            out = model.generate(**ids, max_new_tokens=max_tokens, pad_token_id=tok.eos_token_id, **sampling)
        return tok.decode(out[0, ids["input_ids"].shape[1]:], skip_special_tokens=True).strip()

    return _run_all(prompts, cache, one, desc or model_dir.name, workers=1)


def saved_outputs(path: Path, n: int) -> list[str]:
    """Outputs generated elsewhere: a JSONL file with one {"output": ...} per prompt, in prompt order."""
    try:
        rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    except (json.JSONDecodeError, UnicodeDecodeError):
        rows = []  # reported below, with the shape it must have
    if len(rows) < n or not all(isinstance(r, dict) and isinstance(r.get("output"), str) for r in rows):
        raise LoftError(f"{path} must hold at least {n} JSON lines like {{\"output\": \"...\"}}, one per prompt")
    return [r["output"] for r in rows[:n]]


# ---------------------------------------------------------------- the CLI's model specs
def parse_spec(spec: str) -> tuple[str, str]:
    """'NAME=WHAT' -> (NAME, WHAT); see model_outputs for what WHAT may be."""
    name, sep, what = spec.partition("=")
    if not sep or not name or not what:
        raise LoftError(f"--model {spec!r}: write NAME=MODEL, e.g. base=runs/models/smollm2-135m-instruct")
    return name, what


def add_generation_arguments(parser) -> None:
    parser.add_argument("--model", action="append", required=True, metavar="NAME=MODEL",
                        help="a model to compare (repeat): a .gguf (run under llama-server), an HF folder "
                        "(transformers), a .jsonl of saved outputs, or an endpoint http(s)://HOST/v1#MODEL_NAME")
    parser.add_argument("--api-key", default=os.environ.get("LOFT_API_KEY"),
                        help="key for endpoints (default $LOFT_API_KEY, then $OPENAI_API_KEY)")
    parser.add_argument("--max-tokens", type=int, default=256)
    parser.add_argument("--temperature", type=float, default=0.0, help="0 = greedy (default)")
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0, help="seed of generation, bootstraps and math items (default 0)")
    parser.add_argument("--no-cache", action="store_true", help="generate again even if answers are cached")


def model_outputs(spec: str, prompts: list[list[dict]], args) -> tuple[str, list[str]]:
    """Generate (or load) one model's answers to `prompts` for a CLI spec NAME=WHAT."""
    name, what = parse_spec(spec)
    gen = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, seed=args.seed)
    if args.max_tokens < 1 or args.temperature < 0 or not 0 < args.top_p <= 1:
        raise LoftError("need --max-tokens >= 1, --temperature >= 0 and 0 < --top-p <= 1")
    if what.startswith(("http://", "https://")):
        url, _, served = what.partition("#")
        identity = None if args.no_cache else f"{url}#{served or 'local'}"
        return name, openai_chat(url, prompts, served or "local", args.api_key, identity=identity, desc=name, **gen)
    path = Path(what).expanduser()
    if not path.exists():
        raise LoftError(f"--model {spec}: {path} does not exist (a .gguf, an HF folder, a .jsonl of outputs or a URL)")
    if path.suffix == ".jsonl" and path.is_file():
        return name, saved_outputs(path, len(prompts))
    if path.suffix == ".gguf" and path.is_file():
        from training.serve import llama_server

        identity = None if args.no_cache else path
        cache = _openai_cache(path.stem, identity, gen)
        if cache.path and all(_key(m) in cache.done for m in prompts):  # all answered before: no server needed
            return name, [cache.done[_key(m)] for m in prompts]
        with llama_server(path, api_key=args.api_key) as url:
            return name, openai_chat(url, prompts, path.stem, args.api_key, identity=identity, desc=name, **gen)
    if path.is_dir():
        return name, hf_chat(path, prompts, desc=name, use_cache=not args.no_cache, **gen)
    raise LoftError(f"--model {spec}: {what} is not a .gguf, an HF folder, a .jsonl of outputs or an http(s) URL")
