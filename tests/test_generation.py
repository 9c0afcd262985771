"""sitcom.decoding.generation on tiny models: batching, the format guards, stopping, cleaning."""

from __future__ import annotations

import pytest
import torch
from helpers import build_tiny_model, teleprompter_model
from transformers import (
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sitcom.decoding.generation import autocast_dtype, generate_scenes, write_scenes
from sitcom.decoding.guards import LoopGuard, ScriptRepetitionPenalty, _RowText
from sitcom.decoding.sampling import PerRowSampling, _TopKThenTopP
from sitcom.decoding.streaming import LineStreamer
from sitcom.decoding.vocab import speaker_token_ids, stop_token_ids
from sitcom.decoding.vocab import vocab_info as _vocab_info
from sitcom.scenes.lines import clean_lines, line_key
from sitcom.scenes.script import END_OF_TEXT
from sitcom.settings import SceneSettings

GREEDY = dict(do_sample=False, precision="fp32")


@pytest.fixture(scope="module")
def tiny_model(tiny_tokenizer):
    return build_tiny_model(tiny_tokenizer)


def scripted_model(tokenizer, text: str):
    """A tiny Llama that, greedily, cycles through `text` forever: each step its logits get
    a large bonus on the token that follows the current one in `text`; its second choice
    is always to start `text` over."""
    model = build_tiny_model(tokenizer)
    ids = tokenizer.encode(text)
    assert len(set(ids)) == len(ids), "script tokens must be unique to define a cycle"
    vocab = model.config.vocab_size
    bonus = torch.zeros(vocab, vocab)
    bonus[:, ids[0]] = 50.0
    for here, there in zip(ids, ids[1:] + ids[:1], strict=True):
        bonus[here, there] = 100.0

    def hook(module, args, kwargs, output):
        ids = args[0] if args else kwargs["input_ids"]  # guidance calls the model positionally
        last = ids[:, -1]
        output.logits[:, -1, :] += bonus[last]
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


def test_batched_greedy_equals_unbatched(tiny_model, tiny_tokenizer):
    prompts = [
        "Elaine: Jerry! George! You guys, listen!",
        "JERRY: Hello, Newman.\nNEWMAN: Hello, Jerry.\nKRAMER: Giddyup! I'm out there, Jerry!",
        "george: Serenity now!",
    ]
    for penalty in (1.0, 1.5):  # 1.5 checks that left padding is not penalised
        s = SceneSettings(max_new_tokens=40, repetition_penalty=penalty)
        batched = generate_scenes(tiny_model, tiny_tokenizer, prompts, s, **GREEDY)
        for prompt, together in zip(prompts, batched, strict=True):
            alone = generate_scenes(tiny_model, tiny_tokenizer, [prompt], s, **GREEDY)[0]
            assert alone.raw == together.raw
            assert alone.lines == together.lines
            assert alone.new_tokens == together.new_tokens


def test_prompt_lines_come_back_normalised(tiny_model, tiny_tokenizer):
    (lines,) = write_scenes(
        tiny_model,
        tiny_tokenizer,
        ["  Elaine:  Jerry! George!\n\nkramer: Giddyup!"],
        SceneSettings(max_new_tokens=16),
        seed=0,
    )
    assert lines[:2] == ["ELAINE: Jerry! George!", "KRAMER: Giddyup!"]


def test_per_row_settings_and_seed(tiny_model, tiny_tokenizer):
    prompts = ["JERRY: Hello, Newman.", "ELAINE: Get out!"]
    settings = [SceneSettings(max_new_tokens=16), SceneSettings(max_new_tokens=48, temperature=1.5)]
    first = generate_scenes(tiny_model, tiny_tokenizer, prompts, settings, seed=7)
    again = generate_scenes(tiny_model, tiny_tokenizer, prompts, settings, seed=7)
    assert [s.raw for s in first] == [s.raw for s in again]
    assert first[0].new_tokens <= 16  # each row keeps its own budget in a shared batch
    assert 0 < first[1].new_tokens <= 48


def test_per_row_sampling_uses_each_rows_warpers():
    torch.manual_seed(0)
    scores = torch.randn(2, 50)
    ids = torch.zeros(2, 3, dtype=torch.long)
    plain = SceneSettings(top_k=0, top_p=1.0, temperature=2.0)
    warp = PerRowSampling([SceneSettings(top_k=1), plain])
    out = warp(ids, scores.clone())
    assert torch.isfinite(out[0]).sum() == 1 and out[0].argmax() == scores[0].argmax()
    torch.testing.assert_close(out[1], scores[1] / 2.0)


def test_repetition_penalty_matches_transformers_without_exemptions():
    torch.manual_seed(0)
    scores = torch.randn(2, 30)
    ids = torch.tensor([[3, 4, 5, 4], [7, 8, 9, 10]])
    ours = ScriptRepetitionPenalty([1.7, 1.7], set(), torch.zeros(2, dtype=torch.long))
    theirs = RepetitionPenaltyLogitsProcessor(1.7)
    torch.testing.assert_close(ours(ids, scores.clone()), theirs(ids, scores.clone()))


def test_repetition_penalty_spares_format_tokens_and_padding(tiny_tokenizer):
    info = _vocab_info(tiny_tokenizer)
    newline = tiny_tokenizer.encode("\n")[0]
    colon = tiny_tokenizer.encode(":")[0]
    assert newline in info.format_ids.tolist() and colon in info.format_ids.tolist()
    speaker = tiny_tokenizer.encode("JERRY")
    word = tiny_tokenizer.encode(" soup")[-1]
    pad = tiny_tokenizer.pad_token_id
    exempt = set(info.format_ids.tolist()) | speaker_token_ids(tiny_tokenizer, ["JERRY"])
    row = [pad, pad, *speaker, colon, word, newline]
    ids = torch.tensor([row, row])
    vocab = len(tiny_tokenizer)
    scores = torch.full((2, vocab), 2.0)
    scores[:, word] = -2.0
    out = ScriptRepetitionPenalty([2.0, 1.0], exempt, torch.tensor([2, 0]))(ids, scores.clone())
    for token in [newline, colon, *speaker]:
        assert out[0, token] == scores[0, token]
    assert out[0, word] == -4.0  # a plain word is penalised
    assert out[0, pad] == 2.0  # left padding is not "seen"
    assert torch.equal(out[1], scores[1])  # penalty 1.0 leaves the row alone


def _guard_for(tokenizer, text: str):
    prompt, generated = text.split("|")
    prompt_ids = tokenizer.encode(prompt)
    ids = torch.tensor([prompt_ids + tokenizer.encode(generated)])
    stop_ids = stop_token_ids(tokenizer)
    ban = torch.cat([_vocab_info(tokenizer).newline_ids, torch.tensor(stop_ids)])
    rows = _RowText(tokenizer, len(prompt_ids), stop_ids)
    return LoopGuard([prompt], rows, ban), ids, ban


def test_loop_guard_bans_ending_a_repeated_line(tiny_tokenizer):
    vocab = len(tiny_tokenizer)
    guard, ids, ban = _guard_for(
        tiny_tokenizer, "JERRY: (to Elaine) I'm sorry.\n|ELAINE: (to Jerry) I'm sorry"
    )
    out = guard(ids, torch.zeros(1, vocab))
    assert torch.isinf(out[0, ban]).all()
    assert torch.isfinite(out[0]).sum() == vocab - len(set(ban.tolist()))
    # A new line may end normally.
    guard, ids, _ = _guard_for(tiny_tokenizer, "JERRY: I'm sorry.\n|ELAINE: No soup for you")
    assert torch.isfinite(guard(ids, torch.zeros(1, vocab))).all()


def test_loop_guard_stops_a_model_that_loops(tiny_tokenizer):
    model = scripted_model(tiny_tokenizer, "JERRY: I'm sorry.\n")
    prompt = "JERRY: I'm sorry."
    # Without the guard the model repeats the line verbatim...
    enc = tiny_tokenizer(prompt + "\n", return_tensors="pt")
    plain = model.generate(**enc, do_sample=False, max_new_tokens=30)
    assert tiny_tokenizer.decode(plain[0, enc["input_ids"].shape[1] :]).count("I'm sorry.\n") >= 3
    # ... with it, no finished line repeats an earlier one.
    (scene,) = generate_scenes(
        model, tiny_tokenizer, [prompt], SceneSettings(max_new_tokens=80), **GREEDY
    )
    finished = [prompt, *scene.raw.split("\n")[:-1]]
    keys = [line_key(line) for line in finished]
    assert len(finished) >= 3 and len(keys) == len(set(keys))


def test_stops_at_scene_heading(tiny_tokenizer):
    model = teleprompter_model(tiny_tokenizer, "ELAINE: Get out!\n[Scene: Jerry's apartment]\n")
    (scene,) = generate_scenes(
        model,
        tiny_tokenizer,
        ["JERRY: Hello, Newman."],
        SceneSettings(max_new_tokens=200),
        **GREEDY,
    )
    assert scene.finished and scene.new_tokens < 40
    assert scene.lines == ["JERRY: Hello, Newman.", "ELAINE: Get out!"]


def test_stops_at_end_of_text(tiny_tokenizer):
    model = teleprompter_model(tiny_tokenizer, "GEORGE: Serenity now!" + END_OF_TEXT)
    (scene,) = generate_scenes(
        model,
        tiny_tokenizer,
        ["JERRY: Hello, Newman."],
        SceneSettings(max_new_tokens=200),
        **GREEDY,
    )
    assert scene.finished
    assert scene.new_tokens == len(tiny_tokenizer.encode("GEORGE: Serenity now!" + END_OF_TEXT))
    assert scene.lines == ["JERRY: Hello, Newman.", "GEORGE: Serenity now!"]


def test_streamer_reports_lines_as_they_finish(tiny_tokenizer):
    model = teleprompter_model(tiny_tokenizer, "ELAINE: Get out!\nGEORGE: What?\n")
    seen: list[list[str]] = []
    prompts = ["JERRY: Hello, Newman."]
    streamer = LineStreamer(tiny_tokenizer, prompts, lambda row, lines: seen.append(lines))
    (scene,) = generate_scenes(
        model,
        tiny_tokenizer,
        prompts,
        SceneSettings(max_new_tokens=60),
        streamer=streamer,
        **GREEDY,
    )
    assert seen[0] == ["JERRY: Hello, Newman.", "ELAINE: Get out!"]
    assert seen[1] == ["JERRY: Hello, Newman.", "ELAINE: Get out!", "GEORGE: What?"]
    assert seen[-1] == scene.lines


def test_clean_lines():
    prompt = "JERRY: Hello, Newman.\n"
    generated = (
        "NEWMAN:   Hello,\tJerry.\n"
        "\n"
        "newman: (to Jerry) Hello, Jerry!\n"  # a duplicate, apart from speaker/parenthetical
        "(Kramer bursts in)\n"
        "kramer: Giddyup!\n"
        "and then it was all prose without a speaker\n"
        "#$%^ \ufffd\x07 @@\n"
        "ELAINE: I was cut off mid"
    )
    assert clean_lines(prompt, generated, complete=False) == [
        "JERRY: Hello, Newman.",
        "NEWMAN: Hello, Jerry.",
        "(Kramer bursts in)",
        "KRAMER: Giddyup!",
    ]
    assert clean_lines(prompt, "ELAINE: Done.", complete=True)[-1] == "ELAINE: Done."
    assert clean_lines(prompt, "ELAINE: Done.\n[Scene: Monk's]\nGEORGE: Hi.\n", True) == [
        "JERRY: Hello, Newman.",
        "ELAINE: Done.",
    ]
    # No well-formed line at all: keep the readable prose rather than nothing.
    assert clean_lines(prompt, "it was a dark night\n", False)[-1] == "it was a dark night"


def test_precision_choice(tiny_model, tiny_tokenizer, monkeypatch):
    assert autocast_dtype(tiny_model, "fp32") is None
    assert autocast_dtype(tiny_model, "bf16") is torch.bfloat16
    monkeypatch.setenv("SITCOM_PRECISION", "fp32")
    assert autocast_dtype(tiny_model) is None
    monkeypatch.setenv("SITCOM_PRECISION", "auto")
    assert autocast_dtype(tiny_model) is None  # CPU decoding: fp32 measured faster
    monkeypatch.setenv("SITCOM_PRECISION", "bf16")
    assert autocast_dtype(tiny_model) is torch.bfloat16
    (lines,) = write_scenes(
        tiny_model, tiny_tokenizer, ["JERRY: Hi."], SceneSettings(16), precision="bf16", seed=0
    )
    assert lines[0] == "JERRY: Hi."


def test_too_long_prompt_is_a_value_error(tiny_model, tiny_tokenizer):
    with pytest.raises(ValueError, match="too long"):
        write_scenes(
            tiny_model,
            tiny_tokenizer,
            ["JERRY: " + "soup " * 1000],
            SceneSettings(max_new_tokens=16),
        )


@pytest.mark.parametrize("top_k,top_p", [(50, 0.95), (5, 0.5), (1, 0.3), (300, 0.9)])
def test_top_k_then_top_p_matches_transformers_chain(top_k, top_p):
    torch.manual_seed(0)
    ids = torch.zeros(4, 1, dtype=torch.long)
    for scores in (torch.randn(4, 500) * 3, torch.randn(4, 500).round()):  # the 2nd has ties
        want = TopPLogitsWarper(top_p)(ids, TopKLogitsWarper(top_k)(ids, scores.clone()))
        got = _TopKThenTopP(top_k, top_p)(ids, scores.clone())
        torch.testing.assert_close(got, want)


def test_row_text_is_incremental_and_exact(tiny_tokenizer):
    # Multi-byte characters split over tokens, and newlines inside and around lines.
    text = "JERRY: café ☕ — naïve?\n\nGEORGE: 日本語!\n ELAINE: ok\n\tx"
    prompt = tiny_tokenizer.encode("JERRY: Hi.")
    new = tiny_tokenizer.encode(text)
    stop = stop_token_ids(tiny_tokenizer)
    ids = torch.tensor([prompt + new, prompt + new[::-1]])
    rows = _RowText(tiny_tokenizer, len(prompt), stop)
    for end in range(len(prompt), ids.shape[1] + 1):
        want = tiny_tokenizer.batch_decode(ids[:, len(prompt) : end])
        assert rows.texts(ids[:, :end]) == want
    assert rows._head[0]  # finished lines really were kept, not decoded again
    ended = torch.cat([ids, torch.tensor([[5], [stop[0]]])], dim=1)
    assert rows.texts(ended)[1] is None and rows.texts(ended)[0] is not None


def test_repetition_penalty_step_by_step_equals_from_scratch():
    torch.manual_seed(0)
    ids = torch.randint(0, 40, (3, 12))
    pads = torch.tensor([0, 2, 5])
    stepwise = ScriptRepetitionPenalty([1.5, 2.0, 1.3], {3, 7}, pads)
    for end in range(6, 13):
        scores = torch.randn(3, 40)
        fresh = ScriptRepetitionPenalty([1.5, 2.0, 1.3], {3, 7}, pads)
        torch.testing.assert_close(
            stepwise(ids[:, :end], scores.clone()), fresh(ids[:, :end], scores.clone())
        )


def test_premise_bias_raises_the_openings_own_words_by_the_rows_setting():
    from helpers import build_tiny_tokenizer

    from sitcom.decoding.guards import PremiseBias

    tiny_tokenizer = build_tiny_tokenizer(" jacket Peterman jacket Peterman selling" * 50)

    prompts = ["KRAMER: I'm selling my jacket to Peterman.", "JERRY: Hello, Newman."]
    guard = PremiseBias(tiny_tokenizer, prompts, [1.5, 1.5])
    raised = guard.rows[0][0].tolist()
    jacket = tiny_tokenizer.encode(" jacket", add_special_tokens=False)[0]
    assert jacket in raised
    assert tiny_tokenizer.encode(" Jerry", add_special_tokens=False)[0] not in raised
    for word in raised:  # a whole word's start, never a one- or two-letter piece
        assert len(tiny_tokenizer.decode([word]).strip()) >= 3
    scores = torch.zeros(2, len(tiny_tokenizer))
    out = guard(torch.zeros(2, 1, dtype=torch.long), scores)
    assert out[0, jacket] == 1.5 and out[0].sum() == 1.5 * len(raised)
    assert out[1].sum() == 1.5 * len(guard.rows[1][0])  # each row its own opening's words
    assert scores.sum() == 0  # the input is not changed in place
    off = PremiseBias(tiny_tokenizer, prompts, [0.0, 0.0])  # the default: nothing raised
    assert off(torch.zeros(2, 1, dtype=torch.long), scores) is scores


def test_cast_turns_draw_each_speaker_from_the_scenes_cast_never_twice_running(tiny_tokenizer):
    from sitcom.scenes.script import MAIN_CHARACTERS, speaker_of

    model = build_tiny_model(tiny_tokenizer)  # a random model that ends lines often
    newline = tiny_tokenizer.encode("\n", add_special_tokens=False)[0]

    def short_lines(module, args, kwargs, output):
        output.logits[:, -1, newline] += 6.0
        return output

    model.register_forward_hook(short_lines, with_kwargs=True)
    prompts = ["NEWMAN: Hello, Jerry.", "ELAINE: Get out!\nGEORGE: Serenity now!"]
    settings = SceneSettings(max_new_tokens=160, temperature=1.5, cast_turns=1)
    lines_seen = 0
    for seed in range(3):
        for prompt, scene in zip(
            prompts,
            generate_scenes(model, tiny_tokenizer, prompts, settings, seed=seed),
            strict=True,
        ):
            cast = {speaker_of(x) for x in prompt.splitlines()} | set(MAIN_CHARACTERS)
            lines = (prompt + "\n" + scene.raw).split("\n")
            previous = speaker_of(prompt.splitlines()[-1])
            for line in lines[len(prompt.splitlines()) : -1]:  # finished lines only
                speaker = line.split(":", 1)[0]
                assert speaker in cast and speaker != previous, (line, previous)
                previous = speaker
                lines_seen += 1
    assert lines_seen >= 6  # the random model writes lines; each one was constrained

    # Off (the default): the same random model invents speakers and runs lines on.
    free = generate_scenes(
        model, tiny_tokenizer, prompts, settings.with_changes(cast_turns=0), seed=0
    )
    assert any(x.split(":", 1)[0] not in MAIN_CHARACTERS for s in free for x in s.raw.split("\n"))


def test_cast_turns_leave_a_row_with_it_off_as_it_was(tiny_model, tiny_tokenizer):
    prompts = ["JERRY: Hello, Newman.", "KRAMER: Giddyup!"]
    off = SceneSettings(max_new_tokens=40)
    alone = generate_scenes(tiny_model, tiny_tokenizer, prompts[:1], off, **GREEDY)[0]
    mixed = generate_scenes(
        tiny_model, tiny_tokenizer, prompts, [off, off.with_changes(cast_turns=1)], **GREEDY
    )
    assert mixed[0].raw == alone.raw


def test_longer_lines_lowers_a_spoken_lines_ends_by_the_rows_setting(tiny_tokenizer):
    """Inside a spoken line every line-ending token loses the row's `longer_lines` nats;
    a row with it off, a stage direction and a line not yet begun keep their scores."""
    from sitcom.decoding.guards import LongerLines
    from sitcom.decoding.plan import plan_batch

    prompt = "JERRY: Hello, Newman.\n"
    stop_ids = stop_token_ids(tiny_tokenizer)
    ends = torch.cat([_vocab_info(tiny_tokenizer).newline_ids, torch.tensor(stop_ids)])
    vocab = len(tiny_tokenizer)

    def run(generated: str, strength: float) -> tuple[torch.Tensor, torch.Tensor]:
        prompt_ids = tiny_tokenizer.encode(prompt)
        ids = torch.tensor([prompt_ids + tiny_tokenizer.encode(generated)])
        rows = _RowText(tiny_tokenizer, len(prompt_ids), stop_ids)
        scores = torch.zeros(1, vocab)
        return LongerLines(rows, ends, [strength])(ids, scores), scores

    out, scores = run("GEORGE: I was in the pool", 1.5)
    lowered = torch.zeros(1, vocab)
    lowered[0, ends] = -1.5
    assert torch.equal(out, lowered) and out is not scores and scores.abs().sum() == 0
    for generated, strength in [
        ("GEORGE: I was in the pool", 0.0),  # the row's setting is off
        ("(Kramer enters", 1.5),  # a stage direction
        ("GEORGE: I was in the pool.\n", 1.5),  # a line just ended, the next not begun
    ]:
        out, scores = run(generated, strength)
        assert torch.equal(out, scores), generated
    plan = plan_batch(
        tiny_tokenizer, [prompt, prompt], [SceneSettings(longer_lines=2.0), SceneSettings()]
    )
    (wired,) = [p for p in plan.processors if isinstance(p, LongerLines)]
    assert wired.strengths == [2.0, 0.0]
