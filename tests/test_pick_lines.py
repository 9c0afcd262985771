"""Choosing line by line (settings.pick_lines): candidates of one scene wait at each line's
end, the chooser keeps one line, and the others take it over in their KV cache."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import PROMPT, build_tiny_tokenizer

from sitcom.decoding.batcher import ContinuousBatcher
from sitcom.decoding.vocab import vocab_info
from sitcom.decoding.voice import voiced_line
from sitcom.scenes.humour import load_default
from sitcom.scenes.ranking import best_next_line
from sitcom.settings import SceneSettings

NAMES = ("JERRY", "GEORGE", "ELAINE", "KRAMER")


class FakeLlama:
    """llama.cpp's KV semantics, strictly: each sequence's tokens must arrive at the next
    position (llama_decode refuses a gap or an overlap), `forget(seq, start)` drops the tail
    from `start`. Its logits depend only on the tokens the sequence holds: at a line's start
    one of four speakers at random, then that speaker's line number k, token by token."""

    max_batch = 4
    n_ctx_per_seq = n_ctx_train = 1024

    def __init__(self, tokenizer):
        self.n_vocab = len(tokenizer)
        self.line_ends = vocab_info(tokenizer).line_end_ids
        self.lines = {
            k: [tokenizer.encode(f"{n}: Line {k} by {n.lower()}.\n") for n in NAMES]
            for k in range(40)
        }
        self.held: dict[int, list[int]] = {}
        self.released: list[list[int]] = []

    def decode(self, work):
        out = np.full((len(work), self.n_vocab), -30.0, dtype=np.float32)
        for i, (seq, tokens, pos) in enumerate(work):
            held = self.held.setdefault(seq, [])
            assert pos == len(held), f"sequence {seq} fed at {pos} but holds {len(held)}"
            held.extend(tokens)
            ends = [j for j, t in enumerate(held) if t in self.line_ends]
            line = held[ends[-1] + 1 :]
            options = self.lines[len(ends) % 40]
            for option in options:
                if option[: len(line)] == line and len(option) > len(line):
                    out[i, option[len(line)]] = 0.0
        return out

    def forget(self, seq, start=-1):
        held = self.held.setdefault(seq, [])
        if start < 0:
            if held:
                self.released.append(list(held))
            held.clear()
        else:
            del held[start:]
        return True


def test_candidates_wait_at_each_line_and_go_on_from_the_chosen_one():
    tok = build_tiny_tokenizer()
    fake = FakeLlama(tok)
    calls: list[list[list[str]]] = []

    def choose_last(candidates, group):
        assert group == "scene-1"
        calls.append(candidates)
        return len(candidates) - 1  # never the first row: a take-over must happen

    batcher = ContinuousBatcher(fake, tok, seed=3, choose_line=choose_last)
    settings = SceneSettings(
        max_new_tokens=120, temperature=1.0, top_k=0, top_p=1.0, guidance=1, voice=0
    )
    for _ in range(3):
        batcher.add(PROMPT, settings, tag="scene-1", group="scene-1")
    finished = batcher.drain()

    assert len(calls) >= 4
    prompt_lines = len(calls[0][0]) - 1
    for candidates in calls:
        assert len({tuple(c[:-1]) for c in candidates}) == 1  # alike but for the last line
    assert any(len({c[-1] for c in candidates}) > 1 for candidates in calls)
    chosen = [c[-1][-1] for c in calls]  # the last candidate's new line, each time
    for row, scene in finished:
        assert scene.lines[prompt_lines : prompt_lines + len(chosen)] == chosen
        # What the KV cache held is exactly the row's text (the last token is never fed).
        assert row.input_ids[0, :-1].tolist() in fake.released


def test_guided_candidates_twins_follow_the_chosen_line():
    """With guidance each candidate has a twin sequence: the scene without its opening.
    After every step (line choices and take-overs included) the twin holds, or is about to
    be fed, exactly the lead and the row's own new tokens; at the end every slot is free."""
    tok = build_tiny_tokenizer()
    fake = FakeLlama(tok)
    fake.max_batch = 6
    batcher = ContinuousBatcher(fake, tok, seed=5, choose_line=lambda c, g: len(c) - 1)
    settings = SceneSettings(
        max_new_tokens=90, temperature=1.0, top_k=0, top_p=1.0, guidance=2, voice=0
    )
    rows = [batcher.add(PROMPT, settings, tag="s", group="s") for _ in range(3)]
    assert len({r.seq for r in rows} | {r.twin for r in rows}) == 6 and not batcher.free_slots
    takeovers = 0
    while batcher.rows:
        before = [r.input_ids.clone() for r in batcher.rows]
        live = list(batcher.rows)
        batcher.step()
        takeovers += sum(
            not torch.equal(r.input_ids[0, : b.shape[1]], b[0])
            for r, b in zip(live, before, strict=True)
            if r in batcher.rows
        )
        for row in batcher.rows:
            new = row.input_ids[0, row.plan.prompt_len :].tolist()
            assert fake.held[row.twin] + row.twin_pending == row.plan.lead_ids + new
    assert takeovers > 0  # a take-over happened, so the twins' refeed was exercised
    assert batcher.free_slots == 6


