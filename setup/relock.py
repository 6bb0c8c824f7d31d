#!/usr/bin/env python3
"""Regenerate the GPU lock files (setup/requirements/cu130.txt, cu128.txt) from cpu.txt.

cpu.txt is the source of truth for every version except torch and what torch itself pins (its CUDA runtime
wheels, triton, setuptools). For each GPU profile this script swaps torch, asks pip's own resolver (against PyPI,
`pip install --dry-run --ignore-installed --report`) for Python 3.11 and 3.12 on this Linux x86_64 machine,
keeps cpu.txt's packages plus torch's dependency closure, and writes the lock with the sha256 of every wheel pip
chose (so the hashes come from pip's report, not from a separate lookup). The two Pythons must agree on versions.

cu128: torch 2.12+ ships no CUDA 12.8 build, so the profile uses torch 2.11.0 (the oldest Axolotl 0.19.0 accepts).
Its +cu128 wheel lives only on download.pytorch.org, unreachable from where this runs, so the resolve uses
PyPI's torch 2.11.0 for everything else (same triton and setuptools pins) and the lock names torch==2.11.0+cu128
with no hash; install.sh installs torch from the PyTorch index first, with the CUDA 12 wheels torch pins itself.

Usage: python3 setup/relock.py [cu130] [cu128] [--pythons 3.11,3.12]   (network: PyPI; ~3 minutes per resolve)
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
REQS = HERE / "requirements"
sys.path.insert(0, str(HERE))
import plan  # noqa: E402  (setup/plan.py: profile table and lock parsing)

PYPI = "https://pypi.org/simple"
# torch's CUDA runtime on PyPI (cu13 builds): dropped from the cu128 lock, where torch brings its own cu12 wheels.
CUDA_RUNTIME = re.compile(r"^(cuda-toolkit|cuda-bindings|cuda-pathfinder|nvidia-(?!ml-py).*)$")


def resolve(python: str, reqs: list[str], work: Path) -> dict:
    """pip's installation report for reqs on `python` (a fresh venv with a current pip; PyPI only)."""
    venv = work / f"venv{python}"
    exe = plan.find_python(python)
    if not exe:
        sys.exit(f"relock: python{python} not found (pyenv or apt can provide it)")
    subprocess.run([exe, "-m", "venv", str(venv)], check=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    env["PIP_CONFIG_FILE"] = os.devnull  # no local find-links or file:// indexes: PyPI only
    pip = [str(venv / "bin" / "python"), "-m", "pip"]
    subprocess.run(pip + ["install", "-q", "--index-url", PYPI, "-U", "pip"], check=True, env=env)
    req_file, report = work / f"req{python}.txt", work / f"report{python}.json"
    req_file.write_text("\n".join(reqs) + "\n")
    print(f"relock: resolving {len(reqs)} requirements for Python {python} (a few minutes)", flush=True)
    subprocess.run(pip + ["install", "-q", "--dry-run", "--ignore-installed", "--index-url", PYPI,
                          "--report", str(report), "-r", str(req_file)], check=True, env=env)
    return json.loads(report.read_text())


def torch_closure(items: dict) -> set[str]:
    """Names reachable from torch through Requires-Dist, following the extras each requirement asks for (torch
    wants cuda-toolkit[cublas,cudart,...], whose CUDA wheels hang off those extras). Other markers are not
    evaluated: only packages pip's report installs count, and pip evaluated them."""
    seen, todo = set(), [("torch", frozenset())]
    while todo:
        name, extras = todo.pop()
        if (name, extras) in seen or name not in items:
            continue
        seen.add((name, extras))
        for req in items[name]["metadata"].get("requires_dist") or []:
            m = re.search(r"""extra\s*==\s*["']([^"']+)["']""", req)
            if m and m[1] not in extras:
                continue
            head = re.match(r"([A-Za-z0-9][\w.\-]*)\s*(?:\[([^\]]*)\])?", req)
            wanted = frozenset(e.strip() for e in (head[2] or "").split(",") if e.strip())
            todo.append((plan.norm(head[1]), wanted))
    return {name for name, _ in seen}


def relock(profile: str, pythons: list[str]) -> Path:
    spec = plan.PROFILES[profile]
    cpu = plan.read_lock(REQS / "cpu.txt")
    reqs = [f"{p.name}=={p.version}" for p in cpu.pins if plan.norm(p.name) not in ("torch", "triton")]
    reqs.append(f"torch=={spec['torch_pypi']}")
    keep = {plan.norm(p.name) for p in cpu.pins}
    chosen: dict[str, dict] = {}  # norm name -> {name, version, hashes, sdist}
    with tempfile.TemporaryDirectory() as tmp:
        for py in pythons:
            report = resolve(py, reqs, Path(tmp))
            items = {plan.norm(i["metadata"]["name"]): i for i in report["install"]}
            wanted = (keep | torch_closure(items)) - {"pip"}
            for key in sorted(wanted & items.keys()):
                meta, info = items[key]["metadata"], items[key]["download_info"]
                entry = chosen.setdefault(key, {"name": meta["name"], "version": meta["version"],
                                                "hashes": set(), "sdist": False})
                if entry["version"] != meta["version"]:
                    sys.exit(f"relock: {meta['name']} resolves to {entry['version']} and {meta['version']} on "
                             f"different Pythons; pin it in cpu.txt")
                entry["hashes"].add(info["archive_info"]["hashes"]["sha256"])
                entry["sdist"] |= not info["url"].endswith(".whl")
    if profile == "cu128":
        chosen = {k: v for k, v in chosen.items() if not CUDA_RUNTIME.match(k)}
        chosen["torch"] = {"name": "torch", "version": spec["torch"], "hashes": set(), "sdist": False}
    missing = keep - chosen.keys() - {"triton"}
    if missing:
        sys.exit(f"relock: cpu.txt packages missing from the resolve: {sorted(missing)}")
    return write_lock(profile, spec, chosen, pythons)


def write_lock(profile: str, spec: dict, chosen: dict, pythons: list[str]) -> Path:
    sdists = sorted(v["name"] for v in chosen.values() if v["sdist"])
    lines = [
        f"# {profile} profile lock: axolotl 0.19.0 and every package it pulls in, Linux x86_64, Python "
        + " and ".join(pythons) + ".",
        f"# torch {spec['torch']}: {spec['torch_note']}.",
        "# Generated by: python3 setup/relock.py " + profile + " (from cpu.txt; edit cpu.txt, then rerun).",
        "# Installed with --no-deps: this file is the whole set. Hashes are those of the files pip chose for",
        "# cp311/cp312 on glibc >= 2.35; a host that picks another file fails loudly on the hash.",
        f"# loft-torch-index: {spec['index']}",
        f"# loft-sdist-only: {' '.join(sdists)}",
    ]
    if profile == "cu128":
        lines.append("# torch has no hash: its +cu128 wheel is only on the PyTorch index, unreadable from here.")
    for key in sorted(chosen, key=lambda k: k.lower()):
        v = chosen[key]
        line = f"{v['name']}=={v['version']}"
        hashes = sorted(v["hashes"])
        if hashes:
            line += " \\\n" + " \\\n".join(f"    --hash=sha256:{h}" for h in hashes)
        lines.append(line)
    out = REQS / f"{profile}.txt"
    out.write_text("\n".join(lines) + "\n")
    print(f"relock: wrote {out} ({len(chosen)} pins, sdist-only: {', '.join(sdists) or 'none'})")
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("profiles", nargs="*", default=["cu130", "cu128"], choices=["cu130", "cu128"])
    ap.add_argument("--pythons", default="3.11,3.12", help="comma-separated, e.g. 3.11,3.12")
    args = ap.parse_args()
    for profile in args.profiles:
        relock(profile, args.pythons.split(","))


if __name__ == "__main__":
    main()
