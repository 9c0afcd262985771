"""Fixtures every test module can use; the builders behind them live in helpers.py."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from helpers import RAW_CORPUS, build_tiny_tokenizer, save_tiny_model_dir, save_tiny_pair
from pg_server import db_target, pg_url, postgres_server  # noqa: F401  (fixtures)

# Keep torch from fighting the other tests for the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# SITCOM_CACHE as the environment had it before the suite changed it (None: the default).
REAL_CACHE = os.environ.get("SITCOM_CACHE")


def pytest_configure(config: pytest.Config) -> None:
    """Refuse a pytest/pytest-xdist pair under which `--dist loadgroup` silently stops
    grouping (pytest 9.2 with xdist up to 3.8: pytest-xdist#1386): each worker would then build
    what an xdist_group was meant to share (the real Gemma's dequantization alone is minutes)."""
    from importlib.metadata import version

    def parts(name: str) -> tuple[int, ...]:
        return tuple(int(p) for p in version(name).split(".")[:2] if p.isdigit())

    if config.getoption("dist", "no") != "loadgroup" or hasattr(config, "workerinput"):
        return
    if parts("pytest") >= (9, 2) and parts("pytest-xdist") <= (3, 8):
        raise pytest.UsageError(
            f"pytest {version('pytest')} with pytest-xdist {version('pytest-xdist')} ignores "
            "xdist_group (pytest-xdist#1386): pip install 'pytest<9.2' (pyproject's dev extra)"
        )


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory):
    """SITCOM_CACHE points at a temp folder for the whole session (subprocesses inherit it),
    so no test writes into the real model cache (~/.cache/sitcom); built models are shared
    within the session and deleted at its end. A test marked `real_cache` gets the
    environment's own SITCOM_CACHE back."""
    cache = tmp_path_factory.mktemp("sitcom-cache")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("SITCOM_CACHE", str(cache))
        yield cache
    shutil.rmtree(cache, ignore_errors=True)


@pytest.fixture(autouse=True)
def _real_cache_opt_in(request, monkeypatch):
    if request.node.get_closest_marker("real_cache"):
        if REAL_CACHE is None:
            monkeypatch.delenv("SITCOM_CACHE")
        else:
            monkeypatch.setenv("SITCOM_CACHE", REAL_CACHE)


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Read-only tiny checkpoint shared by the session; copy it before modifying."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path]:
    """(base dir, tuned dir): the tuned model's linear layers moved by a rank-2 change
    (helpers.save_tiny_pair), built once per module that asks for it."""
    return save_tiny_pair(tmp_path_factory.mktemp("pair"))


@pytest.fixture
def raw_corpus() -> Path:
    if not RAW_CORPUS.is_dir():
        pytest.skip(f"real transcripts not found at {RAW_CORPUS} (needs ../shared beside it)")
    return RAW_CORPUS
