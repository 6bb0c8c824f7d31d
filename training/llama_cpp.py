"""Helpers around the cached llama.cpp build (setup/build_llama_cpp.sh): find it, run its tools.

The build lives in $LOFT_CACHE/llama.cpp/<pin>/ (see training/paths.py); the pin is the one in
setup/llama_cpp_source.sh (LLAMA_CPP_PYTHON_VERSION overrides it, as it does for the build scripts).

convert_hf_to_gguf.py always runs with the venv's python and PYTHONPATH=<src>/gguf-py, so it imports the
gguf-py it was written against, never the (possibly different) `gguf` wheel installed in the venv.

The CPU tools run with OMP_WAIT_POLICY=PASSIVE unless the caller set it: the build uses OpenMP, whose
threads spin while waiting, and on a CPU shared with anything else (a training run, a second server) the
spinning threads starve each other. Measured on the 2-core dev box next to a training job: 16-token greedy
answer 3.6 s -> 0.3 s, perplexity pass 23 s -> 8 s.
"""

import functools
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

from training.errors import LoftError
from training.lifecycle import die_with_parent
from training.paths import REPO, cache_dir
from training.process import tail

PIN_SCRIPT = REPO / "setup" / "llama_cpp_source.sh"
TOOLS = ("llama-server", "llama-quantize", "llama-perplexity", "llama-tokenize")
SETUP_HINT = "run `make setup` (or `bash setup/build_llama_cpp.sh`)"


def pinned_version() -> str:
    """The llama-cpp-python version whose vendored llama.cpp the build script compiles."""
    if os.environ.get("LLAMA_CPP_PYTHON_VERSION"):
        return os.environ["LLAMA_CPP_PYTHON_VERSION"]
    try:
        text = PIN_SCRIPT.read_text()
    except OSError:
        raise LoftError(f"{PIN_SCRIPT} is missing; it pins the llama.cpp version (restore it from git)") from None
    match = re.search(r'LLAMA_CPP_PYTHON_VERSION="\$\{LLAMA_CPP_PYTHON_VERSION:-([^}"]+)\}"', text)
    if not match:
        raise LoftError(f"cannot find the llama.cpp pin (LLAMA_CPP_PYTHON_VERSION) in {PIN_SCRIPT}")
    return match.group(1)


def llama_cpp_dir(check: bool = True) -> Path:
    """$LOFT_CACHE/llama.cpp/<pin>; with check, raise a LoftError unless every tool and the converter are there."""
    root = cache_dir() / "llama.cpp" / pinned_version()
    if check:
        missing = [t for t in TOOLS if not os.access(root / "bin" / t, os.X_OK)]
        if not (root / "src" / "convert_hf_to_gguf.py").is_file():
            missing.append("convert_hf_to_gguf.py")
        if missing:
            raise LoftError(f"llama.cpp is not built in {root} (missing {', '.join(missing)}); {SETUP_HINT}")
    return root


def ui_dir() -> Path | None:
    """llama-server's chat web page, built by setup/build_llama_ui.sh, or None when it is not built."""
    root = cache_dir() / "llama-ui" / pinned_version()
    return root if (root / "index.html").is_file() else None


def binary(name: str) -> Path:
    """Path of one llama.cpp tool (llama-server, llama-quantize, llama-perplexity, llama-tokenize)."""
    if name not in TOOLS:
        raise ValueError(f"unknown llama.cpp tool {name!r}; the build has {', '.join(TOOLS)}")
    return llama_cpp_dir() / "bin" / name


def convert_script() -> Path:
    return llama_cpp_dir() / "src" / "convert_hf_to_gguf.py"


def lora_convert_script() -> Path:
    """convert_lora_to_gguf.py from the same tree (PEFT LoRA -> GGUF LoRA for llama-server --lora)."""
    script = llama_cpp_dir() / "src" / "convert_lora_to_gguf.py"
    if not script.is_file():
        raise LoftError(f"{script} is missing (a llama.cpp cache from before adapters were served); {SETUP_HINT}")
    return script


def tool_env(extra: dict | None = None) -> dict:
    """Environment for llama.cpp processes: ours, plus passive OpenMP waiting unless already chosen."""
    env = dict(os.environ)
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    env.update(extra or {})
    return env


def converter_env() -> dict:
    """Environment for convert_hf_to_gguf.py: the vendored gguf-py first on PYTHONPATH, offline hub."""
    src = llama_cpp_dir() / "src"
    path = [str(src / "gguf-py")]
    if os.environ.get("PYTHONPATH"):
        path.append(os.environ["PYTHONPATH"])
    env = tool_env({"PYTHONPATH": os.pathsep.join(path), "HF_HUB_OFFLINE": "1"})
    env.pop("NO_LOCAL_GGUF", None)  # the converter would then skip its own gguf-py
    return env


