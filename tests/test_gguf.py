"""GGUF export of the embedded default model (SmolLM2-135M-Instruct), checked against the HF directory.

Real components only: llama.cpp's converter, llama-quantize, llama-perplexity, llama-tokenize and
llama-server from the cached build; the HF tokenizer and model from ensure_default_model().
The export runs once per session (shared with test_serve.py through the session's base temp dir).
"""

import copy
import json
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pytest

from training import llama_cpp
from training.cli import main as loft_main
from training.errors import LoftError
from training.export import QUANTS, REPORT, count_parameters, export
from training.model import ensure_default_model
from training.serve import llama_server

pytestmark = pytest.mark.slow

TEST_QUANTS = ["f16", "q8_0", "q4_k_m"]


def exported_once(tmp_path_factory) -> dict:
    """Export the default model to F16/Q8_0/Q4_K_M once per session (both test files call this)."""
    out = tmp_path_factory.getbasetemp() / "loft-gguf"
    if (out / REPORT).exists():
        return json.loads((out / REPORT).read_text())
    return export(ensure_default_model(quiet=True), out, TEST_QUANTS)


def gguf_path(report: dict, quant: str) -> Path:
    return Path(next(f["path"] for f in report["files"] if f["type"] == quant))


@pytest.fixture(scope="session")
def model_dir() -> Path:
    return ensure_default_model(quiet=True)


@pytest.fixture(scope="session")
def exported(tmp_path_factory) -> dict:
    return exported_once(tmp_path_factory)


