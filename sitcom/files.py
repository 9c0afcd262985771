"""Publishing a directory built in a temp dir: one rename, so readers never see half of it."""

from __future__ import annotations

import os
import shutil
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
