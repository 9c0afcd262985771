"""Which checkpoints an admin may switch to: the shipped `seinfeld` default, the untouched
`smollm2` base, and CHECKPOINTS_DIR/<name>/config.json.

Names are looked up in that listing, never joined onto a path as typed, so `../x`, `/etc`
or `a/b` can never reach the filesystem; entries (symlinks) resolving outside the
directory are not listed.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from sitcom.models import BASE_MODEL, TUNED_MODEL, is_model_dir

BUILT_IN = (TUNED_MODEL, BASE_MODEL)

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class CheckpointError(ValueError):
    """An unknown or unsafe checkpoint name; the message is user-facing."""


def available(checkpoints_dir: Path) -> list[str]:
    """The built-in models first, then every subdirectory holding a config.json, sorted."""
    names = []
    if checkpoints_dir.is_dir():
        names = sorted(
            p.name for p in checkpoints_dir.iterdir()
            if _NAME_RE.fullmatch(p.name) and _inside(p, checkpoints_dir) and is_model_dir(p)
        )
    return [*BUILT_IN, *(n for n in names if n not in BUILT_IN)]


def _inside(entry: Path, checkpoints_dir: Path) -> bool:
    """False for an entry (a symlink, say) that resolves outside CHECKPOINTS_DIR."""
    root = checkpoints_dir.resolve()
    target = entry.resolve()
    return target != root and target.is_relative_to(root)


def resolve(name: str, checkpoints_dir: Path) -> str:
    """A listed name -> what SceneEngine accepts; anything else -> CheckpointError."""
    name = name.strip()
    if name.lower() in BUILT_IN:
        return name.lower()
    shown = name if len(name) <= 40 else name[:40] + "…"
    if not _NAME_RE.fullmatch(name) or ".." in name:
        raise CheckpointError(
            f"`{shown}` is not a checkpoint name (letters, digits, . _ - only; no paths)."
        )
    if name not in available(checkpoints_dir):
        raise CheckpointError(f"There is no checkpoint called `{shown}`; try /checkpoint list.")
    return str((checkpoints_dir / name).resolve())


def display_name(model: str) -> str:
    """The name users see for a DEFAULT_CHECKPOINT given as a path (or hub id): its last
    component, in name characters, never the path (which tells every user where the
    operator keeps things)."""
    text = model.strip().rstrip("/\\")
    last = re.split(r"[/\\]", os.path.abspath(os.path.expanduser(text)) if text else "")[-1]
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", last).strip("-.")[:40]
    return name or "model"


def startup_model(stored: str | None, default: str, checkpoints_dir: Path) -> tuple[str, str]:
    """(name, model) to start with: the stored choice if still valid, else DEFAULT_CHECKPOINT.

    DEFAULT_CHECKPOINT is operator configuration, so besides a listed name it may be a
    directory path or hub id that is handed to the engine as is, shown by its last
    component (display_name).
    """
    if stored:
        try:
            return stored, resolve(stored, checkpoints_dir)
        except CheckpointError:
            pass
    try:
        return default, resolve(default, checkpoints_dir)
    except CheckpointError:
        return display_name(default), default
