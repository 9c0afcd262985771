"""SceneEngine on llama.cpp (tiny GGUF models): continuous batching, honest queue positions,
bounded shutdown with partial scenes."""

from __future__ import annotations

import asyncio
import time

import pytest
from helpers import PROMPT, build_tiny_tokenizer, transition_model_dir

from sitcom.engine import EngineError, SceneEngine
from sitcom.model import llamacpp, serving
from sitcom.settings import SceneSettings

pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.asyncio


@pytest.fixture(autouse=True)
def serve_with_llamacpp(monkeypatch):
    """Continuous batching is what these tests are about: llama.cpp serves the tiny GGUFs
    without its self-test child (test_llamacpp_check covers the self-test)."""
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")


def scene_settings(tokens: int) -> SceneSettings:
    return SceneSettings(  # scenes that run to their token budget: no line budget first
        max_new_tokens=tokens,
        max_lines=40,
        temperature=0.1,
        top_k=1,
        repetition_penalty=1.0,
        best_of=1,
        guidance=1.0,  # one sequence a scene: these tests count slots
        voice=0,
    )


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
    return transition_model_dir(tmp_path_factory.mktemp("endless") / "m", tokenizer, steps)


def slow_loader(delay: float):
    """The real llama.cpp loader, with `delay` seconds added to every decode step."""

    def loader(name: str):
        model, tokenizer = serving.load_llamacpp(name, max_batch=2, n_threads=1)
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


class PickOne:
    """A humour model stand-in that laughs at every line of the `pick`-th scene it reads."""

    def __init__(self, pick: int):
        self.pick = pick
        self.calls: list[list[str]] = []

    def line_scores(self, lines: list[str]) -> list[float]:
        self.calls.append(list(lines))
        return [100.0 if len(self.calls) - 1 == self.pick else 0.0] * len(lines)


@pytest.fixture(scope="module")
def branching_dir(tmp_path_factory):
    """A tiny Llama whose every line is a well-formed turn, drawn at random: after a newline
    any of three speakers, after `:` any of three speeches (as endless_dir, but each token
    may lead to several next tokens with equal logits). Sampled, candidates differ."""
    tokenizer = build_tiny_tokenizer()
    lines = ["\nGEORGE: Serenity now!", "\nELAINE: Get out!", "\nKRAMER: Giddyup!"]
    edges: set[tuple[int, int]] = set()
    for line in lines:
        ids = tokenizer.encode(line)
        edges |= set(zip(ids, ids[1:], strict=False))
        edges.add((ids[-1], tokenizer.encode("\n")[0]))
    colon = tokenizer.encode(":")[0]
    speech_starts = {b for a, b in edges if a == colon}
    edges |= {(colon, b) for b in speech_starts}
    steps = [(here, there, 10.0) for here, there in sorted(edges)]
    return transition_model_dir(tmp_path_factory.mktemp("branching") / "m", tokenizer, steps)


@pytest.mark.parametrize("backend", ["llamacpp", "torch"])
async def test_best_of_n_writes_candidates_in_one_batch_and_delivers_the_ranked_best(
    branching_dir, backend, monkeypatch
):
    widths: list[int] = []

    def loader(name: str):
        if backend == "torch":
            from sitcom.model.serving import load_serving_model

            monkeypatch.setenv("SITCOM_BACKEND", "torch")
            return load_serving_model(name)
        model, tokenizer = serving.load_llamacpp(name, max_batch=4, n_threads=1)
        decode = model.decode

        def counting(work):
            widths.append(len(work))
            return decode(work)

        model.decode = counting
        return model, tokenizer

    scorer = PickOne(pick=1)
    engine = SceneEngine(str(branching_dir), max_batch=4, loader=loader, scorer=scorer)
    await engine.start()
    try:
        settings = SceneSettings(
            max_new_tokens=40,
            temperature=1.0,
            top_k=0,
            top_p=1.0,
            repetition_penalty=1.0,
            best_of=3,
            guidance=1.0,
            voice=0,
        )
        scene = await (await engine.submit(PROMPT, settings)).result()
    finally:
        await engine.close()
    assert len(scorer.calls) == 3  # every candidate was ranked...
    assert scene.lines == scorer.calls[1]  # ...and the one ranked best is the result
    assert scene.candidates == 3 and scene.prompt_lines == 1
    assert len({tuple(c) for c in scorer.calls}) > 1  # they are different scenes
    if backend == "llamacpp":
        assert max(widths) == 3  # the three were decoded together