@pytest.fixture(scope="session")
def hf_tokenizer(model_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def f16_server(exported):
    with llama_server(gguf_path(exported, "F16"), ctx=1024, parallel=1) as url:
        yield url.removesuffix("/v1")


def post(url: str, body: dict) -> dict:
    req = urllib.request.Request(url, json.dumps(body).encode(), {"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=120) as resp:
        return json.loads(resp.read())


def llama_tokenize(gguf: Path, text: str) -> list[int]:
    """llama-tokenize with the HF side's handling: special tokens parsed, no BOS added; text via stdin (verbatim)."""
    proc = subprocess.run(
        [str(llama_cpp.binary("llama-tokenize")), "-m", str(gguf), "--stdin", "--ids", "--log-disable", "--no-bos"],
        input=text.encode(), capture_output=True, env=llama_cpp.tool_env(), timeout=60,
    )
    assert proc.returncode == 0, proc.stderr.decode(errors="replace")[-2000:]
    return json.loads(proc.stdout.decode().strip().splitlines()[-1])


def gguf_fields(path: Path, keys: list[str]) -> dict:
    """Metadata values of a GGUF (scalars and strings), read straight from the header (gguf-py's reader maps
    every tensor too, seconds per file)."""
    scalar = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}

    def read(fmt):
        return struct.unpack(fmt, fh.read(struct.calcsize(fmt)))[0]

    def value(vtype):
        if vtype == 8:
            return fh.read(read("<Q")).decode("utf-8")
        if vtype == 9:
            etype, count = read("<I"), read("<Q")
            for _ in range(count):
                value(etype)
            return f"<array of {count}>"
        return read(scalar[vtype])

    found = dict.fromkeys(keys)
    with open(path, "rb") as fh:
        assert fh.read(4) == b"GGUF" and read("<I") >= 2
        read("<Q")  # tensor count
        for _ in range(read("<Q")):
            key = fh.read(read("<Q")).decode("utf-8")
            val = value(read("<I"))
            if key in found:
                found[key] = val
    return found


TEXTS = [
    "Hello, world!",
    "The quick brown fox jumps over the lazy dog.",
    "  two leading spaces,   three inside,  two trailing  ",
    "tabs\tand\nnewlines\n\n\nand\r\nCRLF\n",
    "Numbers 1234567890, 3.14159 and 1,000,000; dates 2024-06-01.",
    "Café, naïve, façade, Übermäßig, ¿qué tal?, Ångström, Œuvre",
    "東京は日本の首都です。北京欢迎你。서울",
    "emoji 🤗🚀 👍🏽 and a family 👨‍👩‍👧 and a flag 🇫🇷",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "<|endoftext|>text after eos<|im_end|>",
    "def f(x):\n    return x ** 2  # four-space indent\n",
    "To be, or not to be, that is the question:\nWhether 'tis nobler in the mind to suffer",
    "non\u00a0breaking\u2009thin and zero\u200bwidth spaces, ﬁ ligature, ™ ©",
]
# Non-ASCII numbers after a space: SmolLM2 splits every number character on its own (a Digits pre-tokenizer,
# llama.cpp's "smollm" regex \p{N}); a plain ByteLevel pre-tokenizer glues " ½" together instead.
NUMBER_TEXTS = [", ½ cup", "x² + y³ = z⁴", "see note ① and ⅞ inch", "١٢٣ and ۴۵۶", "Ⅻ o'clock"]
DIGITS_PRE_TOKENIZER = {
    "type": "Sequence",
    "pretokenizers": [
        {"type": "Digits", "individual_digits": True},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True},
    ],
}


# ---------------------------------------------------------------- the export itself
def test_export_report_and_files(exported, model_dir):
    out = Path(exported["out_dir"])
    names = sorted(p.name for p in out.iterdir())
    expected = sorted([f"{model_dir.name}-{QUANTS[q][0]}.gguf" for q in TEST_QUANTS] + [REPORT])
    assert names == expected, "only the finished files and the report, no temporaries"
    assert json.loads((out / REPORT).read_text()) == exported
    assert [(f["quant"], f["type"], f["kept"]) for f in exported["files"]] == [
        ("f16", "F16", True), ("q8_0", "Q8_0", True), ("q4_k_m", "Q4_K_M", True)]
    sizes = {f["type"]: f["bytes"] for f in exported["files"]}
    assert all(sizes[q] == gguf_path(exported, q).stat().st_size for q in sizes)
    assert sizes["F16"] > sizes["Q8_0"] > sizes["Q4_K_M"]
    params = count_parameters(sorted(model_dir.glob("*.safetensors")))
    assert abs(sizes["F16"] / (2 * params) - 1) < 0.05, "F16 is 2 bytes a parameter (plus the vocab)"


def test_perplexity_ordered(exported):
    ppl = {f["type"]: f["ppl"] for f in exported["files"]}
    rel = {f["type"]: f["ppl_vs_f16"] for f in exported["files"]}
    assert exported["eval"]["ctx"] == 128 and exported["eval"]["chunks"] >= 8
    assert all(math_ok(v) for v in ppl.values()), ppl
    tol = 0.005  # relative; a quant can land a hair under F16 on a small sample
    assert ppl["F16"] * (1 - tol) <= ppl["Q8_0"] <= ppl["Q4_K_M"] * (1 + tol), ppl
    assert rel["F16"] == 0.0 and rel["Q8_0"] < 0.03 and rel["Q4_K_M"] < 0.25, rel
    assert 5 < ppl["F16"] < 200, "a working 135M model on Shakespeare, not noise"


def math_ok(x) -> bool:
    return isinstance(x, float) and x == x and x not in (float("inf"), float("-inf"))


def test_gguf_metadata(exported, model_dir):
    keys = ["tokenizer.ggml.model", "tokenizer.ggml.pre", "tokenizer.ggml.bos_token_id", "tokenizer.ggml.eos_token_id",
            "tokenizer.ggml.add_bos_token", "tokenizer.chat_template", "llama.vocab_size", "general.architecture",
            "general.file_type"]
    template = (model_dir / "chat_template.jinja").read_text()
    for quant, file_type in (("F16", 1), ("Q8_0", 7), ("Q4_K_M", 15)):  # llama_ftype values
        meta = gguf_fields(gguf_path(exported, quant), keys)
        assert meta["general.architecture"] == "llama" and meta["llama.vocab_size"] == 49152
        assert meta["general.file_type"] == file_type
        assert meta["tokenizer.ggml.model"] == "gpt2", "byte-level BPE, not SentencePiece"
        assert meta["tokenizer.ggml.pre"] == "smollm", "the converter recognised SmolLM2's pre-tokenizer hash"
        assert (meta["tokenizer.ggml.bos_token_id"], meta["tokenizer.ggml.eos_token_id"]) == (1, 2)
        assert meta["tokenizer.ggml.add_bos_token"] is False
        assert meta["tokenizer.chat_template"] == template


# ---------------------------------------------------------------- tokenizer parity
def test_fixed_tokenizer_json(model_dir):
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    assert tok["model"]["type"] == "BPE" and tok["model"]["byte_fallback"] is False
    assert tok["decoder"]["type"] == "ByteLevel"
    assert "ByteLevel" in json.dumps(tok["pre_tokenizer"])


def test_token_ids_match_hf(exported, hf_tokenizer, f16_server):
    gguf = gguf_path(exported, "F16")
    for text in TEXTS:
        hf_ids = hf_tokenizer(text, add_special_tokens=False)["input_ids"]
        assert llama_tokenize(gguf, text) == hf_ids, f"llama-tokenize differs on {text!r}"
        served = post(f"{f16_server}/tokenize", {"content": text, "add_special": False, "parse_special": True})
        assert served["tokens"] == hf_ids, f"/tokenize differs on {text!r}"
        assert hf_tokenizer.decode(hf_ids) == text
        assert post(f"{f16_server}/detokenize", {"tokens": hf_ids})["content"] == text, f"detokenize of {text!r}"


def test_token_ids_match_hf_on_unicode_numbers(model_dir, exported, hf_tokenizer, tmp_path):
    from transformers import AutoTokenizer

    gguf = gguf_path(exported, "F16")
    llama = {text: llama_tokenize(gguf, text) for text in NUMBER_TEXTS}
    mismatched = [t for t in NUMBER_TEXTS if hf_tokenizer(t, add_special_tokens=False)["input_ids"] != llama[t]]
    pre = json.loads((model_dir / "tokenizer.json").read_text())["pre_tokenizer"]
    if mismatched and "Digits" not in json.dumps(pre):
        # Diagnose before giving up: with SmolLM2's Digits pre-tokenizer restored, HF matches llama.cpp.
        for name in ("tokenizer_config.json", "chat_template.jinja"):
            shutil.copy(model_dir / name, tmp_path / name)
        tok = json.loads((model_dir / "tokenizer.json").read_text())
        tok["pre_tokenizer"] = DIGITS_PRE_TOKENIZER
        (tmp_path / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))
        repaired = AutoTokenizer.from_pretrained(tmp_path)
        assert all(repaired(t, add_special_tokens=False)["input_ids"] == llama[t] for t in NUMBER_TEXTS)
        pytest.xfail(
            "training/model.py fix_tokenizer keeps a plain ByteLevel pre-tokenizer; SmolLM2 has Digits(individual_digits)"
            f" + ByteLevel, so HF and llama.cpp disagree on {mismatched} (refresh the cache: loft model --force)"
        )
    assert not mismatched


