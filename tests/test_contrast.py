"""Contrast with the untuned base (settings.contrast, sitcom.decoding.contrast): the formula,
the same scenes from llama.cpp's second model and transformers' second model, the base kept
in step with the rows, and the engine writing without it when a model has no base."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import torch
from helpers import PROMPT, sharp_model_dir

from sitcom.decoding import generation
from sitcom.decoding.contrast import ALPHA, contrast
from sitcom.model.serving import Served, base_gguf_of, load_amateur
from sitcom.settings import SceneSettings

PROMPTS = [PROMPT, "GEORGE: Serenity now!\nJERRY: Hello, Newman.", "elaine: Get out!"]


def test_contrast_reorders_the_plausible_tokens_only():
    torch.manual_seed(0)
    tuned, base = torch.randn(2, 50) * 3, torch.randn(2, 50) * 3
    tuned[:, 7] = base[:, 7] = float("-inf")  # outside the served vocabulary
    base[:, 9] = float("-inf")  # a token only the base rules out
    tuned[:, 9] = tuned.max(dim=-1).values - 0.5  # ... that the tuned model finds plausible
    assert torch.equal(contrast(tuned, base, 0.0), tuned)
    out = contrast(tuned, base, torch.tensor([0.0, 0.5]))
    assert torch.equal(out[0], tuned[0])  # per row: 0 leaves its row alone
    p_t, p_b = tuned[1].softmax(-1), base[1].softmax(-1)
    plausible = p_t >= ALPHA * p_t.max()
    assert plausible.sum() < 50 and torch.isfinite(out[1]).eq(plausible).all()
    # on the plausible tokens: p_tuned^1.5 / p_base^0.5, normalised; token 9 keeps its score
    assert plausible[9] and out[1, 9] == tuned[1, 9]
    want = torch.where(plausible, p_t**1.5 / p_b**0.5, 0.0)
    got = out[1].softmax(-1)
    mask = plausible.clone()
    mask[9] = False
    ratio = got[mask] / want[mask]
    assert torch.allclose(ratio, ratio[0].expand_as(ratio), rtol=1e-4)
    assert not out.isnan().any()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    """(the 'tuned' model, its 'base'): two tiny models on one tokenizer."""
    root = tmp_path_factory.mktemp("contrast")
    return sharp_model_dir(root / "tuned", 3), sharp_model_dir(root / "base", 5)


def test_contrasted_scenes_are_the_same_on_llamacpp_and_transformers(pair):
    """Greedy, mixed rows: the base as a second llama.cpp model in the same slots and as a
    second transformers model must contrast the same way, and contrast must change what the
    model writes; a row at 0 is untouched by its neighbours."""
    pytest.importorskip("llama_cpp")
    from transformers import AutoModelForCausalLM

    from sitcom.model import llamacpp, serving

    tuned, base = pair
    model, tok = serving.load_llamacpp(tuned, max_batch=6, n_threads=1)
    amateur, _ = serving.load_llamacpp(base, max_batch=6, n_threads=1)
    hf = AutoModelForCausalLM.from_pretrained(tuned).eval()
    hf_base = AutoModelForCausalLM.from_pretrained(base).eval()
    plain = SceneSettings(max_new_tokens=40, repetition_penalty=1.05, guidance=1)
    settings = [plain.with_changes(contrast=c) for c in (2.0, 0.0, 1.0)]
    want = generation.generate_scenes(
        hf, tok, PROMPTS, settings, do_sample=False, precision="fp32", amateur=hf_base
    )
    got = llamacpp.generate_scenes(model, tok, PROMPTS, settings, do_sample=False, amateur=amateur)
    assert [s.raw for s in got] == [s.raw for s in want]
    alone = llamacpp.generate_scenes(model, tok, PROMPTS, plain, do_sample=False)
    assert alone[1].raw == got[1].raw
    assert alone[0].raw != got[0].raw and alone[2].raw != got[2].raw
    # guided and contrasted at once, and sampled: both backends run it to the end
    both = plain.with_changes(guidance=2.0, contrast=1.0)
    assert llamacpp.generate_scenes(model, tok, PROMPTS[:2], both, seed=1, amateur=amateur)
    # no base: a clear refusal on both backends, never a silent plain scene
    with pytest.raises(ValueError, match="base model"):
        llamacpp.generate_scenes(model, tok, PROMPTS, settings, do_sample=False)
    with pytest.raises(ValueError, match="base model"):
        generation.generate_scenes(hf, tok, PROMPTS, settings, do_sample=False)


def test_a_base_that_is_the_model_itself_changes_nothing(pair):
    """Contrasting a model with itself adds nothing to the plausible tokens (without a
    repetition penalty, which contrast would strengthen), so greedy scenes stay the same:
    only if the base reads exactly the row's tokens at the row's positions, slot by slot,
    also after rows leave and new ones take their slots."""
    pytest.importorskip("llama_cpp")
    from sitcom.model import llamacpp, serving

    tuned, _ = pair
    model, tok = serving.load_llamacpp(tuned, max_batch=3, n_threads=1)
    same, _ = serving.load_llamacpp(tuned, max_batch=3, n_threads=1)
    plain = SceneSettings(max_new_tokens=30, repetition_penalty=1.0, guidance=1, voice=0)
    for prompts in (PROMPTS, PROMPTS[::-1]):  # the second round reuses the slots
        want = llamacpp.generate_scenes(model, tok, prompts, plain, do_sample=False)
        got = llamacpp.generate_scenes(
            model, tok, prompts, plain.with_changes(contrast=2.0), do_sample=False, amateur=same
        )
        assert [s.raw for s in got] == [s.raw for s in want]


def test_the_base_of_a_served_model():
    """An adapter checkpoint's base is its base's GGUF (merged or not); a plain model has
    none, and the engine writes its scenes without contrast."""
    merged = Served("m", "m", "hf", Path("merged.gguf"), "llamacpp", probe=Path("base.gguf"))
    over = Served("a", "a", "hf", Path("base.gguf"), "llamacpp", lora=Path("lora.gguf"))
    plain = Served("p", "p", "hf", Path("model.gguf"), "llamacpp")
    assert base_gguf_of(merged) == base_gguf_of(over) == Path("base.gguf")
    assert base_gguf_of(plain) is None
    assert load_amateur(plain, model=None) is None
    assert load_amateur(Served("t", "t", "hf", None, "torch"), model=None) is None


@pytest.mark.asyncio
async def test_engine_writes_without_contrast_when_the_model_has_no_base(pair, monkeypatch, caplog):
    pytest.importorskip("llama_cpp")
    from sitcom.engine import SceneEngine

    tuned, _ = pair
    caplog.set_level(logging.INFO, logger="sitcom.engine")
    for backend in ("llamacpp", "torch"):
        monkeypatch.setenv("SITCOM_BACKEND", backend)
        engine = SceneEngine(str(tuned), max_batch=2)
        await engine.start()
        try:
            asked = SceneSettings(max_new_tokens=24, guidance=1, contrast=1.0)
            scene = await (await engine.submit(PROMPT, asked, "u1")).result()
        finally:
            await engine.close()
        assert len(scene.lines) >= 1
        assert "contrast needs the untuned base" in caplog.text
        caplog.clear()


@pytest.mark.asyncio
async def test_engine_contrasts_an_adapter_checkpoint_with_its_base(pair, monkeypatch, caplog):
    """A model served with a base (here a merge whose base GGUF is the second tiny model):
    the engine loads the base once, on first use, and the scene is written with it."""
    pytest.importorskip("llama_cpp")
    from sitcom.engine import SceneEngine
    from sitcom.model import serving

    tuned, base = pair
    loads = []

    def loader(name: str):
        model, tok = serving.load_llamacpp(tuned, max_batch=2, n_threads=1)
        gguf = tuned / serving.GGUF_NAME
        return (
            model,
            tok,
            Served(name, name, str(tuned), gguf, "llamacpp", probe=base / serving.GGUF_NAME),
        )

    real = serving.load_amateur

    def counting(served, model):
        loads.append(served.probe)
        return real(served, model)

    monkeypatch.setattr("sitcom.engine.load_amateur", counting)
    caplog.set_level(logging.INFO, logger="sitcom.engine")
    engine = SceneEngine("merged", max_batch=2, loader=loader)
    await engine.start()
    try:
        asked = SceneSettings(max_new_tokens=24, guidance=1, contrast=1.0)
        for _ in range(2):
            scene = await (await engine.submit(PROMPT, asked, "u1")).result()
            assert len(scene.lines) >= 1
    finally:
        await engine.close()
    assert loads == [base / serving.GGUF_NAME]  # once, for both scenes
    assert "contrast needs" not in caplog.text
