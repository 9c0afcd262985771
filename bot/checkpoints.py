"""Which checkpoints an admin may switch to: the shipped `seinfeld` default, the untouched
`smollm2` base, and CHECKPOINTS_DIR/<name>/ (a model or adapter checkpoint); and which humour
models rank the best-of-n candidates: the shipped `humour` and CHECKPOINTS_DIR/<name>/ made by
`python -m training humour` (a card.json of format sitcom-humour).

Names are looked up in that listing, never joined onto a path as typed, so `../x`, `/etc`
or `a/b` can never reach the filesystem; entries (symlinks) resolving outside the
directory are not listed.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from sitcom.model.catalog import BASE_MODEL, TUNED_MODEL, is_model_dir
from sitcom.scenes.humour import CARD_FILE, FORMAT

BUILT_IN = (TUNED_MODEL, BASE_MODEL)
HUMOUR_DEFAULT = "humour"  # the shipped humour model (sitcom/humour_default)
HUMOUR_OFF = "off"  # rank best-of-n candidates by the coherence checks alone

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")


class CheckpointError(ValueError):
    """An unknown or unsafe checkpoint name; the message is user-facing."""


def available(checkpoints_dir: Path) -> list[str]:
    """The built-in models first, then every subdirectory holding a config.json, sorted."""
    return _listing(checkpoints_dir, BUILT_IN, is_model_dir)


def _listing(checkpoints_dir: Path, built_in: tuple[str, ...], kind) -> list[str]:
    """`built_in` first, then the subdirectories of CHECKPOINTS_DIR that are `kind`, sorted."""
    names = []
    if checkpoints_dir.is_dir():
        names = sorted(
            p.name
            for p in checkpoints_dir.iterdir()
            if _NAME_RE.fullmatch(p.name) and _inside(p, checkpoints_dir) and kind(p)
        )
    return [*built_in, *(n for n in names if n not in built_in)]


def is_humour_dir(path: Path) -> bool:
    """A humour model directory: its card says format sitcom-humour."""
    try:
        card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(card, dict) and card.get("format") == FORMAT


def humour_available(checkpoints_dir: Path) -> list[str]:
    """The shipped humour model and `off` first, then every humour model directory, sorted."""
    return _listing(checkpoints_dir, (HUMOUR_DEFAULT, HUMOUR_OFF), is_humour_dir)


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


def startup_model(stored: str | None, default: str, checkpoints_dir: Path) -> tuple[str, str]:
    """(name, model) to start with: the stored choice if still valid, else DEFAULT_CHECKPOINT.

    DEFAULT_CHECKPOINT is operator configuration, so besides a listed name it may be a
    directory path or hub id that is handed to the engine as is (shown by its name).
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


def display_name(model: str) -> str:
    """What chat shows for a DEFAULT_CHECKPOINT that is not a listed name: a directory
    path's last part (the operator's paths are not for users), a hub id as it is."""
    path = Path(model).expanduser()
    if path.is_absolute() or model.startswith((".", "~")) or path.exists():
        return path.resolve().name or model
    return model
