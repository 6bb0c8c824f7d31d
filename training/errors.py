"""One error type for everything a user can get wrong, and the one place the CLI turns failures into a line.

A LoftError carries a one-line message that says what is wrong and how to fix it. `guarded()` runs a verb and
prints `loft VERB: error: ...` for a LoftError, for what the operating system refuses (a read-only folder, a
full disk, a missing file) and for a damaged file that slipped past the checks, then exits non-zero. A
traceback is left only for a real bug in Loft, where it is what a bug report needs.

Readers of user-supplied files go through `read_json` (or `damaged`), so the message names the file and the fix
where the file is read, not where a KeyError happens to surface later.
"""

import errno
import json
import os
import re
import shutil
import struct
import sys
from pathlib import Path


class LoftError(Exception):
    """A user-facing problem: bad input, a missing file, an impossible budget."""

    def __init__(self, message: str, code: int = 2):
        super().__init__(message)
        self.code = code


# What to do about each refusal; the path itself is added by os_error_line.
_OS_FIXES = {
    errno.EACCES: "permission denied; make it writable for this user (chmod/chown) or choose another location",
    errno.EPERM: "operation not permitted; make it writable for this user or choose another location",
    errno.EROFS: "the file system is read-only; write somewhere writable (--out/--run, or LOFT_CACHE for caches)",
    errno.ENOENT: "no such file or directory; check the path",
    errno.ENOTDIR: "a part of the path is a file, not a folder; check the path",
    errno.EISDIR: "it is a folder where a file was expected; pass a file",
    errno.EEXIST: "it already exists; remove it or choose another name",
    errno.ENOTEMPTY: "the folder is not empty; remove it or choose another name",
    errno.EMFILE: "too many open files; raise the limit (ulimit -n) and rerun",
}
_FULL = (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))


def _free(path: str | None) -> str:
    probe = Path(path or ".").absolute()
    while not probe.exists() and probe != probe.parent:
        probe = probe.parent
    try:
        free = shutil.disk_usage(probe).free
    except OSError:
        return ""
    return f" ({free / 2**30:.1f} GiB free there)"


def os_error_line(err: OSError) -> str:
    """One line for an OSError: the path, what the system said, and what to free or change."""
    path = err.filename if err.filename is not None else None
    where = f"{path}: " if path is not None else ""
    if err.filename2 is not None:
        where = f"{err.filename} -> {err.filename2}: "
    if err.errno in _FULL:
        return (f"{where}no space left on the device{_free(path)}; free space there (old runs/, merged_models/, "
                "*.gguf) or write to a bigger disk (--out/--run, LOFT_CACHE)")
    fix = _OS_FIXES.get(err.errno)
    if fix is None:
        fix = f"{err.strerror or err}; check the path and the disk"
    return where + fix


def as_os_error(err: Exception, path=None) -> OSError | None:
    """safetensors reports I/O failures in Rust's words (`... (os error 28)` or `Os { code: 28, ... }`): the OSError
    they stand for, or None."""
    match = re.search(r"Os \{ code: (\d+)|\(os error (\d+)\)", str(err))
    if not match:
        return None
    code = int(match.group(1) or match.group(2))
    return OSError(code, os.strerror(code), None if path is None else str(path))


def damaged(path, err: Exception, fix: str) -> LoftError:
    """A LoftError for a file that is there but cannot be read as what it should be."""
    detail = str(err).splitlines()[0][:160] if str(err) else type(err).__name__
    return LoftError(f"{path} is damaged or not the expected format ({detail}); {fix}")


def read_json(path, fix: str, kind: type = dict):
    """Parse a JSON file that must hold a `kind` (dict or list); a LoftError naming the file and `fix` if not."""
    path = Path(path)
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise LoftError(f"{path} is not valid JSON ({str(err)[:120]}); {fix}") from None
    if not isinstance(value, kind):
        raise LoftError(f"{path} holds a JSON {type(value).__name__}, not a JSON "
                        f"{'object' if kind is dict else kind.__name__}; {fix}")
    return value


def read_jsonl(path, fix: str) -> list[tuple[int, dict]]:
    """(line number, object) for each non-blank line of a JSONL file; a LoftError naming `path:line` and `fix` for
    text that is not UTF-8, a line that is not JSON, or one that is not a JSON object."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise LoftError(f"{path} is not UTF-8 text; {fix}") from None
    rows = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            raise LoftError(f"{path}:{n}: not JSON; {fix}") from None
        if not isinstance(row, dict):
            raise LoftError(f"{path}:{n}: a JSON {type(row).__name__}, not an object; {fix}")
        rows.append((n, row))
    return rows


def read_safetensors_header(path, fix: str) -> dict:
    """The header of a safetensors file ({name: {"dtype", "shape", "data_offsets"}}), read without the tensors;
    a LoftError naming the file when the header is not one or the file is shorter than the header says."""
    path = Path(path)
    on_disk = path.stat().st_size
    try:
        with open(path, "rb") as fh:
            (size,) = struct.unpack("<Q", fh.read(8))
            if size > on_disk - 8:
                raise ValueError(f"a header of {size} bytes in a {on_disk}-byte file")
            header = json.loads(fh.read(size))
        end = max((info["data_offsets"][1] for key, info in header.items() if key != "__metadata__"), default=0)
    except (struct.error, ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
        raise damaged(path, err, fix) from None
    if 8 + size + end > on_disk:
        raise LoftError(f"{path} is truncated ({on_disk:,} bytes where its header needs {8 + size + end:,}); {fix}")
    return {key: info for key, info in header.items() if key != "__metadata__"}


def _damaged_file_error(err: BaseException) -> bool:
    """Errors of file formats that a check missed: still the user's file, not a Loft bug."""
    return type(err).__name__ in ("SafetensorError", "HeaderTooLarge", "JSONDecodeError", "UnicodeDecodeError")


def guarded(prog: str, run, *args) -> int:
    """Run `run(*args)` as the verb `prog`; every expected failure becomes one line on stderr and an exit code."""
    try:
        return int(run(*args) or 0)
    except LoftError as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return err.code
    except OSError as err:
        print(f"{prog}: error: {os_error_line(err)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130
    except Exception as err:  # noqa: BLE001 (only file-format errors are turned into a line; the rest re-raise)
        disk = as_os_error(err)
        if disk is not None:
            print(f"{prog}: error: {os_error_line(disk)}", file=sys.stderr)
            return 1
        if not _damaged_file_error(err):
            raise
        print(f"{prog}: error: a file could not be read ({type(err).__name__}: {str(err)[:160]}); "
              "check the files this command was given and rerun", file=sys.stderr)
        return 2
