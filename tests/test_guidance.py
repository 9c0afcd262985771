"""Guidance on the opening (settings.guidance, sitcom.decoding.guidance): the formula, the
same guided scenes from llama.cpp's twin sequences and transformers' processor, and the
engine giving a guided candidate its two sequences."""

from __future__ import annotations

import pytest
import torch
from helpers import PROMPT, sharp_model_dir

from sitcom.decoding import generation
from sitcom.decoding.guidance import guide
from sitcom.settings import SceneSettings

PROMPTS = [PROMPT, "GEORGE: Serenity now!\nJERRY: Hello, Newman.", "elaine: Get out!"]


def test_guide_is_the_model_at_1_and_weighs_by_the_openings_gain_above():
    torch.manual_seed(0)
    cond, uncond = torch.randn(2, 50) * 3, torch.randn(2, 50) * 3
    cond[:, 7] = uncond[:, 7] = float("-inf")  # a token outside the served vocabulary
    assert torch.equal(guide(cond, uncond, 1.0), cond)
    out = guide(cond, uncond, torch.tensor([1.0, 2.5]))
    assert torch.equal(out[0], cond[0])  # per row: 1 leaves its row alone
    # softmax(out) = p(x | opening)^g / p(x | no opening)^(g - 1), normalised
    p_c, p_u = cond[1].softmax(-1), uncond[1].softmax(-1)
    want = p_c**2.5 / p_u**1.5
    want[7] = 0
    assert torch.allclose(out[1].softmax(-1), want / want.sum(), atol=1e-6)
    assert out[1, 7] == float("-inf") and not out.isnan().any()


@pytest.fixture(scope="module")
def sharp_dir(tmp_path_factory):
    return sharp_model_dir(tmp_path_factory.mktemp("sharp") / "m")


def test_guided_scenes_are_the_same_on_llamacpp_and_transformers(sharp_dir):
    """Greedy, mixed rows: llama.cpp's twin sequences (batched with the rows) and
    transformers' processor (a second model call) must guide the same way, and guidance
    must change what the model writes."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from sitcom.model import llamacpp, serving

    model, tok = serving.load_llamacpp(sharp_dir, max_batch=6, n_threads=1)
    hf = AutoModelForCausalLM.from_pretrained(sharp_dir).eval()
    plain = SceneSettings(max_new_tokens=40, repetition_penalty=1.05, guidance=1, voice=0)
    settings = [plain.with_changes(guidance=g) for g in (2.0, 1.0, 3.0)]
    want = generation.generate_scenes(hf, tok, PROMPTS, settings, do_sample=False, precision="fp32")
    got = llamacpp.generate_scenes(model, tok, PROMPTS, settings, do_sample=False)
    assert [s.raw for s in got] == [s.raw for s in want]
    unguided = llamacpp.generate_scenes(model, tok, PROMPTS, plain, do_sample=False)
    assert unguided[1].raw == got[1].raw  # the row at 1 is untouched by its guided neighbours
    assert unguided[0].raw != got[0].raw and unguided[2].raw != got[2].raw
    # Three guided rows need six sequences; this context has six: a fourth does not fit.
    with pytest.raises(ValueError, match="busy"):
        llamacpp.generate_scenes(model, tok, PROMPTS * 2, settings * 2, do_sample=False)


@pytest.mark.asyncio
async def test_engine_gives_each_guided_candidate_two_sequences(sharp_dir, monkeypatch):
    pytest.importorskip("llama_cpp")
    from sitcom.engine import SceneEngine

    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    guided = SceneSettings(max_new_tokens=24, best_of=3, guidance=2.0, voice=0)
    for max_batch, candidates in ((4, 2), (8, 3)):
        engine = SceneEngine(str(sharp_dir), max_batch=max_batch)
        await engine.start()
        try:
            scene = await (await engine.submit(PROMPT, guided, "u1")).result()
        finally:
            await engine.close()
        assert scene.candidates == candidates and len(scene.lines) >= 1
    # two guided scenes at once: each is admitted only when its four sequences are free
    engine = SceneEngine(str(sharp_dir), max_batch=4)
    await engine.start()
    try:
        two = guided.with_changes(best_of=2)
        jobs = [await engine.submit(PROMPT, two, f"u{i}") for i in range(2)]
        scenes = [await job.result() for job in jobs]
    finally:
        await engine.close()
    assert [s.candidates for s in scenes] == [2, 2]
    engine = SceneEngine(str(sharp_dir), max_batch=1)
    await engine.start()
    try:
        # no room for a twin: the scene is written unguided, the same as with guidance 1
        scene = await (await engine.submit(PROMPT, guided, "u1")).result()
        plain = await (await engine.submit(PROMPT, guided.with_changes(guidance=1), "u1")).result()
        assert scene.candidates == plain.candidates == 1 and len(scene.lines) >= 1
    finally:
        await engine.close()
