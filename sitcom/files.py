"""Publishing files and directories built beside their target: one rename, so readers never
see half of one, and a crash leaves the old one (or none), never a torn file."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


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
