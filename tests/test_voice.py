"""Contrast with an anonymous MAN (settings.voice, sitcom.decoding.voice): the formula, the
tag and speaker helpers, and llama.cpp's voice sequence reading MAN's tag for exactly the
tokens of each line after its tag."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPT, build_tiny_tokenizer, sharp_model_dir

from sitcom.decoding import batcher as batcher_module
from sitcom.decoding.voice import contrast_speaker, name_ids, other_speaker, tag_ids, tag_of, voice
from sitcom.settings import SceneSettings


def test_voice_adds_the_speakers_gain_except_for_names_and_ruled_out_tokens():
    torch.manual_seed(0)
    scores, cond, other = torch.randn(3, 1, 40) * 3
    cond[0, 5] = other[0, 5] = float("-inf")  # outside a served vocabulary
    scores[0, 5] = float("-inf")
    assert torch.equal(voice(scores, cond, other, 0.0), scores)
    out = voice(scores, cond, other, 1.5, names=torch.tensor([7, 9]))
    gain = cond.log_softmax(-1) - other.log_softmax(-1)
    for t in range(40):
        if t == 5:
            assert out[0, t] == float("-inf")
        elif t in (7, 9):  # a speaker's name: no gain either way
            assert out[0, t] == scores[0, t]
        else:
            assert torch.isclose(out[0, t], scores[0, t] + 1.5 * gain[0, t])
    assert not out.isnan().any()


def test_tags_and_the_other_speaker():
    assert tag_of("GEORGE:") == "GEORGE" and tag_of("UNCLE LEO:") == "UNCLE LEO"
    assert tag_of("GEORGE") is None and tag_of("GEORGE: Hi") is None and tag_of("(exits):") is None
    lines = ["JERRY: Hi.", "(Kramer enters)", "KRAMER: Hey.", "GEORGE: What?"]
    assert other_speaker(lines, "GEORGE") == "KRAMER"
    assert other_speaker(lines, "KRAMER") == "GEORGE"
    assert other_speaker(["GEORGE: Hi.", "GEORGE: Again."], "GEORGE") == "JERRY"
    assert other_speaker([], "JERRY") == "GEORGE"
    # a line is read against MAN's in its place, whoever else is in the scene; MAN's own
    # lines against the scene's last other speaker
    assert contrast_speaker(lines, "GEORGE") == contrast_speaker([], "NEWMAN") == "MAN"
    assert contrast_speaker(["JERRY: Hi.", "MAN: Excuse me."], "MAN") == "JERRY"
    tok = build_tiny_tokenizer()
    assert tok.decode(tag_ids(tok, "GEORGE")) == "GEORGE:"
    ids = name_ids(tok, ["GEORGE"]).tolist()
    assert set(tok.encode(" George", add_special_tokens=False)) <= set(ids)


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return sharp_model_dir(tmp_path_factory.mktemp("sharp") / "m")


def _forced_run(model, tok, settings, script_ids, monkeypatch):
    """Write `script_ids` as the scene (sampling forced), recording every decode call's
    work and the scores handed to sampling."""
    forced = iter(script_ids)
    seen_scores: list[torch.Tensor] = []

    def forced_sample(scores, generator):
        seen_scores.append(scores.clone())
        return torch.tensor([next(forced)])

    calls: list[list[tuple[int, list[int], int]]] = []
    real = model.decode

    def spy(work):
        calls.append([(seq, list(tokens), pos) for seq, tokens, pos in work])
        return real(work)

    monkeypatch.setattr(batcher_module, "sample", forced_sample)
    monkeypatch.setattr(model, "decode", spy)
    b = batcher_module.ContinuousBatcher(model, tok)
    row = b.add(PROMPT, settings)
    prompt_ids = list(row.pending)
    scene = b.drain()[0][1]
    monkeypatch.undo()
    return prompt_ids, calls, seen_scores, scene


def test_voice_sequence_reads_the_other_tag_inside_each_line(sharp_dir, monkeypatch):
    pytest.importorskip("llama_cpp")
    from sitcom.model import serving

    model, tok = serving.load_llamacpp(sharp_dir, max_batch=3, n_threads=1)
    line1 = tok.encode("GEORGE: Serenity now!\n", add_special_tokens=False)
    line2 = tok.encode("JERRY: What?\n", add_special_tokens=False)
    script = line1 + line2
    plain = SceneSettings(max_new_tokens=max(16, len(script)), max_lines=2, guidance=1, voice=0)
    voiced = plain.with_changes(voice=2.0)
    prompt, calls, scores, scene = _forced_run(model, tok, voiced, script, monkeypatch)
    _, plain_calls, plain_scores, plain_scene = _forced_run(model, tok, plain, script, monkeypatch)
    assert scene.lines[-2:] == plain_scene.lines[-2:] == ["GEORGE: Serenity now!", "JERRY: What?"]
    assert all(len(c) == 1 for c in plain_calls)  # one sequence a step without voice
    # The voice sequence (seq 1) joins once a tag is written: first the opening and MAN's
    # tag in place of George's, then, at the next line, George's line as written and MAN's
    # tag in place of Jerry's.
    voice_work = [item for c in calls for item in c if item[0] == 1]
    assert voice_work[0] == (1, prompt + tag_ids(tok, "MAN"), 0)
    tag1, tag2 = len(tag_ids(tok, "GEORGE")), len(tag_ids(tok, "JERRY"))
    second = next(w for w in voice_work[1:] if len(w[1]) > 1)
    assert second == (1, line1 + tag_ids(tok, "MAN"), len(prompt))
    # Inside a line the scores are contrasted; while a tag is written they are the plain ones.
    for step, (s, p) in enumerate(zip(scores, plain_scores, strict=True)):
        in_tag = step < tag1 or len(line1) <= step < len(line1) + tag2
        assert torch.equal(s, p) == in_tag, step


@pytest.mark.asyncio
async def test_engine_drops_voice_before_guidance_when_sequences_run_short(sharp_dir, monkeypatch):
    pytest.importorskip("llama_cpp")
    from sitcom.engine import SceneEngine

    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    both = SceneSettings(max_new_tokens=24, guidance=2.0, voice=1.0)
    engine = SceneEngine(str(sharp_dir), max_batch=2)
    await engine.start()
    try:
        scene = await (await engine.submit(PROMPT, both, "u1")).result()
        guided = await (await engine.submit(PROMPT, both.with_changes(voice=0), "u1")).result()
    finally:
        await engine.close()
    assert len(scene.lines) >= 1 and scene.candidates == guided.candidates == 1
    # three sequences a guided, voiced candidate: eight hold two of a best of 3
    engine = SceneEngine(str(sharp_dir), max_batch=8)
    await engine.start()
    try:
        scene = await (await engine.submit(PROMPT, both.with_changes(best_of=3), "u1")).result()
    finally:
        await engine.close()
    assert scene.candidates == 2


def test_transformers_contrasts_each_line_with_the_other_tag(sharp_dir):
    """RowVoice (the transformers path) gives the same formula the llama.cpp voice sequence
    does: inside George's line, the scene with MAN's tag instead is the other side."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sitcom.decoding.plan import plan_batch
    from sitcom.decoding.voice import Raw, RowVoice, voiced_line

    hf = AutoModelForCausalLM.from_pretrained(sharp_dir).eval()
    tok = AutoTokenizer.from_pretrained(sharp_dir)
    plan = plan_batch(tok, [PROMPT], SceneSettings(voice=2.0))
    raw = Raw()
    processor = RowVoice(plan.voice, hf, tok, plan, raw)
    line = tok.encode("GEORGE: Serenity now!\n", add_special_tokens=False)
    speaker, k = voiced_line(tok, line)
    assert speaker == "GEORGE" and 0 < k < len(line)
    names = name_ids(tok, ["GEORGE", "MAN"])
    with torch.no_grad():
        for n in range(len(line)):  # the step that writes the line's token n
            ids = torch.tensor([plan.row_ids[0] + line[:n]])
            logits = hf(input_ids=ids).logits[:, -1]
            out = processor(ids, raw(ids, logits))
            if n < k:
                assert torch.equal(out, logits), n
                continue
            alt = plan.row_ids[0] + tag_ids(tok, "MAN") + line[k:n]
            other = hf(input_ids=torch.tensor([alt])).logits[:, -1]
            assert torch.allclose(out, voice(logits, logits, other, 2.0, names), atol=1e-5), n
            assert not torch.equal(out, logits)
