"""Children that die with Loft, and the partial files of writers that died.

kill -9 gives a process no chance to clean up, so both halves are arranged before the work starts:

* Children: `die_with_parent()` is a preexec_fn that asks Linux to send the child SIGTERM when its parent dies
  (PR_SET_PDEATHSIG). That covers a child with no children of its own (convert_hf_to_gguf.py, llama-quantize,
  llama-server). A child that starts its own (accelerate launches Axolotl as a grandchild, and the setting is not
  inherited across fork) runs under `python -m training.lifecycle CMD...`: a small supervisor that leads its own
  process group, dies with its parent, and takes the whole group with it.
* Files: a writer writes `.<name>.<pid>.partial` (or a `.<name>.partial-<pid>` folder) beside the final name and
  renames at the end. The next run of the same writer removes partials whose pid is no longer running.
"""

import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from pathlib import Path

PR_SET_PDEATHSIG = 1
GRACE_S = 3.0  # after SIGTERM, what a supervised group gets before SIGKILL (its parent is gone: nobody waits)


# ---------------------------------------------------------------- children
def die_with_parent(sig: int = signal.SIGTERM):
    """A preexec_fn that makes the child get `sig` when its parent dies (Linux), or None where that is impossible.

    libc's prctl is looked up here, in the parent: the child only calls it. Only for children started from the
    main thread: the signal fires when the *thread* that started the child exits, which would kill a child
    started from a short-lived worker thread."""
    if threading.current_thread() is not threading.main_thread() or not sys.platform.startswith("linux"):
        return None
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    return lambda: prctl(PR_SET_PDEATHSIG, sig)


def supervised(cmd: list[str]) -> list[str]:
    """`cmd` wrapped in the group supervisor (start it with start_new_session=True, preexec_fn=die_with_parent())."""
    return [sys.executable, "-m", "training.lifecycle", *cmd]


def _supervise(cmd: list[str]) -> int:
    """Run cmd in this process group; on SIGTERM/SIGINT/SIGHUP stop the whole group (children and theirs)."""
    child = subprocess.Popen(cmd)

    def stop(signum, frame):
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, signal.SIG_IGN)
        os.killpg(0, signal.SIGTERM)
        try:
            child.wait(GRACE_S)
        except subprocess.TimeoutExpired:
            pass
        os.killpg(0, signal.SIGKILL)  # stragglers too (a grandchild that ignores SIGTERM); this ends us as well

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, stop)
    code = child.wait()
    return code if code >= 0 else 128 - code


def stop(proc: subprocess.Popen, grace: float = 10.0) -> None:
    """SIGTERM a child we started, SIGKILL after `grace` seconds; no-op when it has exited."""
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


# ---------------------------------------------------------------- partial files
_PID = re.compile(r"\.(\d+)\.partial$|\.(?:partial|old)-(\d+)$")


def partial_path(final: Path) -> Path:
    """Where a writer of `final` puts its work until it is complete: `.<name>.<pid>.partial` beside it."""
    return final.parent / f".{final.name}.{os.getpid()}.partial"


def writer_alive(path: Path) -> bool:
    """Whether the process that named this partial (by its pid) still runs."""
    match = _PID.search(path.name)
    if not match:
        return False
    pid = int(match.group(1) or match.group(2))
    return pid == os.getpid() or Path(f"/proc/{pid}").exists()


def clear_stale(paths) -> list[Path]:
    """Remove the partial files and folders among `paths` whose writer is dead; return what was removed."""
    removed = []
    for path in paths:
        if writer_alive(path):
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append(path)
    return removed


def write_atomic(path: Path, text: str) -> Path:
    """Write a text file whole or not at all (a partial beside it, renamed at the end); stale partials go first."""
    path = Path(path)
    clear_stale(path.parent.glob(f".{path.name}.*.partial"))
    tmp = partial_path(path)
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


if __name__ == "__main__":  # the group supervisor: python -m training.lifecycle CMD...
    sys.exit(_supervise(sys.argv[1:]))
