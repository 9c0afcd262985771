"""training.screen: a writer's BPB on the show's real continuations of openings."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from sitcom.decoding.plan import scene_prompt_ids
from sitcom.decoding.vocab import stop_token_ids
from training.__main__ import main
from training.screen import continuation_nats, screen

OPENINGS = [
    {
        "id": "ep0:1",
        "opening": ["JERRY: What is the deal with the soup?"],
        "continuation": ["GEORGE: The soup is a mystery.", "JERRY: A hot mystery."],
    },
    {
        "id": "ep0:9",
        "opening": ["ELAINE: I lost the key.", "KRAMER: Which key?"],
        "continuation": ["ELAINE: The big key!", "KRAMER: Oh, the big key."],
    },
]


def write_openings(path: Path, records=OPENINGS) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def test_continuation_nats_are_the_models_loss_on_the_continuation_alone(tiny_model_dir):
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    r = OPENINGS[1]
    nats, size = continuation_nats(model, tokenizer, r["opening"], r["continuation"])
    text = "\n".join(r["continuation"]) + "\n"
    assert size == len(text.encode())
    # transformers' own loss, with the opening (and the lead) masked out of the labels
    context = scene_prompt_ids(tokenizer, "\n".join(r["opening"]) + "\n", stop_token_ids(tokenizer))
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + target])
    labels = torch.tensor([[-100] * len(context) + target])
    with torch.no_grad():
        loss = model(input_ids=ids, labels=labels).loss.item()
    assert nats == pytest.approx(loss * len(target), rel=1e-4)
    # and the opening is context: another opening gives the same text another score
    other, _ = continuation_nats(model, tokenizer, ["NEWMAN: Hello."], r["continuation"])
    assert other != pytest.approx(nats, rel=1e-6)


def trained_copy(src: Path, dst: Path, text: str, steps: int = 40) -> Path:
    """A copy of the tiny model fitted for a few steps to `text`."""
    shutil.copytree(src, dst)
    model = AutoModelForCausalLM.from_pretrained(dst)
    tokenizer = AutoTokenizer.from_pretrained(dst)
    ids = torch.tensor([tokenizer(text)["input_ids"]])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    torch.manual_seed(0)
    for _ in range(steps):
        opt.zero_grad()
        model(input_ids=ids, labels=ids).loss.backward()
        opt.step()
    model.save_pretrained(dst)
    return dst


def test_a_writer_that_learnt_the_show_screens_better(tiny_model_dir, tmp_path, capsys):
    show = "".join(
        "\n".join(r["opening"] + r["continuation"]) + "\n" for r in OPENINGS for _ in range(3)
    )
    learnt = trained_copy(tiny_model_dir, tmp_path / "learnt", show)
    openings = write_openings(tmp_path / "open.jsonl")
    base, tuned = screen([str(tiny_model_dir), str(learnt)], openings)
    assert base["better_than_first"] == 0 and tuned["better_than_first"] == 2
    assert tuned["bpb"] < base["bpb"] - 0.5
    assert math.isfinite(base["bpb"]) and base["openings"] == 2

    rc = main(["judge", "screen", "--openings", str(openings), "--model", str(tiny_model_dir)])
    out, _ = capsys.readouterr()
    assert rc == 0
    assert f"continuation BPB {base['bpb']:.4f}" in out and "on 0/2 openings" in out


def test_bad_openings_and_models_are_one_line_errors(tiny_model_dir, tmp_path, capsys):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"id": "x", "opening": ["JERRY: hi"]}\n')
    missing = tmp_path / "nowhere"
    good = write_openings(tmp_path / "open.jsonl")
    for openings, model in ((bad, tiny_model_dir), (good, missing)):
        rc = main(["judge", "screen", "--openings", str(openings), "--model", str(model)])
        _, err = capsys.readouterr()
        assert rc == 2, err
        assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
