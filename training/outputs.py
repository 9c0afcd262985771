"""Checks of `python -m training evaluate --json PATH`, light enough to run before torch is
imported (the rules themselves are data.outputs')."""

from __future__ import annotations

import json
from pathlib import Path

from data.outputs import check_output_file, corpus_paths, dir_files, refuse_overlap


def is_evaluation_result(path: Path) -> bool:
    """True for a JSON file that `evaluate --json` wrote (which a later run may replace)."""
    try:
        if not path.is_file() or path.stat().st_size > 64_000_000:
            return False
        result = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(result, dict) and {"checkpoint", "val", "quality"} <= result.keys()


def check_json_path(path: Path, checkpoint: str | None = None, data: Path | None = None) -> None:
    """Fail before an evaluation of minutes if its --json file cannot or must not be written:
    only a regular file or a new name, never the corpus's files or the checkpoint's own (an
    earlier evaluation kept beside it may be replaced)."""
    refuse_overlap(
        [path],
        {
            f"the corpus --data {data}": corpus_paths(data),
            f"a file of the checkpoint {checkpoint}": dir_files(
                checkpoint, keep=lambda p: not (p.suffix == ".json" and is_evaluation_result(p))
            ),
        },
        "--json",
        path,
    )
    check_output_file(path, "--json")