def test_unfixed_tokenizer_breaks_llama_cpp(model_dir, exported, tmp_path):
    """What fix_tokenizer repairs: transformers' GGUF loader writes byte_fallback=true and this decoder
    (observed with transformers 5.16), which sends convert_hf_to_gguf.py down the SentencePiece ("llama")
    vocab path; llama.cpp then aborts tokenizing any text with a space (no '▁'/<0xXX> pieces in the vocab)."""
    broken = tmp_path / "unfixed"
    broken.mkdir()
    for name in ("config.json", "generation_config.json", "tokenizer_config.json", "chat_template.jinja"):
        shutil.copy(model_dir / name, broken / name)
    (broken / "model.safetensors").symlink_to(model_dir / "model.safetensors")
    tok = json.loads((model_dir / "tokenizer.json").read_text())
    tok = copy.deepcopy(tok)
    tok["model"]["byte_fallback"] = True
    tok["decoder"] = {"type": "Sequence", "decoders": [
        {"type": "ByteFallback"}, {"type": "Fuse"}, {"type": "Replace", "pattern": {"String": "\u2581"}, "content": " "},
        {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True}]}
    (broken / "tokenizer.json").write_text(json.dumps(tok, ensure_ascii=False))

    vocab = tmp_path / "unfixed-vocab.gguf"
    llama_cpp.convert_hf_to_gguf(broken, vocab, vocab_only=True)
    meta = gguf_fields(vocab, ["tokenizer.ggml.model", "tokenizer.ggml.pre"])
    assert meta["tokenizer.ggml.model"] == "llama", "unfixed: treated as SentencePiece"
    assert meta["tokenizer.ggml.pre"] == "default"

    cmd = [str(llama_cpp.binary("llama-tokenize")), "--stdin", "--ids", "--log-disable", "--no-bos", "-m"]
    bad = subprocess.run(cmd + [str(vocab)], input=b"Hello world", capture_output=True, env=llama_cpp.tool_env())
    assert bad.returncode != 0, "llama.cpp cannot tokenize a space with the unfixed vocab"
    good = subprocess.run(cmd + [str(gguf_path(exported, "F16"))], input=b"Hello world", capture_output=True)
    assert good.returncode == 0 and json.loads(good.stdout) == [19556, 905]


