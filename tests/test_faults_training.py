"""Issue 8, `python -m training`: --resume never replaces a finished checkpoint, stale temp
dirs of a killed export go, a full disk is one line, nan is rejected, --json is checked first."""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import EPISODE, finetune_args, write_corpus

from training.__main__ import main

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus", [EPISODE] * 6, [EPISODE])


def last_err(capsys) -> str:
    return capsys.readouterr().err.strip().splitlines()[-1]


# -- 1. --resume never replaces a finished checkpoint --------------------------------------


@pytest.mark.parametrize("keep_work", [False, True])
def test_resume_refuses_to_replace_a_finished_checkpoint(
    tmp_path, corpus, tiny_model_dir, capsys, keep_work
):
    out = tmp_path / "T"
    extra = ("--keep-work",) if keep_work else ()
    assert main(finetune_args(corpus, out, tiny_model_dir, *extra)) == 0
    card = (out / "checkpoint.json").read_bytes()
    weights = (out / "model.safetensors").read_bytes()
    capsys.readouterr()

    assert main(finetune_args(corpus, out, tiny_model_dir, "--resume", "--lr", "0.5")) == 2
    line = last_err(capsys)
    assert line.startswith("error: ") and "--overwrite" in line and str(out) in line
    assert (out / "checkpoint.json").read_bytes() == card
    assert (out / "model.safetensors").read_bytes() == weights

    # --overwrite still may (with --resume: continue OUT.work's run, then replace OUT).
    assert main(finetune_args(corpus, out, tiny_model_dir, "--resume", "--overwrite")) == 0
    assert json.loads((out / "checkpoint.json").read_text())["steps"] == 3


# -- 6. kill -9 during export: stale temp dirs go, --max-steps holds after resume ----------


def test_resume_after_a_killed_export_cleans_up_and_respects_max_steps(
    tmp_path, corpus, tiny_model_dir
):
    out = tmp_path / "T"
    args = finetune_args(corpus, out, tiny_model_dir)
    # The state a kill -9 in export_checkpoint leaves: every Trainer checkpoint in OUT.work
    # (removed only after the export), a half-written `.T.XXXXXXXX.tmp`, no OUT.
    assert main([*args, "--keep-work"]) == 0
    shutil.rmtree(out)
    stale = tmp_path / ".T.k1ll3d9x.tmp"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"\0" * 4096)
    other = tmp_path / ".Tother.abcdefgh.tmp"  # not ours: another OUT's name
    other.mkdir()

    assert main([*args, "--resume"]) == 0
    card = json.loads((out / "checkpoint.json").read_text())
    assert card["steps"] == 3
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(steps) == 3
    assert not stale.exists() and other.exists()
    assert not list(tmp_path.glob(".T.*.tmp"))


# -- 9. a full disk during export: one line, exit 1 ----------------------------------------


def _limit_file_size() -> None:
    # Files may not grow past 96 KB (EFBIG instead of SIGXFSZ): the LoRA run's own
    # checkpoints fit, the exported full model (~130 KB) does not - a disk full at export.
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (96 * 1024, 96 * 1024))


@pytest.mark.e2e
def test_disk_full_during_export_is_one_line_and_exit_1(tmp_path, corpus, tiny_model_dir):
    out = tmp_path / "T"
    args = finetune_args(corpus, out, tiny_model_dir, "--lora", "--lora-r", "1", "--max-steps", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        preexec_fn=_limit_file_size,
    )
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("error: ") and ("disk" in last or "write" in last), last
    assert not out.exists() and not list(tmp_path.glob(".T.*.tmp"))
    assert list((tmp_path / "T.work").glob("checkpoint-*/trainer_state.json"))  # resumable


# -- 10. nan and inf are not numbers a limit can use ---------------------------------------


@pytest.mark.parametrize("option", ["--time-budget", "--epochs", "--lr"])
@pytest.mark.parametrize("value", ["nan", "inf"])
def test_non_finite_float_options_are_rejected(
    tmp_path, corpus, tiny_model_dir, capsys, option, value
):
    args = [*finetune_args(corpus, tmp_path / "o", tiny_model_dir), option, value]
    with pytest.raises(SystemExit) as exit_:
        main(args)
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert option in err and "finite" in err and "Traceback" not in err


# -- 11. evaluate --json BAD_PATH fails before evaluating --------------------------------


@pytest.mark.parametrize("bad", ["file/x.json", "dir"])
def test_evaluate_checks_the_json_path_first(tmp_path, corpus, tiny_model_dir, capsys, bad):
    (tmp_path / "file").write_text("a file, not a folder")
    (tmp_path / "dir").mkdir()
    # A missing checkpoint too: the --json error must come first, before any loading.
    assert (
        main(
            [
                "evaluate",
                str(tmp_path / "no-model"),
                "--data",
                str(corpus),
                "--json",
                str(tmp_path / bad),
            ]
        )
        == 2
    )
    line = last_err(capsys)
    assert line.startswith("error: ") and "--json" in line, line
