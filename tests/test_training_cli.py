"""`python -m training` as a user runs it: bad inputs, SIGKILL + --resume, Ctrl-C."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from helpers import EPISODE, write_corpus

from training.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e  # `python -m training` as a subprocess


def cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "training", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1", **(env or {})},
    )


def last_line(proc) -> str:
    return proc.stderr.strip().splitlines()[-1]


def test_bad_inputs_give_one_line_errors(tmp_path, tiny_model_dir, capsys):
    corpus = write_corpus(tmp_path / "c", [EPISODE] * 3, [EPISODE])
    empty = tmp_path / "empty"
    empty.mkdir()
    broken = tmp_path / "broken"
    shutil.copytree(tiny_model_dir, broken)
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    no_config = tmp_path / "noconfig"
    shutil.copytree(tiny_model_dir, no_config)
    (no_config / "config.json").unlink()
    out = str(tmp_path / "out")

    # As a user runs it: exit status and a single line, no traceback.
    for args, message in [
        (("finetune", "--data", str(tmp_path / "nope"), "--out", out), "does not exist"),
        (
            ("finetune", "--data", str(corpus), "--out", out, "--base", "no-such/model"),
            "unknown model 'no-such/model'",
        ),
    ]:
        proc = cli(*args)
        assert proc.returncode == 2, (args, proc.stderr)
        assert last_line(proc).startswith("error: ") and message in last_line(proc)
        assert "Traceback" not in proc.stderr
    assert cli("finetune", "--data", str(corpus)).returncode == 2  # argparse: missing --out

    # The rest in-process (the same main(); a subprocess each would cost seconds of imports).
    for args, message in [
        (("finetune", "--data", str(empty), "--out", out), "has no train.txt"),
        (
            ("finetune", "--data", str(corpus), "--out", out, "--base", str(broken)),
            "could not load model",
        ),
        (
            ("finetune", "--data", str(corpus), "--out", out, "--block-size", "4"),
            "--block-size must be at least 16",
        ),
        (("evaluate", str(no_config), "--data", str(corpus)), "not a model directory"),
        (("evaluate", str(broken), "--data", str(corpus)), "could not load model"),
        (("evaluate", str(tmp_path / "gone"), "--data", str(corpus)), "does not exist"),
    ]:
        assert main(list(args)) == 2, args
        line = capsys.readouterr().err.strip().splitlines()[-1]
        assert line.startswith("error: ") and message in line, (args, line)
    assert not Path(out).exists()


def wait_for_checkpoint(proc, work: Path, after: int = 0, timeout: float = 90) -> None:
    """Until Trainer has finished saving a checkpoint newer than step `after`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, "the run ended before it could be interrupted"
        for state in work.glob("checkpoint-*/trainer_state.json"):
            step = int(state.parent.name.split("-")[1])
            if step > after and state.stat().st_size > 0:
                try:
                    json.loads(state.read_text())
                    return
                except ValueError:
                    pass  # still being written
        time.sleep(0.02)
    raise AssertionError("no checkpoint appeared")


def losses(path: Path) -> dict[int, float]:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [r["step"] for r in records if "loss" in r]
    assert steps == sorted(set(steps)), "steps logged twice or out of order"
    return {r["step"]: r["loss"] for r in records if "loss" in r}


def test_kill_resume_and_ctrl_c_continue_the_same_run(tmp_path, tiny_model_dir, capsys):
    corpus = write_corpus(tmp_path / "c", [EPISODE] * 12, [EPISODE])
    out = tmp_path / "ck"
    work = tmp_path / "ck.work"
    args = [
        "finetune",
        "--data",
        str(corpus),
        "--out",
        str(out),
        "--base",
        str(tiny_model_dir),
        "--block-size",
        "64",
        "--batch-size",
        "4",
        "--grad-accum",
        "1",
        "--max-steps",
        "60",
        "--eval-steps",
        "10",
        "--save-steps",
        "10",
        "--save-limit",
        "2",
        "--lr",
        "3e-3",
        "--precision",
        "fp32",
        "--log-steps",
        "1",
        "--keep-work",
    ]
    cmd = [sys.executable, "-m", "training", *args]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    log = (tmp_path / "run.log").open("w")

    # 1. SIGKILL right after the first completed save.
    run = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log, stderr=log)
    wait_for_checkpoint(run, work)
    run.kill()
    run.wait()
    killed_at = max(
        int(p.parent.name.split("-")[1]) for p in work.glob("checkpoint-*/trainer_state.json")
    )
    assert not out.exists() and killed_at < 60

    # 2. Without --resume the half-done run is not silently thrown away.
    assert main(args) == 2
    assert "--resume" in capsys.readouterr().err.strip().splitlines()[-1]

    # 3. Resume, then Ctrl-C after one more save: exit 130 with the hint.
    run = subprocess.Popen(
        cmd + ["--resume"], cwd=ROOT, env=env, stdout=log, stderr=subprocess.PIPE, text=True
    )
    wait_for_checkpoint(run, work, after=killed_at)
    run.send_signal(signal.SIGINT)
    _, err = run.communicate(timeout=60)
    assert run.returncode == 130
    assert err.strip().splitlines()[-1] == "interrupted; resume with --resume"
    assert not out.exists()

    # 4. Resume to the end.
    proc = cli(*args, "--resume")
    assert proc.returncode == 0, proc.stderr[-2000:]
    card = json.loads((out / "checkpoint.json").read_text())
    assert card["steps"] == 60 and card["tokens_seen"] == 60 * 4 * 64
    resumed = losses(out / "metrics.jsonl")
    assert sorted(resumed) == list(range(1, 61))

    # The same run uninterrupted: identical losses after the kill point only if the
    # optimizer, scheduler and data position were all restored.
    ref_out = tmp_path / "ref"
    ref_args = [a if a != str(out) else str(ref_out) for a in args]
    assert main(ref_args) == 0
    reference = losses(ref_out / "metrics.jsonl")
    for step in range(killed_at + 1, 61):
        assert resumed[step] == pytest.approx(reference[step], rel=1e-3, abs=1e-3), step
