"""Publishing files and directories built beside their target: one rename, so readers never
see half of one, and a crash leaves the old one (or none), never a torn file; locks for
building one, and reading JSON and safetensors headers that may be damaged."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO

try:
    import fcntl
except ImportError:  # pragma: no cover - Windows
    fcntl = None


def publish_dir(tmp: Path, target: Path) -> None:
    """Make `tmp` (from mkdtemp beside `target`) world-readable and rename it to `target`.

    mkdtemp and safetensors create private files, but checkpoints and the model cache are
    meant to be shared. An existing `target` is moved aside first and removed only after
    the new one is in place, so a crash never leaves a half-written directory under it.
    """
    os.chmod(tmp, 0o755)
    for path in tmp.iterdir():
        os.chmod(path, 0o644)
    old = None
    if target.exists():
        old = target.with_name(f".{target.name}.old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(target, old)
    os.replace(tmp, target)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def load_json(text: str | bytes) -> object:
    """json.loads that turns a too deeply nested document (RecursionError) into ValueError,
    so one `except ValueError` covers every unreadable file."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def read_json(path: Path) -> object:
    """The JSON document in `path`; OSError or ValueError (never RecursionError)."""
    return load_json(Path(path).read_bytes())


@contextmanager
def file_lock(path: Path, on_wait: Callable[[], None] | None = None) -> Iterator[None]:
    """Hold an exclusive flock on `path` (created if missing) for the block; `on_wait` runs
    once when another process holds it, before waiting. The lock goes with the process, so
    a kill -9 never leaves it taken. The file itself is never removed (a process may be
    waiting on it). Where fcntl is missing (Windows) this locks nothing."""
    if fcntl is None:  # pragma: no cover - POSIX only
        yield
        return
    with open(path, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if on_wait is not None:
                on_wait()
            fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def try_lock(path: Path) -> IO | None:
    """The open lock file with an exclusive flock taken, or None when another process holds
    it (or it cannot be opened). Close the file to release it."""
    if fcntl is None:  # pragma: no cover - POSIX only
        return None
    try:
        f = open(path, "a")  # noqa: SIM115 - returned to the caller, who closes it
    except OSError:
        return None
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        f.close()
        return None
    return f


def safetensors_problem(path: Path) -> str | None:
    """None when `path` is a whole safetensors file (its header parses and the data is as
    long as the header says), else what is wrong, in a few words."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                return "shorter than a safetensors header"
            n = int.from_bytes(head, "little")
            if n > size - 8:
                return "truncated (header)"
            header = load_json(f.read(n))
        if not isinstance(header, dict):
            return "not a safetensors header"
        end = 0
        for name, info in header.items():
            if name == "__metadata__":
                continue
            offsets = info.get("data_offsets") if isinstance(info, dict) else None
            if (
                not isinstance(offsets, list)
                or len(offsets) != 2
                or not all(type(o) is int and o >= 0 for o in offsets)
            ):
                return f"tensor {name[:60]!r} has no data offsets"
            end = max(end, offsets[1])
    except OSError as e:
        return f"unreadable ({e.strerror or e})"
    except (ValueError, UnicodeDecodeError):
        return "not a safetensors header"
    if 8 + n + end != size:
        return f"truncated ({size} bytes, the header says {8 + n + end})"
    return None


@contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temp file name beside `path` (`.NAME.xxxxxxxx.tmp`) to write to; when the block ends
    without an error the file is made world-readable (mkstemp makes it private) and renamed
    to `path` in one step; on an error it is removed and `path` is left as it was."""
    path = Path(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes) -> None:
    """Write `data` (text as UTF-8 with \\n line ends, or bytes) to `path` through a temp
    file and one rename: readers see the old file or the new one, never part of it."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data, encoding="utf-8", newline="\n")
        else:
            tmp.write_bytes(data)
