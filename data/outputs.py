"""Where `python -m data` and `python -m training` may write, checked before any work.

One rule for every output: a file is (re)placed only when it is a regular file or a new
name (never a symbolic link, a device node, a pipe or a directory: renaming over one of them
would replace it, e.g. `/dev/full` by a plain file); a directory that a command replaces is a
real directory or a new name; and nothing a command deletes or replaces may be, or hold,
one of its inputs (the corpus, the checkpoint it reads).
"""

from __future__ import annotations

import os
import stat
from collections.abc import Callable, Iterable
from pathlib import Path

# The files a corpus directory consists of (`training.corpus.load_corpus` reads them).
CORPUS_FILES = ("train.txt", "val.txt", "manifest.json")


class OutputPathError(ValueError):
    """An output path the command must not write; the message is user-facing."""


def _lstat(path: Path) -> os.stat_result | None:
    try:
        return os.lstat(path)
    except (FileNotFoundError, NotADirectoryError):
        return None


def kind_of(mode: int) -> str:
    """What a non-regular file is, in words."""
    if stat.S_ISLNK(mode):
        return "a symbolic link"
    if stat.S_ISDIR(mode):
        return "a directory"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device node"
    if stat.S_ISFIFO(mode):
        return "a named pipe"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "not a regular file"


def _check_parent(path: Path, label: str) -> None:
    """The nearest existing folder above `path` is a folder we may write into (missing
    folders below it are created)."""
    parent = Path(os.path.abspath(path)).parent
    while not os.path.lexists(parent):
        parent = parent.parent
    if not parent.is_dir():
        raise OutputPathError(f"{label} {path}: {parent} is a file, not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputPathError(f"{label} {path}: cannot write into {parent}")


def check_output_file(path: Path, label: str) -> None:
    """`path` may be written (atomically replaced): a regular file or a new name.

    `label` names it for the message, e.g. "--json"."""
    path = Path(path)
    st = _lstat(path)
    if st is not None and not stat.S_ISREG(st.st_mode):
        raise OutputPathError(
            f"{label} {path} is {kind_of(st.st_mode)}, not a regular file: refusing to replace it"
        )
    _check_parent(path, label)


def check_output_dir(path: Path, label: str, overwrite: bool) -> None:
    """`path` may be replaced by a new directory: a new name, or with `overwrite` an
    existing real directory (not a link to one, not a file)."""
    path = Path(path)
    st = _lstat(path)
    if st is not None:
        if not stat.S_ISDIR(st.st_mode):
            kind = "a file" if stat.S_ISREG(st.st_mode) else kind_of(st.st_mode)
            raise OutputPathError(f"{label} {path} is {kind}, not a directory; choose another name")
        if not overwrite:
            raise OutputPathError(f"{path} already exists: pass --overwrite to replace it")
    _check_parent(path, label)


def _resolved(path: Path) -> Path:
    return Path(os.path.realpath(os.path.abspath(path)))


def refuse_overlap(
    replaced: Iterable[Path], inputs: dict[str, Iterable[Path]], label: str, out: Path
) -> None:
    """OutputPathError if a path the command deletes or replaces (`replaced`) is, or holds,
    one of the inputs' paths. `inputs` maps a description ("the corpus --data D") to the
    paths it consists of; symbolic links are followed, so a link to an input counts."""
    replaced = [_resolved(p) for p in replaced]
    for what, paths in inputs.items():
        for path in paths:
            kept = _resolved(path)
            for gone in replaced:
                if kept == gone or kept.is_relative_to(gone):
                    raise OutputPathError(f"{label} {out} would replace {what}: write it elsewhere")


def published_paths(out: Path) -> list[Path]:
    """What publishing a directory at `out` deletes or replaces: `out` itself and the name it
    is moved aside to first (sitcom.files.publish_dir)."""
    out = Path(out)
    return [out, out.with_name(f".{out.name}.old")]


def corpus_paths(data: Path | None) -> list[Path]:
    """A corpus directory and the files it consists of ([] for None)."""
    if data is None:
        return []
    data = Path(data)
    return [data, *(data / name for name in CORPUS_FILES)]


def local_dir(name: Path | str | None) -> list[Path]:
    """[the directory] when `name` is a local directory, else [] (a hub id, a packaged
    model's name)."""
    return [Path(name)] if name is not None and Path(name).is_dir() else []


def dir_files(directory: Path | str | None, keep: Callable[[Path], bool]) -> list[Path]:
    """A local directory and the files directly in it for which keep(path) is true; [] when
    `directory` is not a local directory."""
    if not local_dir(directory):
        return []
    directory = Path(directory)
    return [directory, *(p for p in directory.iterdir() if keep(p))]
