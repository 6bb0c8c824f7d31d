"""Supervising a server process: a free port, start with its log in a file, wait for /health, stop it and its
children, and the last lines of its log when it fails.

`Server` runs one command in its own session (Ctrl-C reaches Loft only; Loft stops the child deliberately) with a
parent-death signal, so a killed `loft serve` or test run leaves no server behind. stop() sends SIGTERM, SIGKILL
after a grace period, then SIGKILL to whatever is left in the child's process group (vLLM's engine core and
workers). `serving()` turns a started Server into a `with` block that yields its OpenAI base URL.
"""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from training import lifecycle
from training.errors import LoftError

STARTUP_TIMEOUT = 300.0


# ---------------------------------------------------------------- ports
def client_host(host: str) -> str:
    """Where a local client connects for a server bound to `host`."""
    return "127.0.0.1" if host in ("0.0.0.0", "", "::") else host


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((client_host(host), 0))
        return s.getsockname()[1]


def port_in_use(host: str, port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        return s.connect_ex((client_host(host), port)) == 0


def check_port(host: str, port: int | None) -> None:
    if port is not None and port_in_use(host, port):
        raise LoftError(f"port {port} is already in use on {host}; stop what runs there, or pick another (--port 0: any free port)")


def _health(url: str, timeout: float = 2.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status
    except urllib.error.HTTPError as err:
        return err.code
    except (urllib.error.URLError, OSError):
        return None


# ---------------------------------------------------------------- logs and signals
def temp_log(prefix: str) -> Path:
    fd, name = tempfile.mkstemp(prefix=prefix, suffix=".log")
    os.close(fd)
    return Path(name)


def tail(text_or_path, lines: int = 20) -> str:
    """The last lines of a log (a string or a file path), for error messages."""
    if isinstance(text_or_path, Path):
        try:
            text = text_or_path.read_text(errors="replace")
        except OSError:
            return ""
    else:
        text = text_or_path or ""
    text = text.replace("\r", "\n")
    return "\n".join([l for l in text.splitlines() if l.strip()][-lines:])


def _raise_interrupt(signum, frame):
    raise KeyboardInterrupt


@contextlib.contextmanager
def signals_as_keyboard_interrupt():
    """Within the block, SIGINT and SIGTERM raise KeyboardInterrupt, so cleanup code runs for both
    (even when SIGINT was ignored at startup, as for `cmd &` in a script). No-op outside the main thread."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    for sig in previous:
        signal.signal(sig, _raise_interrupt)
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# ---------------------------------------------------------------- the supervised server
class Server:
    """A supervised server process: start(), wait_ready(), stop(). Its log goes to a file."""

    def __init__(self, cmd: list[str], env: dict, root_url: str, log_path: Path, name: str):
        self.cmd, self.env, self.log_path, self.name = cmd, env, Path(log_path), name
        self.root_url = root_url  # native endpoints: /health, /tokenize, /metrics ...
        self.base_url = root_url + "/v1"  # the OpenAI base_url
        self.health_url = root_url + "/health"
        self.proc: subprocess.Popen | None = None
        self.diagnose = None  # log text -> the one line that explains a failed start, or None

    def start(self) -> "Server":
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(
            self.cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
            start_new_session=True,  # Ctrl-C reaches us only; we stop the child deliberately
            preexec_fn=lifecycle.die_with_parent(),  # a killed `loft serve` (or test run) leaves no server behind
        )
        return self

    def log_tail(self, lines: int = 20) -> str:
        return tail(self.log_path, lines)

    def wait_ready(self, timeout: float = STARTUP_TIMEOUT) -> None:
        """Poll /health until 200; raise LoftError if the process exits or the timeout passes."""
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                why = self.diagnose(self.log_tail(200)) if self.diagnose else None
                if why:
                    raise LoftError(f"{why} (log: {self.log_path})")
                print(self.log_tail(), file=sys.stderr)
                raise LoftError(f"{self.name} exited with code {code} before it was ready (log: {self.log_path})")
            if _health(self.health_url) == 200 and self.proc.poll() is None:
                return
            if time.monotonic() > deadline:
                print(self.log_tail(), file=sys.stderr)
                raise LoftError(f"{self.name} was not ready after {timeout:.0f}s (log: {self.log_path})")
            time.sleep(0.2)

    def start_and_wait(self, timeout: float = STARTUP_TIMEOUT) -> "Server":
        """start() then wait_ready(); a server that fails to come up is stopped before the error leaves."""
        self.start()
        try:
            self.wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self.proc:
            lifecycle.stop(self.proc, grace)
            # The server's own children (vLLM's engine core and workers) share its session: none may outlive it.
            deadline = time.monotonic() + 5
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, signal.SIGKILL)
                while time.monotonic() < deadline:  # until the killed ones are reaped (signal 0 only asks)
                    os.killpg(self.proc.pid, 0)
                    time.sleep(0.1)
        if getattr(self, "_log", None):
            self._log.close()


@contextlib.contextmanager
def serving(server: Server, keep_log: bool):
    """Yield the server's OpenAI base URL; stop it afterwards and drop its temp log unless asked to keep it."""
    try:
        yield server.base_url
    finally:
        server.stop()
        if not keep_log:
            server.log_path.unlink(missing_ok=True)
