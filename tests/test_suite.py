"""The test suite's own rules: no test writes into the real model cache, test modules share
builders through helpers.py only, and the markers the fast loop relies on are registered."""

from __future__ import annotations

import ast
import os
import tomllib
from pathlib import Path

import pytest
from helpers import ROOT

from sitcom.model.catalog import cache_root

TESTS = ROOT / "tests"
REAL_DEFAULT = Path.home() / ".cache" / "sitcom"


def test_the_model_cache_is_a_temp_folder(model_cache, tmp_path_factory):
    assert cache_root() == model_cache
    assert model_cache.is_relative_to(tmp_path_factory.getbasetemp())
    assert cache_root() != REAL_DEFAULT


@pytest.mark.real_cache
def test_real_cache_opts_in_to_the_environments_cache(model_cache):
    assert cache_root() != model_cache
    assert (
        os.environ.get("SITCOM_CACHE") in (None, "")
        or cache_root() == Path(os.environ["SITCOM_CACHE"]).expanduser()
    )


def test_test_modules_import_neither_each_other_nor_conftest():
    own = {p.stem for p in TESTS.glob("*.py")}
    offenders = []
    for path in sorted(TESTS.glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = []
            if isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            elif isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            for name in names:
                top = name.split(".")[0]
                if top in own and (top.startswith("test_") or top == "conftest"):
                    offenders.append(f"{path.name}:{node.lineno} imports {name}")
    assert offenders == [], "shared builders belong in tests/helpers.py"


def test_markers_are_registered():
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())
    ini = config["tool"]["pytest"]["ini_options"]
    markers = {m.split(":")[0] for m in ini["markers"]}
    assert {"e2e", "real_cache"} <= markers
    assert "--strict-markers" in ini["addopts"]
    # Deprecation warnings stay visible: a blanket ignore hid the ones transformers gives
    # for calls that will break on its next major version.
    assert not any(
        f.startswith("ignore::DeprecationWarning") for f in ini.get("filterwarnings", [])
    )
