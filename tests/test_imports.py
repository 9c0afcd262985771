"""The project's import graph has no cycles: a module that imports another (at the top or
inside a function) never gets imported back by it, directly or through others."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = ("sitcom", "bot", "data", "training", "bench")


def module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def project_modules() -> dict[str, Path]:
    return {
        module_name(p): p for package in PACKAGES for p in sorted((ROOT / package).rglob("*.py"))
    }


def imported_modules(name: str, path: Path, known: set[str]) -> set[str]:
    """The project modules `name` imports anywhere in its file; `from pkg import mod`
    counts as importing pkg.mod when that is a module, else pkg."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = name.split(".")
                anchor = anchor[: len(anchor) - node.level + (1 if is_package else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            targets = [f"{base}.{alias.name}" for alias in node.names] + [base]
        else:
            continue
        for target in targets:
            if target in known:
                found.add(target)
                if isinstance(node, ast.ImportFrom):
                    break  # `from pkg import mod`: mod, not pkg as well
    found.discard(name)
    return found


def import_graph() -> dict[str, set[str]]:
    modules = project_modules()
    return {name: imported_modules(name, path, set(modules)) for name, path in modules.items()}


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def test_the_graph_sees_the_project():
    graph = import_graph()
    assert {"sitcom.engine", "bot.core", "training.judge", "bench", "data"} <= set(graph)
    assert "sitcom.jobs" in graph["sitcom.engine"]
    assert "bot.checkpoints" in graph["bot.core"]  # `from . import checkpoints`
    assert "sitcom.engine" in graph["training.judge"]  # imported inside a function


def test_cycles_are_found():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}, "e": {"e"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_no_import_cycles():
    found = cycles(import_graph())
    assert not found, "import cycles: " + "; ".join(" <-> ".join(c) for c in found)


@pytest.mark.e2e
def test_only_the_library_is_installed_into_site_packages(tmp_path):
    """The wheel holds `sitcom` alone (with its shipped model files): the programs' short
    names (bot, data, training, bench) never reach site-packages, and the library never
    imports them."""
    leftover = not (ROOT / "build").exists()  # setuptools builds in the checkout
    built = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(tmp_path),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    if leftover:
        shutil.rmtree(ROOT / "build", ignore_errors=True)
    assert built.returncode == 0, built.stderr
    [wheel] = tmp_path.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    assert {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")} == {
        "sitcom"
    }
    assert any(n.startswith("sitcom/seinfeld_lora/") for n in names)
    assert any(n.startswith("sitcom/humour_default/") for n in names)
    library = {m for m in project_modules() if m.split(".")[0] == "sitcom"}
    for name in library:
        outside = {
            m
            for m in imported_modules(name, project_modules()[name], set(project_modules()))
            if m.split(".")[0] != "sitcom"
        }
        assert not outside, (name, outside)


@pytest.mark.e2e
def test_slack_and_the_core_do_not_import_discord_code():
    """Discord code lives under bot/discord/; Slack, the console and the shared modules
    never load it (nor discord.py)."""
    code = (
        "import sys, bot.slack.app, bot.console, bot.core, bot.texts, bot.posting; "
        "print(sorted(m for m in sys.modules if m == 'discord' or m.startswith("
        "('discord.', 'bot.discord'))))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"
