"""The model cache (SITCOM_CACHE, default ~/.cache/sitcom): entries that look after themselves.

An entry (a dequantized base, the shipped default's merge or adapter checkpoint) is built in
a hidden temp dir under a lock file (`.ENTRY.lock`, fcntl.flock), so of two starts at once
one builds and the other waits for it; temp dirs a killed build left are removed once their
lock is free; an entry is checked before it is served (JSON parses, safetensors and GGUF
complete) and built again when damaged. What goes in an entry is sitcom.model.catalog's.
"""

from __future__ import annotations

import logging
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

from sitcom.config import sitcom_config
from sitcom.files import file_lock, publish_dir, read_json, safetensors_problem, try_lock
from sitcom.model.adapters import ADAPTER_CARD
from sitcom.model.errors import ModelLoadError
from sitcom.model.gguf_merge import MERGED_GGUF
from sitcom.model.lora_gguf import ADAPTER_GGUF

ADAPTER_CONFIG = "adapter_config.json"  # peft's LoraConfig
log = logging.getLogger(__name__)


def cache_root() -> Path:
    """SITCOM_CACHE (sitcom.config), default ~/.cache/sitcom."""
    return sitcom_config().cache


def remove_stale_temp_dirs(root: Path | None = None) -> list[Path]:
    """Delete the hidden temp dirs a killed build left in the model cache (`.ENTRY-xxxxxxxx`
    from mkdtemp, `.ENTRY.old` from publish_dir): hundreds of MB each. Only stale ones: a
    builder holds ENTRY's lock for as long as its temp dir exists, so a dir whose lock can
    be taken has no live builder."""
    root = Path(root or cache_root())
    try:
        entries = sorted(p for p in root.iterdir() if _STALE_RE.fullmatch(p.name))
    except OSError:
        return []
    removed = []
    for path in entries:
        if path.is_symlink() or not path.is_dir():
            continue
        lock = try_lock(root / f".{_STALE_RE.fullmatch(path.name)['entry']}.lock")
        if lock is None:  # a build in progress (or a cache we cannot write): leave it
            continue
        try:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
        finally:
            lock.close()
    if removed:
        log.info("removed %d half-built model cache dir(s) from %s", len(removed), root)
    return removed


_STALE_RE = re.compile(
    r"\.(?P<entry>smollm2-135m-instruct|gemma3-hf|seinfeld-[0-9a-f]{12})(?:-[a-z0-9_]{8}|\.old)"
)


def cache_problem(target: Path, gguf: bool, adapter: bool = False) -> str | None:
    """None when the cache entry `target` is whole: its JSON files parse, its safetensors and
    (when `gguf`) model.gguf are complete; an `adapter` entry (a GGUF-adapter checkpoint)
    has its card, peft's config, a whole adapter.gguf and a whole merged.gguf (an entry
    written before merges is rebuilt with one). Else what is wrong. Remembered per
    process while the files' sizes and mtimes stay the same."""
    try:
        files = sorted(p for p in target.iterdir() if p.is_file())
        signature = tuple((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in files)
    except OSError:
        return "missing"
    if _checked.get((target, gguf, adapter)) == signature:
        return None
    names = {p.name for p in files}
    for name in (
        (ADAPTER_CARD, ADAPTER_CONFIG, ADAPTER_GGUF, MERGED_GGUF) if adapter else ("config.json",)
    ):
        if name not in names:
            return f"no {name}"
    if not any(n.endswith(".safetensors") for n in names):
        return "no weights"
    if gguf and "model.gguf" not in names:
        return "no model.gguf"
    for path in files:
        problem = None
        if path.suffix == ".json":
            try:
                if not isinstance(read_json(path), dict):
                    problem = "not a JSON object"
            except (OSError, ValueError, UnicodeDecodeError):
                problem = "not readable JSON"
        elif path.suffix == ".safetensors":
            problem = safetensors_problem(path)
        elif (path.name == "model.gguf" and gguf) or (path.suffix == ".gguf" and adapter):
            from sitcom.model.gguf_export import gguf_problem

            problem = gguf_problem(path)
        if problem:
            return f"{path.name}: {problem}"
    _checked[(target, gguf, adapter)] = signature
    return None


_checked: dict[tuple[Path, bool, bool], tuple] = {}


def cached_dir(
    target: Path, build: Callable[[Path], None], *, gguf: bool, adapter: bool = False
) -> Path:
    """`target` when it is a whole cache entry; else build it (in a temp dir beside it,
    renamed into place) under a lock file, so that of two processes starting at once one
    builds and the other waits for it. A damaged entry is built again."""
    remove_stale_temp_dirs(target.parent)
    if cache_problem(target, gguf, adapter) is None:
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        lock = target.parent / f".{target.name}.lock"
        with file_lock(
            lock, on_wait=lambda: log.info("another process is building %s; waiting for it", target)
        ):
            problem = cache_problem(target, gguf, adapter)
            if problem is None:  # built meanwhile by the process we waited for
                return target
            if problem != "missing":
                log.warning(
                    "the model cache %s is damaged (%s); building it again", target, problem
                )
            log.info("building %s (once)", target)
            _write_entry(target, build)
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the model cache in {target.parent} ({e.strerror or e}); "
            "set SITCOM_CACHE to a writable directory"
        ) from e
    problem = cache_problem(target, gguf, adapter)
    if problem is not None:
        raise ModelLoadError(f"the model cache {target} was built damaged ({problem})")
    return target


def _write_entry(target: Path, write) -> None:
    """Build a cache entry in a temp dir beside it, then rename it into place."""
    from safetensors import SafetensorError

    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    except OSError as e:
        raise ModelLoadError(
            f"cannot write the model cache in {target.parent} ({e.strerror or e}); "
            "set SITCOM_CACHE to a writable directory"
        ) from e
    try:
        write(tmp)
        publish_dir(tmp, target)
    except (OSError, SafetensorError) as e:
        why = getattr(e, "strerror", None) or (str(e).splitlines() or [type(e).__name__])[0]
        raise ModelLoadError(
            f"cannot write the model cache in {target.parent} ({why}); "
            "set SITCOM_CACHE to a writable directory with ~1 GB free"
        ) from e
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
