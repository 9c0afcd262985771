"""SceneEngine on llama.cpp (tiny GGUF models): continuous batching, honest queue positions,
bounded shutdown with partial scenes."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch
from helpers import PROMPT, build_tiny_model, build_tiny_tokenizer

from sitcom import llamacpp
from sitcom.engine import EngineError, SceneEngine
from sitcom.settings import SceneSettings
from training.gguf_export import export_gguf

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def serve_with_llamacpp(monkeypatch):
    """Continuous batching is what these tests are about: llama.cpp serves the tiny GGUFs
    without its self-test child (test_llamacpp_check covers the self-test)."""
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")


def scene_settings(tokens: int) -> SceneSettings:
    return SceneSettings(max_new_tokens=tokens, temperature=0.1, top_k=1, repetition_penalty=1.0)


@pytest.fixture(scope="module")
def endless_dir(tmp_path_factory):
    """A tiny Llama (as test_llamacpp.bigram_model_dir) that writes `GEORGE: Serenity now!`
    lines forever: when the loop guard bans ending a repeated line, its second choice
    after `!` is ` What`, which leads back to `!`. So every line is new
    (`GEORGE: Serenity now! What! What!`...), it never writes end-of-text, and each scene
    runs to exactly its own token budget."""
    tokenizer = build_tiny_tokenizer()
    cycle = tokenizer.encode("\nGEORGE: Serenity now!")
    (what,) = tokenizer.encode(" What")
    steps = [(a, b, 10.0) for a, b in zip(cycle, cycle[1:] + cycle[:1], strict=True)]
    steps += [(cycle[-1], what, 5.0), (what, cycle[-1], 10.0)]
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    hidden = model.config.hidden_size
    with torch.no_grad():
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        head = torch.zeros(model.config.vocab_size, hidden)
        for slot, token in enumerate([*cycle, what]):
            emb[token, slot] = 1.0
        slot_of = {token: slot for slot, token in enumerate([*cycle, what])}
        for here, there, logit in steps:
            head[there, slot_of[here]] = logit
        model.model.embed_tokens.weight = torch.nn.Parameter(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    path = tmp_path_factory.mktemp("endless") / "m"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    export_gguf(path, qtype="f32")
    return path


def slow_loader(delay: float):
    """The real llama.cpp loader, with `delay` seconds added to every decode step."""
    def loader(name: str):
        model, tokenizer = llamacpp.load_llamacpp(name, max_batch=2, n_threads=1)
        decode = model.decode

        def slow(work):
            time.sleep(delay)
            return decode(work)

        model.decode = slow
        return model, tokenizer

    return loader


async def test_short_scene_leaves_first_and_a_queued_one_takes_its_slot(endless_dir):
    engine = SceneEngine(str(endless_dir), max_batch=2, per_user_limit=8)
    await engine.start()
    order: list[str] = []
    try:
        jobs = {}
        for name, tokens in (("short", 16), ("long", 300), ("third", 16)):
            jobs[name] = await engine.submit(PROMPT, scene_settings(tokens), user_id=name)
            task = asyncio.ensure_future(jobs[name].result())
            task.add_done_callback(lambda _t, name=name: order.append(name))
        assert [j.position for j in jobs.values()] == [1, 2, 3]  # two slots, but honest
        scenes = {name: await job.result() for name, job in jobs.items()}
    finally:
        await engine.close()
    assert isinstance(engine._active.model, llamacpp.LlamaCppModel)
    # Each row kept its own budget; the third scene ran in the slot the short one freed
    # while the long one was still being written (batch-at-a-time gives short, long, third).
    assert {n: s.new_tokens for n, s in scenes.items()} == {"short": 16, "long": 300, "third": 16}
    assert order == ["short", "third", "long"]
    long_end = jobs["long"].started + scenes["long"].seconds
    assert jobs["short"].started + scenes["short"].seconds <= jobs["third"].started < long_end
    for scene in scenes.values():
        assert scene.lines[:2] == [PROMPT, "GEORGE: Serenity now!"] and not scene.partial
    assert engine.running == engine.queued == 0


async def test_eta_is_known_after_the_first_scene(endless_dir):
    engine = SceneEngine(str(endless_dir), max_batch=2, per_user_limit=8)
    await engine.start()
    try:
        first = await engine.submit(PROMPT, scene_settings(16))
        assert first.eta_s is None
        await first.result()
        later = await engine.submit(PROMPT, scene_settings(32))
        assert later.position == 1 and later.eta_s > 0
        await later.result()
    finally:
        await engine.close()


async def test_close_delivers_running_scenes_as_partial_at_the_deadline(endless_dir):
    engine = SceneEngine(str(endless_dir), max_batch=2, per_user_limit=8, loader=slow_loader(0.02))
    await engine.start()
    running = [await engine.submit(PROMPT, scene_settings(400), user_id=str(i)) for i in (1, 2)]
    for job in running:  # wait until both have a line of their own
        async for _ in job.stream():
            break
    queued = await engine.submit(PROMPT, scene_settings(400), user_id="3")
    assert queued.position == 3
    await engine.close(deadline_s=0.1)
    for job in running:
        scene = await job.result()
        assert scene.partial and "shutting down" in scene.note
        assert scene.lines[:2] == [PROMPT, "GEORGE: Serenity now!"] and scene.new_tokens < 400
    with pytest.raises(EngineError, match="shutting down"):  # it never started
        await queued.result()


async def test_second_close_cuts_the_running_scene_now(endless_dir):
    engine = SceneEngine(str(endless_dir), max_batch=2, loader=slow_loader(0.05))
    await engine.start()
    job = await engine.submit(PROMPT, scene_settings(400))  # ~20 s at this speed
    async for _ in job.stream():
        break
    first = asyncio.ensure_future(engine.close(deadline_s=600))
    await asyncio.sleep(0.05)
    assert not first.done()
    await engine.close()  # the second call: deadline now
    await first
    scene = await job.result()
    assert scene.partial and scene.new_tokens < 400
