"""kill -9 of `loft train` and `loft export`: no child survives it for 5 s, and the next run is clean.

SIGKILL gives the killed process no chance to clean up, so what is checked is what was arranged before: the
children die with their parent (a parent-death signal; Axolotl under accelerate through a group supervisor), and
the next run removes the partial files the killed one left. Real parts: the demo recipe on the embedded SmolLM2
(Axolotl, a few CPU steps) and the cached llama.cpp converter.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from training.model import ensure_default_model
from training.paths import REPO, RUNS

pytestmark = pytest.mark.slow

DEMO = REPO / "recipes" / "smollm2-135m" / "lora-cpu.yaml"


def processes() -> dict[int, tuple[int, str, str]]:
    """pid -> (parent pid, state, command line) of every process, read from /proc."""
    out = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
            cmd = (stat.parent / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        fields = text[text.rindex(")") + 2:].split()
        out[int(stat.parent.name)] = (int(fields[1]), fields[0], cmd)
    return out


def descendants(pid: int) -> dict[int, str]:
    table = processes()
    found, todo = {}, [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _, cmd) in table.items():
            if ppid == parent and child not in found:
                found[child] = cmd
                todo.append(child)
    return found


def alive(pids) -> dict[int, str]:
    """The pids still running (a zombie waiting for its reaper has stopped running: not counted)."""
    table = processes()
    return {p: table[p][2] for p in pids if p in table and table[p][1] not in ("Z", "X")}


def wait_for(condition, timeout: float, proc: subprocess.Popen, what: str, log: Path):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        if proc.poll() is not None:
            pytest.fail(f"exited ({proc.returncode}) before {what}:\n{log.read_text(errors='replace')[-3000:]}")
        time.sleep(0.1)
    os.killpg(proc.pid, signal.SIGKILL)
    pytest.fail(f"no {what} within {timeout:.0f}s:\n{log.read_text(errors='replace')[-3000:]}")


def kill_and_check(proc: subprocess.Popen, children: dict[int, str]) -> None:
    """SIGKILL `loft` alone (not its group: the children must go by themselves), then none may live 5 s later."""
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    deadline = time.monotonic() + 5
    while alive(children) and time.monotonic() < deadline:
        time.sleep(0.1)
    left = alive(children)
    for pid in left:  # do not leave them running on the test machine either
        os.kill(pid, signal.SIGKILL)
    assert not left, f"still running 5 s after kill -9 of loft: {left}"


def loft(*args: str, log: Path) -> subprocess.Popen:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    return subprocess.Popen([sys.executable, "-m", "training.cli", *args], cwd=REPO, env=env,
                            stdout=open(log, "w"), stderr=subprocess.STDOUT, start_new_session=True)


def test_kill_9_train_stops_axolotl_and_resume_continues(tmp_path):
    from training.demo import ensure_demo_data

    ensure_default_model(quiet=True)
    ensure_demo_data()
    name = f"kill-test-{os.getpid()}"
    run = RUNS / name
    # no held-out evaluation: it is the slowest part of a 4-step run and nothing here needs it
    args = ["train", str(DEMO), "--name", name, "--no-check", "--set", "max_steps=4", "--set", "save_steps=1",
            "--set", "test_datasets=", "--set", "eval_steps=", "--set", "eval_strategy=\"no\""]
    try:
        log = tmp_path / "first.log"
        proc = loft(*args, log=log)
        wait_for(lambda: list((run / "adapter").glob("checkpoint-*/trainer_state.json")), 600, proc,
                 "a checkpoint", log)
        children = descendants(proc.pid)
        assert any("axolotl.cli.train" in cmd for cmd in children.values()), children
        kill_and_check(proc, children)
        assert not (run / "adapter" / "adapter_model.safetensors").exists(), "the run was cut before its end"
        first = (run / "train.log").read_text(errors="replace")

        log = tmp_path / "resumed.log"
        proc = loft(*args, "--resume", log=log)
        assert proc.wait(timeout=900) == 0, log.read_text(errors="replace")[-3000:]
        text = (run / "train.log").read_text(errors="replace")
        assert text.startswith(first), "the resumed run appends to train.log; the first run's lines are kept"
        assert "loft train --resume" in text[len(first):]
        assert "resume from checkpoint at" in text[len(first):], "Axolotl resumed from the saved checkpoint"
        assert (run / "adapter" / "adapter_model.safetensors").exists()
    finally:
        subprocess.run(["rm", "-rf", str(run)], check=False)


def test_kill_9_export_stops_the_converter_and_the_rerun_clears_its_partial(tmp_path):
    model = ensure_default_model(quiet=True)
    out = tmp_path / "gguf"
    args = ["export", str(model), "--out", str(out), "--quants", "f16", "--no-ppl"]
    log = tmp_path / "first.log"
    proc = loft(*args, log=log)

    def converting():
        partial = [p for p in out.glob(".*F16.gguf.*.partial") if p.stat().st_size > 0] if out.exists() else []
        kids = descendants(proc.pid)
        return partial and any("convert_hf_to_gguf" in cmd for cmd in kids.values()) and kids

    children = wait_for(converting, 300, proc, "the converter writing F16", log)
    kill_and_check(proc, children)
    stale = [p.name for p in out.iterdir()]
    assert any(n.endswith(".partial") for n in stale), stale  # what kill -9 leaves: a partial, never a final name
    assert not list(out.glob("*.gguf")), "no finished-looking GGUF after a kill"

    log = tmp_path / "rerun.log"
    proc = loft(*args, log=log)
    assert proc.wait(timeout=600) == 0, log.read_text(errors="replace")[-3000:]
    assert "left by an export that was killed" in log.read_text()
    assert sorted(p.name for p in out.iterdir()) == sorted([f"{model.name}-F16.gguf", "export-report.json"])
