"""`torchrun -m training finetune`: data-parallel training on 2 CPU processes (gloo).

The same command and global batch as one process: the losses match, only rank 0 writes, the
exported checkpoint loads, and --resume goes on from OUT.work under torchrun too.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import helpers
import pytest
from helpers import EPISODE, write_corpus

from training.__main__ import main

ROOT = Path(__file__).resolve().parent.parent
pytestmark = pytest.mark.e2e  # torchrun starts 2 training processes


def finetune_args(corpus: Path, out: Path, base: Path, batch_size: int, *extra: str) -> list[str]:
    return helpers.finetune_args(
        corpus,
        out,
        base,
        *extra,
        batch_size=batch_size,
        max_steps=6,
        eval_steps=3,
        save_steps=3,
        lr="3e-3",
        warmup_steps=2,
    )


def torchrun(*args: str) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--standalone",
            "-m",
            "training",
            *args,
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=240,
        env=env,
    )


def metrics(path: Path) -> tuple[dict[int, float], dict[int, float]]:
    """(train loss by step, val bpb by step) from a metrics.jsonl."""
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    steps = [(r["step"], "loss" in r) for r in rows if "loss" in r or "eval_bpb" in r]
    assert len(steps) == len(set(steps)), steps  # one writer: no step logged twice
    return (
        {r["step"]: r["loss"] for r in rows if "loss" in r},
        {r["step"]: r["eval_bpb"] for r in rows if "eval_bpb" in r},
    )


def test_two_processes_match_one_and_resume(tmp_path, tiny_model_dir):
    from transformers import AutoModelForCausalLM

    corpus = write_corpus(tmp_path / "corpus", [EPISODE] * 12, [EPISODE] * 2)
    runs = tmp_path / "runs"
    runs.mkdir()

    # One process, batch 4; two processes, batch 2 each: the same global batch.
    single = runs / "single"
    assert main(finetune_args(corpus, single, tiny_model_dir, 4)) == 0
    ddp = runs / "ddp"
    proc = torchrun(*finetune_args(corpus, ddp, tiny_model_dir, 2, "--keep-work"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.count("saved ") == 1, proc.stdout  # rank 0 reports; rank 1 is quiet
    assert proc.stdout.count("train: 12 episodes") == 1

    loss_1, bpb_1 = metrics(single / "metrics.jsonl")
    loss_2, bpb_2 = metrics(ddp / "metrics.jsonl")
    assert sorted(loss_2) == sorted(loss_1) == [1, 2, 3, 4, 5, 6]  # one line per step, not two
    assert sorted(bpb_2) == sorted(bpb_1) == [3, 6]
    for step in loss_1:
        assert loss_2[step] == pytest.approx(loss_1[step], rel=1e-4, abs=1e-4), step
    for step in bpb_1:
        assert bpb_2[step] == pytest.approx(bpb_1[step], rel=1e-4), step
    card_1 = json.loads((single / "checkpoint.json").read_text())
    card_2 = json.loads((ddp / "checkpoint.json").read_text())
    assert card_2["steps"] == card_1["steps"] == 6
    assert card_2["tokens_seen"] == card_1["tokens_seen"] == 6 * 4 * 64  # both ranks' tokens
    assert card_2["val_bpb"] == pytest.approx(card_1["val_bpb"], rel=1e-4)
    assert (ddp / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    AutoModelForCausalLM.from_pretrained(ddp)  # the export loads with plain transformers
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "ddp.work", "single"]  # no temp dirs

    # --resume under torchrun: as if killed after the save at step 3, then run again.
    work = runs / "ddp.work"
    assert (work / "checkpoint-3" / "rng_state_1.pth").is_file()  # each rank's RNG is saved
    shutil.rmtree(work / "checkpoint-6")
    # (A time budget it does not reach: rank 0's clock is broadcast every step.)
    proc = torchrun(
        *finetune_args(
            corpus, ddp, tiny_model_dir, 2, "--resume", "--overwrite", "--time-budget", "30"
        )
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loss_r, bpb_r = metrics(ddp / "metrics.jsonl")
    assert sorted(loss_r) == [1, 2, 3, 4, 5, 6]  # steps 4-6 redone once, not appended twice
    for step in (4, 5, 6):
        assert loss_r[step] == pytest.approx(loss_2[step], rel=1e-4, abs=1e-4), step
    assert bpb_r[6] == pytest.approx(bpb_2[6], rel=1e-3)
    assert json.loads((ddp / "checkpoint.json").read_text())["steps"] == 6
    AutoModelForCausalLM.from_pretrained(ddp)
    assert sorted(p.name for p in runs.iterdir()) == ["ddp", "single"]  # OUT.work removed


def test_refusals_reach_every_rank(tmp_path, tiny_model_dir):
    """A pre-flight refusal is one clear error and a non-zero exit, not a hung rank."""
    corpus = write_corpus(tmp_path / "corpus", [EPISODE] * 3, [EPISODE])
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    proc = torchrun(*finetune_args(corpus, out, tiny_model_dir, 2))
    assert proc.returncode != 0
    assert "already exists: pass --overwrite to replace it" in proc.stderr
    assert (out / "keep.txt").read_text() == "mine"