# ---------------------------------------------------------------- chat template and generation
CONVERSATIONS = [
    [{"role": "user", "content": "What is the capital of France?"}],
    [{"role": "system", "content": "You answer in French."}, {"role": "user", "content": "Bonjour !"}],
    [
        {"role": "system", "content": "You continue texts in the voice of their author."},
        {"role": "user", "content": "Continue this scene.\n\nHAMLET.\nTo be, or not to be…"},
        {"role": "assistant", "content": "That is the question:\nWhether 'tis nobler"},
        {"role": "user", "content": "Again, with émojis 🤗 and 東京."},
    ],
]


def test_chat_template_matches_hf(hf_tokenizer, f16_server):
    for messages in CONVERSATIONS:
        expected = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        rendered = post(f"{f16_server}/apply-template", {"messages": messages})["prompt"]
        assert rendered == expected
        ids = post(f"{f16_server}/tokenize", {"content": rendered, "add_special": False, "parse_special": True})["tokens"]
        assert ids == hf_tokenizer(expected, add_special_tokens=False)["input_ids"]


def test_f16_greedy_answer_matches_hf(model_dir, hf_tokenizer, f16_server):
    """Greedy "What is the capital of France?": HF says "The capital of France is Paris." and so must F16.
    (Q8_0 and Q4_K_M do not: the first token is a near-tie, 'The' 0.155 vs 'L' 0.14, and they answer in
    French; test_serve uses "... Answer in one word.", which every quant answers with Paris.)"""
    import torch
    from transformers import AutoModelForCausalLM

    messages = CONVERSATIONS[0]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    inputs = hf_tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=24, do_sample=False)
    hf_answer = hf_tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
    served = post(f"{f16_server}/v1/chat/completions", {"messages": messages, "temperature": 0, "max_tokens": 24})
    answer = served["choices"][0]["message"]["content"]
    assert "Paris" in hf_answer
    assert answer == hf_answer.strip()
    assert served["choices"][0]["finish_reason"] == "stop", "stops at <|im_end|>"


# ---------------------------------------------------------------- refusals and interruption
def test_refuses_without_disk_space_before_any_work(model_dir, tmp_path, monkeypatch, capsys):
    calls = []
    full = SimpleNamespace(total=10 << 30, used=10 << 30, free=50 << 20)  # a nearly full disk: 50 MiB free
    monkeypatch.setattr(shutil, "disk_usage", lambda path: full)
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: calls.append(a) or pytest.fail("work started"))
    out = tmp_path / "no-room"
    rc = loft_main(["export", str(model_dir), "--out", str(out), "--quants", "f16,q8_0,q4_k_m"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and not calls and not out.exists()
    assert len(err.splitlines()) == 1, err
    assert re.search(r"not enough disk space in .*needs ~\d.*MiB, 50\.0 MiB is free \(\d.*MiB missing\)", err), err


def test_refuses_short_eval_text_before_any_work(model_dir, tmp_path, monkeypatch):
    monkeypatch.setattr(subprocess, "run", lambda *a, **k: pytest.fail("work started"))
    short = tmp_path / "short.txt"
    short.write_text("To be, or not to be.\n")
    with pytest.raises(LoftError, match=r"eval text is too short for perplexity: \d+ tokens, at least 256 needed"):
        export(model_dir, tmp_path / "out", ["q8_0"], short)
    assert not (tmp_path / "out").exists()


def test_interrupted_export_leaves_nothing(model_dir, tmp_path):
    """Ctrl-C (SIGINT to the process group, as a terminal sends it) while llama-quantize writes Q8_0."""
    out = tmp_path / "interrupted"
    cmd = [sys.executable, "-m", "training.cli", "export", str(model_dir), "--out", str(out), "--quants", "q8_0", "--no-ppl"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True)
    seen = None
    deadline = time.monotonic() + 300
    while proc.poll() is None and time.monotonic() < deadline:
        partial = list(out.glob(".*Q8_0.gguf.*.partial")) if out.exists() else []
        if partial:
            seen = sorted(p.name for p in out.iterdir())
            os.killpg(proc.pid, signal.SIGINT)
            break
        time.sleep(0.02)
    output = proc.communicate(timeout=120)[0].decode(errors="replace")
    assert seen, f"never saw the quantize stage:\n{output}"
    assert any(n.endswith("F16.gguf.%d.partial" % proc.pid) for n in seen), seen
    assert proc.returncode == 130, output
    assert "interrupted" in output
    assert not out.exists() or list(out.iterdir()) == [], "no partial or finished GGUF left behind"