def test_voice_sequences_follow_the_chosen_line():
    """With voice each candidate has a sequence that reads the contrast speaker's tag (MAN)
    inside each line. FakeLlama refuses a token fed at the wrong position; after every step
    (line choices and take-overs included) that sequence holds the row's own tokens up to
    the line, then MAN's tag and the line's speech; at the end every slot is free."""
    tok = build_tiny_tokenizer()
    fake = FakeLlama(tok)
    batcher = ContinuousBatcher(fake, tok, seed=7, choose_line=lambda c, g: len(c) - 1)
    settings = SceneSettings(
        max_new_tokens=90, temperature=1.0, top_k=0, top_p=1.0, guidance=1, voice=1.0
    )
    rows = [batcher.add(PROMPT, settings, tag="s", group="s") for _ in range(2)]
    assert len({r.seq for r in rows} | {r.voice_seq for r in rows}) == 4
    voiced_steps = 0
    while batcher.rows:
        batcher.step()
        for row in batcher.rows:
            ids = row.input_ids[0].tolist()
            held = fake.held.get(row.voice_seq, []) + row.voice_pending
            if not row.voice_live:
                assert fake.held.get(row.voice_seq, []) == ids[: row.voice_synced]
                continue
            voiced_steps += 1
            speaker, k = voiced_line(tok, ids[row.line_start :])
            assert held[: row.voice_synced] == ids[: row.voice_synced] == ids[: row.line_start]
            assert held[len(held) - (len(ids) - row.line_start - k) :] == ids[row.line_start + k :]
            tag = tok.decode(held[row.voice_synced : len(held) - (len(ids) - row.line_start - k)])
            assert speaker != "MAN" and tag == "MAN:"  # the contrast speaker's tag
    assert voiced_steps > 10 and batcher.free_slots == 4


def test_a_scene_alone_in_its_group_or_without_one_never_waits():
    tok = build_tiny_tokenizer()
    fake = FakeLlama(tok)
    batcher = ContinuousBatcher(fake, tok, seed=1, choose_line=lambda c, g: pytest.fail("chose"))
    settings = SceneSettings(max_new_tokens=60, guidance=1, voice=0)
    batcher.add(PROMPT, settings, tag=1, group="alone")
    batcher.add(PROMPT, settings, tag=2)
    batcher.add(PROMPT, settings, tag=2)
    assert len(batcher.drain()) == 3


def test_best_next_line_keeps_the_line_that_holds_the_scene_together():
    opening = ["KRAMER: I'm selling my jacket to Peterman."]
    shared = opening + ["JERRY: You're selling the jacket?"]
    candidates = [
        shared + ["JERRY: My name is Jerry."],  # names himself: a derailing line
        shared + ["KRAMER: He wants the jacket, Jerry! Peterman loves it!"],
    ]
    assert best_next_line(candidates, 1) == 1
    assert best_next_line(candidates[::-1], 1) == 0
    assert best_next_line([shared, shared], 1) == 0  # a tie keeps the first
    humour = load_default()
    assert best_next_line(candidates, 1, humour) == 1


def test_llamacpp_forgets_a_tail_and_goes_on_as_if_it_never_was(tiny_model_dir, tmp_path):
    import shutil

    from sitcom.model import serving
    from training.gguf_export import export_gguf

    pytest.importorskip("llama_cpp")
    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    export_gguf(path, qtype="f32")
    model, tok = serving.load_llamacpp(path, max_batch=2, n_threads=1)
    ids = tok.encode(PROMPT)[:12]
    other = tok.encode("GEORGE: Serenity now! Serenity now!")[:6]
    whole = model.decode([(0, ids, 0)])
    model.decode([(1, ids[:6] + other, 0)])  # a line that loses
    assert model.forget(1, 6)
    again = model.decode([(1, ids[6:], 6)])
    assert torch.allclose(torch.from_numpy(again), torch.from_numpy(whole), atol=1e-4)
    model.close()