async def test_eta_counts_every_candidate_of_the_scenes_ahead(endless_dir):
    engine = SceneEngine(str(endless_dir), max_batch=4, per_user_limit=8)
    await engine.start()
    try:
        await (await engine.submit(PROMPT, scene_settings(16))).result()
        from sitcom.jobs import Job

        with engine._cond:  # the queue as the estimate sees it, without running anything
            engine._finished.clear()
            engine._finished.append((100, 1.0, False))  # recent scenes: 100 tokens in 1 s
            plain = dict(max_new_tokens=100, temperature=0.1, top_k=1, guidance=1.0, voice=0)
            one = SceneSettings(best_of=1, **plain)
            four = SceneSettings(best_of=4, **plain)
            engine._queue.extend([Job(PROMPT, one, "a"), Job(PROMPT, one, "b")])
            assert engine._estimate(Job(PROMPT, one, "c")) == pytest.approx(1.0)  # side by side
            engine._queue.clear()
            # each best-of-4 scene fills the 4 slots: they run one after another
            engine._queue.extend([Job(PROMPT, four, "a"), Job(PROMPT, four, "b")])
            assert engine._estimate(Job(PROMPT, one, "c")) == pytest.approx(3.0)
            assert engine._estimate(Job(PROMPT, four, "c")) == pytest.approx(3.0)
            engine._queue.clear()
    finally:
        await engine.close()


async def test_wait_estimate_matches_the_engine_on_llamacpp(endless_dir):
    """Issue 19 item 7: continuous batching on 2 slots, ~20 ms a step, scenes running to
    their own (different) budgets: each estimate is within 2x of the real wait."""
    engine = SceneEngine(str(endless_dir), max_batch=2, per_user_limit=8, loader=slow_loader(0.02))
    await engine.start()
    try:
        await (await engine.submit(PROMPT, scene_settings(16))).result()

        async def waited(job) -> float:
            await job.result()
            return time.monotonic()

        jobs, waits = [], []
        for tokens in (48, 24, 64, 24, 16):
            start = time.monotonic()
            job = await engine.submit(PROMPT, scene_settings(tokens))
            jobs.append((job, start, asyncio.ensure_future(waited(job))))
        for job, start, done in jobs:
            waits.append((job.eta_s, await done - start))
    finally:
        await engine.close()
    for eta, real in waits:
        assert eta is not None and real / 2 <= eta <= real * 2, waits


@pytest.mark.parametrize("trim", [True, False])
async def test_a_scene_is_delivered_up_to_the_turn_before_it_derails(endless_dir, trim):
    # endless_dir writes `GEORGE: Serenity now! What! What! ...`: by the third line a phrase
    # loops inside the turn (What! What! What!), so the scene ends on the line before it.
    engine = SceneEngine(str(endless_dir), max_batch=2, trim=trim)
    await engine.start()
    try:
        scene = await (await engine.submit(PROMPT, scene_settings(60))).result()
    finally:
        await engine.close()
    looping = [i for i, line in enumerate(scene.lines) if "What! What! What!" in line]
    if trim:
        assert not looping and len(scene.lines) >= 3  # the opening and two turns at least
        assert scene.lines[-1].startswith("GEORGE: Serenity now!")
        assert scene.text == "\n".join(scene.lines) and not scene.partial
    else:
        assert looping  # without trimming the loop is posted
