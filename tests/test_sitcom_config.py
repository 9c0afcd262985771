"""The SITCOM_* variables are read in one place (sitcom.config), not at scattered sites."""

from __future__ import annotations

import ast
from pathlib import Path

from sitcom.config import sitcom_config

ROOT = Path(__file__).resolve().parent.parent


def environment_reads(path: Path) -> list[str]:
    """The SITCOM_* names a file reads from os.environ / os.getenv by literal."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        key = None
        if isinstance(node, ast.Call) and node.args:
            func = ast.unparse(node.func)
            if func in ("os.environ.get", "os.getenv", "environ.get", "env.get"):
                key = node.args[0]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) in ("os.environ",):
            key = node.slice
        if isinstance(key, ast.Constant) and str(key.value).startswith("SITCOM_"):
            found.append(key.value)
    return found


def test_only_sitcom_config_reads_sitcom_variables():
    readers = {
        str(p.relative_to(ROOT)): names
        for p in sorted((ROOT / "sitcom").rglob("*.py"))
        if (names := environment_reads(p))
    }
    assert set(readers) == {"sitcom/config.py"}, readers


def test_defaults_and_values(tmp_path):
    default = sitcom_config({})
    assert default.cache == Path.home() / ".cache" / "sitcom"
    assert (default.backend, default.threads, default.precision, default.llama_extra_bufts) == (
        "auto",
        "auto",
        "auto",
        "auto",
    )
    got = sitcom_config(
        {
            "SITCOM_CACHE": "~/c",
            "SITCOM_BACKEND": " Torch ",
            "SITCOM_THREADS": " ",
            "SITCOM_PRECISION": "bf16",
            "SITCOM_LLAMA_EXTRA_BUFTS": "Off",
        }
    )
    assert got.cache == Path.home() / "c"
    assert (got.backend, got.threads, got.precision, got.llama_extra_bufts) == (
        "torch",
        "auto",
        "bf16",
        "Off",
    )
    assert sitcom_config({"SITCOM_CACHE": ""}).cache == default.cache  # empty: the default


def test_the_environment_is_read_when_asked(monkeypatch, tmp_path):
    from sitcom.model.catalog import cache_root

    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path))
    assert sitcom_config().cache == cache_root() == tmp_path
