"""sitcom.files: a file is replaced in one rename, readable by all, and never left torn."""

from __future__ import annotations

import ast
import stat
from pathlib import Path

import pytest
from helpers import ROOT

from sitcom.files import atomic_path, write_atomic


def test_write_atomic_writes_text_and_bytes_world_readable(tmp_path):
    write_atomic(tmp_path / "a.txt", "JERRY: Hello, Newman.\nNEWMAN: Hello, Jerry. ☕\n")
    write_atomic(tmp_path / "b.bin", b"\x00\x01\xff")
    assert (tmp_path / "a.txt").read_bytes() == (
        "JERRY: Hello, Newman.\nNEWMAN: Hello, Jerry. ☕\n".encode()
    )
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\x01\xff"
    for name in ("a.txt", "b.bin"):
        assert stat.S_IMODE((tmp_path / name).stat().st_mode) == 0o644
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.txt", "b.bin"]  # no temp left


def test_write_atomic_replaces_an_existing_file(tmp_path):
    target = tmp_path / "metrics.jsonl"
    target.write_text("old\n")
    write_atomic(target, "new\n")
    assert target.read_text() == "new\n"
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_a_failed_write_leaves_the_old_file_and_no_temp(tmp_path):
    target = tmp_path / "model.gguf"
    target.write_bytes(b"old")
    with pytest.raises(OSError, match="disk full"), atomic_path(target) as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(".model.gguf.")
        tmp.write_bytes(b"half a mod")
        raise OSError("disk full")
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["model.gguf"]


def test_nothing_else_renames_files_into_place():
    """One helper for temp-file-and-rename: the packages call sitcom.files, not os.replace."""
    offenders = []
    for package in ("sitcom", "bot", "training", "data", "bench"):
        for path in sorted((ROOT / package).rglob("*.py")):
            if path == ROOT / "sitcom" / "files.py":
                continue
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if (
                    isinstance(node, ast.Call)
                    and isinstance(node.func, ast.Attribute)
                    and node.func.attr in ("replace", "rename")
                    and isinstance(node.func.value, ast.Name)
                    and node.func.value.id == "os"
                ):
                    offenders.append(f"{Path(path).relative_to(ROOT)}:{node.lineno}")
    assert offenders == [], "use sitcom.files.write_atomic / atomic_path / publish_dir"
