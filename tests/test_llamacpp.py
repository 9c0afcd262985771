"""sitcom.model.llamacpp on tiny GGUF models: budgets, end-of-text, the loop guard, batching, and
the same scenes as the transformers path."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPT, build_tiny_model, build_tiny_tokenizer

from sitcom.decoding import generation
from sitcom.decoding.sampling import sample
from sitcom.model import llamacpp, serving
from sitcom.scenes.lines import line_key
from sitcom.scenes.script import END_OF_TEXT
from sitcom.settings import SceneSettings
from training.gguf_export import export_gguf

pytest.importorskip("llama_cpp")


def bigram_model_dir(path, text: str):
    """A tiny Llama that greedily cycles through `text`: its blocks add nothing to the
    residual stream, each token of `text` embeds as its own unit vector, and the LM head maps
    that vector to the next token of `text`. Plain weights, so the same model runs in
    transformers and (exported) in llama.cpp; tokens outside `text` get flat logits."""
    tokenizer = build_tiny_tokenizer()
    ids = tokenizer.encode(text)
    assert len(set(ids)) == len(ids), "script tokens must be unique to define a cycle"
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    hidden = model.config.hidden_size
    assert len(ids) <= hidden
    with torch.no_grad():
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        head = torch.zeros(model.config.vocab_size, hidden)
        for slot, (here, there) in enumerate(zip(ids, ids[1:] + ids[:1], strict=True)):
            emb[here, slot] = 1.0
            head[there, slot] = 10.0
        model.model.embed_tokens.weight = torch.nn.Parameter(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    export_gguf(path, qtype="f32")
    return path


@pytest.fixture(scope="module")
def looping_dir(tmp_path_factory):
    # The prompt line itself, forever: what a model does when the loop guard is off.
    return bigram_model_dir(tmp_path_factory.mktemp("loop") / "m", "\n" + PROMPT)


@pytest.fixture(scope="module")
def ending_dir(tmp_path_factory):
    return bigram_model_dir(
        tmp_path_factory.mktemp("end") / "m", "\nGEORGE: Serenity now!" + END_OF_TEXT
    )


def _load(path):
    # eight sequences: a default row takes three (itself, guidance's twin, voice's)
    model, tokenizer = serving.load_llamacpp(path, max_batch=8, n_threads=1)
    return model, tokenizer


def test_find_gguf(tiny_model_dir, looping_dir):
    assert serving.find_gguf(tiny_model_dir) is None  # no export yet: serve with torch
    assert serving.find_gguf(looping_dir) == looping_dir / "model.gguf"
    assert serving.find_gguf("smollm2").suffix == ".gguf"


def test_stops_at_end_of_text(ending_dir):
    model, tok = _load(ending_dir)
    (scene,) = llamacpp.generate_scenes(
        model, tok, [PROMPT], SceneSettings(max_new_tokens=200), do_sample=False
    )
    assert scene.finished
    assert scene.lines == [PROMPT, "GEORGE: Serenity now!"]
    # The prompt ends with its newline, so the model starts at GEORGE.
    assert scene.new_tokens == len(tok.encode("GEORGE: Serenity now!" + END_OF_TEXT))


def test_loop_guard_and_token_budget(looping_dir):
    model, tok = _load(looping_dir)
    from transformers import AutoModelForCausalLM

    # Without the guard the model repeats the prompt line verbatim...
    hf = AutoModelForCausalLM.from_pretrained(looping_dir).eval()
    enc = tok(PROMPT, return_tensors="pt")
    plain = hf.generate(**enc, do_sample=False, max_new_tokens=30)
    assert tok.decode(plain[0, enc["input_ids"].shape[1] :]).count(PROMPT + "\n") >= 2
    # ... through llama.cpp with the guard, no finished line repeats an earlier one,
    for budget in (16, 40):
        (scene,) = llamacpp.generate_scenes(
            model, tok, [PROMPT], SceneSettings(max_new_tokens=budget), do_sample=False
        )
        finished = [PROMPT, *scene.raw.split("\n")[:-1]]
        keys = [line_key(line) for line in finished]
        assert len(keys) == len(set(keys))
        # ... and it never ends, so it runs to exactly its token budget.
        assert not scene.finished and scene.new_tokens == budget
        assert len(tok.encode(scene.raw)) == budget


@pytest.mark.parametrize("penalty", [1.0, 1.5])
def test_same_scenes_as_transformers(ending_dir, looping_dir, penalty):
    """Greedy: llama.cpp and transformers see the same logits, so every guard must act the
    same way, batched (rows of different lengths and budgets) and alone."""
    from transformers import AutoModelForCausalLM

    prompts = [PROMPT, "GEORGE: Serenity now!\nJERRY: Hello, Newman.", "elaine: Get out!"]
    settings = [  # unguided: test_guidance compares the guided twins
        SceneSettings(max_new_tokens=n, repetition_penalty=penalty, guidance=1.0)
        for n in (30, 50, 20)
    ]
    for path in (ending_dir, looping_dir):
        model, tok = _load(path)
        hf = AutoModelForCausalLM.from_pretrained(path).eval()
        want = generation.generate_scenes(
            hf, tok, prompts, settings, do_sample=False, precision="fp32"
        )
        got = llamacpp.generate_scenes(model, tok, prompts, settings, do_sample=False)
        assert [(s.lines, s.new_tokens, s.finished) for s in got] == [
            (s.lines, s.new_tokens, s.finished) for s in want
        ]
        alone = llamacpp.generate_scenes(model, tok, prompts[1:2], settings[1:2], do_sample=False)
        assert alone[0].raw == got[1].raw


def test_a_scene_stops_after_its_own_number_of_lines(tmp_path):
    """max_lines: both backends stop a row right after its n-th new line, as a finished
    scene (not cut off), each row by its own budget, whatever the token budget left."""
    from helpers import transition_model_dir
    from transformers import AutoModelForCausalLM

    # new lines forever: `GEORGE: Serenity now!`, then `... now! What!`, `... What! What!`
    tok = build_tiny_tokenizer()
    cycle = tok.encode("\nGEORGE: Serenity now!")
    (what,) = tok.encode(" What")
    steps = [(a, b, 10.0) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
    steps += [(cycle[-1], what, 5.0), (what, cycle[-1], 10.0)]
    path = transition_model_dir(tmp_path / "m", tok, steps)
    model, tok = _load(path)
    hf = AutoModelForCausalLM.from_pretrained(path).eval()
    settings = [SceneSettings(max_new_tokens=300, max_lines=n) for n in (1, 3)]
    want = generation.generate_scenes(hf, tok, [PROMPT] * 2, settings, do_sample=False)
    got = llamacpp.generate_scenes(model, tok, [PROMPT] * 2, settings, do_sample=False)
    for scenes in (want, got):
        assert [len(s.lines) - 1 for s in scenes] == [1, 3]
        assert all(s.raw.endswith("\n") and s.finished and s.new_tokens < 300 for s in scenes)
    assert [s.raw for s in got] == [s.raw for s in want]
    (longer,) = llamacpp.generate_scenes(
        model, tok, [PROMPT], SceneSettings(max_new_tokens=300, max_lines=40), do_sample=False
    )
    assert len(longer.lines) - 1 > 3


def test_sampling_is_seeded(tiny_model_dir, tmp_path):
    import shutil

    path = shutil.copytree(tiny_model_dir, tmp_path / "m")
    export_gguf(path, qtype="f32")
    model, tok = _load(path)
    s = SceneSettings(max_new_tokens=24, temperature=1.5, top_k=0, top_p=1.0)
    a = llamacpp.generate_scenes(model, tok, [PROMPT, PROMPT], s, seed=7)
    b = llamacpp.generate_scenes(model, tok, [PROMPT, PROMPT], s, seed=7)
    c = llamacpp.generate_scenes(model, tok, [PROMPT, PROMPT], s, seed=8)
    assert [x.raw for x in a] == [x.raw for x in b]
    assert a[0].raw != a[1].raw  # rows draw separately
    assert [x.raw for x in a] != [x.raw for x in c]


def test_bad_requests_are_value_errors(looping_dir):
    model, tok = _load(looping_dir)
    with pytest.raises(ValueError, match="prompts"):
        llamacpp.generate_scenes(model, tok, [PROMPT] * 9, SceneSettings())
    with pytest.raises(ValueError, match="too long"):
        llamacpp.generate_scenes(model, tok, [PROMPT * 200], SceneSettings(max_new_tokens=400))
    with pytest.raises(ValueError, match="max_new_tokens"):
        llamacpp.generate_scenes(model, tok, [PROMPT], SceneSettings(max_new_tokens=5))


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_engine_serves_a_checkpoint_with_gguf_through_llamacpp(ending_dir):
    """The bot's engine picks llama.cpp for a checkpoint holding model.gguf and serves
    concurrent requests (batching itself is covered by test_same_scenes_as_transformers)."""
    import asyncio

    from sitcom.engine import SceneEngine

    engine = SceneEngine(str(ending_dir), max_batch=4)
    await engine.start()
    try:
        assert isinstance(engine._active.model, llamacpp.LlamaCppModel)
        jobs = [
            await engine.submit(PROMPT, SceneSettings(max_new_tokens=24, temperature=0.1), f"u{i}")
            for i in range(3)
        ]
        scenes = await asyncio.gather(*(job.result() for job in jobs))
    finally:
        await engine.close()
    for scene in scenes:
        assert scene.lines == [PROMPT, "GEORGE: Serenity now!"]


def test_sampling_draws_only_candidates_and_follows_the_distribution():
    generator = torch.Generator().manual_seed(0)
    scores = torch.full((2, 1000), -float("inf"))
    scores[0, [3, 500]] = torch.tensor([0.0, 1.0])  # p = 0.27 / 0.73
    scores[1, 7] = 2.0
    draws = torch.stack([sample(scores, generator) for _ in range(4000)])
    assert set(draws[:, 0].tolist()) == {3, 500} and set(draws[:, 1].tolist()) == {7}
    assert abs((draws[:, 0] == 500).float().mean().item() - 0.731) < 0.03
    dense = torch.zeros(1, 1000)  # most tokens finite: the full-vocabulary route
    assert 0 <= sample(dense, generator).item() < 1000


def test_decode_follows_the_thread_policy(looping_dir):
    """Each decode step applies the policy's current count to the llama.cpp context."""
    import llama_cpp

    model, tok = serving.load_llamacpp(looping_dir, max_batch=1)  # SITCOM_THREADS (auto)
    wanted = iter([1, 2, 1])
    model.policy.threads = lambda: next(wanted)
    for expected in (1, 2, 1):
        model.decode([(0, tok.encode(PROMPT), 0)])
        model.reset()
        assert llama_cpp.llama_n_threads(model._ctx) == expected == model.threads


def test_llamacpp_log_keeps_its_levels_and_only_errors_reach_the_user(looping_dir, caplog, capfd):
    """llama.cpp's warnings (one per adapted layer of a LoRA on Gemma, for one) are not
    printed: its log goes to the `llama-cpp-python` logger at the levels ggml.h numbers."""
    import logging

    model, _ = serving.load_llamacpp(looping_dir, max_batch=1, n_threads=1)
    model.close()
    callback = llamacpp._log_callback
    assert callback is not None
    with caplog.at_level(logging.DEBUG, logger="llama-cpp-python"):
        callback(3, b"lora for 'blk.0' cannot use buft, fallback to CPU\n", None)
        callback(4, b"could not load\n", None)
        callback(5, b" the rest of that error\n", None)
    assert [(r.levelno, r.getMessage()) for r in caplog.records] == [
        (logging.WARNING, "lora for 'blk.0' cannot use buft, fallback to CPU"),
        (logging.ERROR, "could not load"),
        (logging.ERROR, " the rest of that error"),
    ]
    caplog.clear()
    callback(3, b"a warning nobody asked for\n", None)  # the logger is at ERROR by default
    assert not caplog.records
    assert "a warning nobody asked for" not in capfd.readouterr().err