@functools.lru_cache(maxsize=None)
def help_text(name: str) -> str:
    """`<tool> --help` output, to check which flags this build knows (flags come and go between versions)."""
    proc = subprocess.run([str(binary(name)), "--help"], capture_output=True, text=True, timeout=60, env=tool_env())
    return proc.stdout + proc.stderr


def supports_flag(name: str, flag: str) -> bool:
    """True when `flag` (e.g. "-cb", "--no-webui") appears as an option in the tool's --help."""
    return re.search(rf"(^|[\s,]){re.escape(flag)}([\s,=]|$)", help_text(name), re.MULTILINE) is not None


def has_gpu() -> bool:
    """An NVIDIA GPU is usable when nvidia-smi exists and lists one."""
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        proc = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=20)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and "GPU" in proc.stdout


_PROGRESS = re.compile(r"\d+%\||\[\d+/\d+\]|^Writing:|\d+(\.\d+)?[kMG]?(/s|B/s|it/s)\]?$")
_FAILURE = re.compile(r"(Error|Exception|error|failed|FAILED|cannot|unable|No space|Killed)")


def reason(output, code: int) -> str:
    """Why a tool failed, from its output: the last error-like line, never a progress bar ("Writing: 50%|...")."""
    lines = [line.strip() for line in tail(output, 200).splitlines() if not _PROGRESS.search(line.strip())]
    errors = [line for line in lines if _FAILURE.search(line)]
    if errors:
        return errors[-1][:300]
    return lines[-1][:300] if lines else f"exit code {code}"


def server_command(
    gguf_path,
    host: str,
    port: int,
    ctx: int,
    parallel: int,
    gpu_layers: int | None = None,
    threads: int | None = None,
    alias: str | None = None,
    loras: list | None = None,
    ui: Path | None = None,
) -> list[str]:
    """The llama-server argv for `loft serve` (the API key is not in it: it goes through the LLAMA_API_KEY variable).
    loras: GGUF LoRA files, loaded at scale 0, so a request answers as the base unless it names an adapter."""
    gguf_path = Path(gguf_path)
    server = "llama-server"
    cmd = [str(binary(server)), "-m", str(gguf_path), "--alias", alias or gguf_path.stem]
    cmd += ["--host", host, "--port", str(port)]
    cmd += ["-c", str(ctx * parallel), "--parallel", str(parallel)]  # ctx is split across slots
    if supports_flag(server, "-cb"):
        cmd.append("-cb")
    if supports_flag(server, "--jinja"):
        cmd.append("--jinja")
    if supports_flag(server, "-fa"):
        cmd += ["-fa", "auto"]
    if ui is not None:
        cmd += ["--path", str(ui)]  # the chat page built from this tree (setup/build_llama_ui.sh)
    for flag in ("--no-slots", "--metrics") if ui is not None else ("--no-webui", "--no-slots", "--metrics"):
        if supports_flag(server, flag):
            cmd.append(flag)
    if gpu_layers is None and has_gpu():
        gpu_layers = 999
    if gpu_layers is not None:
        cmd += ["-ngl", str(gpu_layers)]
    if threads:
        cmd += ["--threads", str(threads)]
    for path in loras or []:
        # Scale 0, so a request answers as the base unless its "lora" field switches an adapter on. (With --lora
        # and --lora-init-without-apply, this llama-server still applies the adapter to requests that name none.)
        cmd += ["--lora-scaled", f"{path}:0"]
    return cmd



def convert_hf_to_gguf(
    model_dir: Path, outfile: Path, outtype: str = "f16", vocab_only: bool = False, log: Path | None = None
) -> None:
    """Run llama.cpp's convert_hf_to_gguf.py on an HF directory. Output and errors go to `log` when given.

    Raises LoftError (with the converter's last lines on stderr) when it fails.
    """
    model_dir, outfile = Path(model_dir), Path(outfile)
    cmd = [sys.executable, str(convert_script()), str(model_dir), "--outfile", str(outfile), "--outtype", outtype]
    cmd += ["--model-name", model_dir.name]
    if vocab_only:
        cmd.append("--vocab-only")
    if log is not None:
        with open(log, "w") as fh:
            proc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=converter_env(),
                                  preexec_fn=die_with_parent())
        output = log
    else:
        proc = subprocess.run(cmd, capture_output=True, text=True, env=converter_env(), preexec_fn=die_with_parent())
        output = proc.stdout + proc.stderr
    if proc.returncode != 0:
        last = tail(output, 15)
        print(last, file=sys.stderr)
        why = reason(output, proc.returncode)
        if "pre-tokenizer" in last or "BPE pre-tokenizer" in last:
            why += " (the tokenizer's pre-tokenizer hash is unknown to this llama.cpp)"
        if proc.returncode < 0:
            why = f"killed by signal {-proc.returncode} ({why})"
        raise LoftError(f"convert_hf_to_gguf.py failed on {model_dir}: {why}")
