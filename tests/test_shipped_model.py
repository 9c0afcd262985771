"""The shipped Seinfeld default, checked against its card, with a fallback to the base: the
real one (a LoRA adapter on Gemma 3, served over its GGUF; the path is tested on a tiny base
in test_lora_gguf), and the SmolLM2 form (an adapter extracted from a full fine-tune, merged
into the base and exported to GGUF on first use) on tiny models."""

from __future__ import annotations

import json
import logging
import warnings

import pytest
import torch
from helpers import EPISODE, write_corpus

from sitcom.model import catalog as models
from sitcom.model.adapters import (
    ADAPTER_CARD,
    ADAPTER_FILE,
    ADAPTER_INT4_FILE,
    ADAPTER_INT8_FILE,
    dequantize_int4,
    load_adapter_state,
    quantize_int4,
)
from sitcom.model.catalog import (
    SHIPPED_ADAPTER,
    ModelLoadError,
    file_sha256,
    load_model,
    tuned_model_dir,
    verified_adapter,
)
from training.extract import ExtractError, extract, low_rank


def test_extract_recovers_a_low_rank_change(pair, tmp_path):
    base, tuned = pair
    card = extract(tuned, tmp_path / "adapter", rank=4, base=str(base), dtype="float32")
    assert card["steps"] == 7 and card["rank"] == 4 and card["extract_rel_error_max"] < 1e-4
    assert card["adapter_sha256"] == file_sha256(tmp_path / "adapter" / ADAPTER_FILE)
    merged = tuned_model_dir(tmp_path / "adapter", base_dir=base)
    assert (merged / "model.gguf").is_file()
    got, _ = load_model(merged)
    want, _ = load_model(tuned)
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    # Cached: the second call builds nothing.
    stamp = (merged / "model.gguf").stat().st_mtime_ns
    assert tuned_model_dir(tmp_path / "adapter", base_dir=base) == merged
    assert (merged / "model.gguf").stat().st_mtime_ns == stamp


def test_weighted_low_rank_fits_what_the_layer_outputs():
    """On inputs that mostly live in a few directions, the activation-weighted factors change
    the layer's outputs less than plain SVD's at the same rank; an exact low-rank change is
    recovered either way."""
    gen = torch.Generator().manual_seed(0)
    delta = torch.randn(24, 16, generator=gen)
    scales = torch.logspace(1, -2, 16)
    x = torch.randn(500, 16, generator=gen) * scales  # a few strong input directions
    cov = x.T.double() @ x.double()
    b0, a0, err0 = low_rank(delta, 3)
    b1, a1, err1 = low_rank(delta, 3, cov)

    def out_err(b, a):
        return float((x @ (delta - b @ a).T).norm() / (x @ delta.T).norm())

    assert out_err(b1, a1) < 0.5 * out_err(b0, a0)
    assert err1 == pytest.approx(out_err(b1, a1), abs=0.02)  # the card's number means that
    exact = torch.randn(24, 2, generator=gen) @ torch.randn(2, 16, generator=gen)
    b, a, err = low_rank(exact, 2, cov)
    torch.testing.assert_close(b @ a, exact, atol=1e-4, rtol=1e-4)
    assert err < 1e-6


def test_extract_with_data_calibrates_on_the_train_split(pair, tmp_path):
    base, tuned = pair
    corpus = write_corpus(tmp_path / "corpus", [EPISODE] * 12, [EPISODE] * 2)
    card = extract(
        tuned,
        tmp_path / "adapter",
        rank=2,
        base=str(base),
        dtype="float32",
        data=corpus,
        calibration_tokens=256,
    )
    assert "activation-weighted" in card["form"] and 0 < card["calibration_tokens"] <= 512
    assert card["extract_rel_error_max"] < 1e-4  # rank 2 carries the rank-2 change exactly
    assert card["adapter_val"]["bpb"] > 0 and card["adapter_val"]["episodes"] == 2
    with pytest.raises(ExtractError, match="calibration"):
        extract(tuned, tmp_path / "bad", rank=2, base=str(base), data=corpus, calibration_tokens=-1)


def test_extract_truncates_to_the_rank(pair, tmp_path):
    base, tuned = pair
    card = extract(tuned, tmp_path / "a1", rank=1, base=str(base))
    assert 0.05 < card["extract_rel_error_mean"] < 1
    # A rank above a layer's own (k_proj is 16 x 32 here) is exact, the rest zeros.
    card = extract(tuned, tmp_path / "a40", rank=40, base=str(base), dtype="float32")
    assert card["extract_rel_error_max"] < 1e-4


def test_extract_carries_embedding_and_norm_changes(pair, tmp_path):
    """A full fine-tune also moves the tied embedding (a low-rank change here) and the norms:
    the adapter carries both, and the merged model equals the fine-tune, LM head included."""
    base, tuned = pair
    model, tok = load_model(tuned)
    gen = torch.Generator().manual_seed(5)
    with torch.no_grad():
        vocab, dim = model.model.embed_tokens.weight.shape
        model.model.embed_tokens.weight += torch.randn(vocab, 2, generator=gen) @ torch.randn(
            2, dim, generator=gen
        )
        model.model.layers[0].input_layernorm.weight.mul_(1.5)
        model.model.norm.weight.add_(0.25)
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    card = extract(
        tmp_path / "full",
        tmp_path / "adapter",
        rank=4,
        embed_rank=3,
        base=str(base),
        dtype="float32",
    )
    assert card["embed_rank"] == 3 and card["extract_rel_error_max"] < 1e-4
    assert "embedding" in card["form"] and "2 norms" in card["form"]
    merged = tuned_model_dir(tmp_path / "adapter", base_dir=base)
    got, _ = load_model(merged)
    want, _ = load_model(tmp_path / "full")
    for (name, a), (_, b) in zip(got.named_parameters(), want.named_parameters(), strict=True):
        torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-4, msg=name)
    torch.testing.assert_close(got.lm_head.weight, want.lm_head.weight, atol=1e-4, rtol=1e-4)
    ids = torch.tensor([[1, 5, 9, 2]])
    with torch.no_grad():
        torch.testing.assert_close(got(ids).logits, want(ids).logits, atol=1e-3, rtol=1e-3)


def test_int8_adapter_is_half_the_size_and_merges_close(pair, tmp_path):
    base, tuned = pair
    f32 = extract(tuned, tmp_path / "f32", rank=4, base=str(base), dtype="float32")
    q8 = extract(tuned, tmp_path / "q8", rank=4, base=str(base), dtype="int8")
    assert q8["adapter_file"] == ADAPTER_INT8_FILE and f32["adapter_file"] == ADAPTER_FILE
    assert not (tmp_path / "q8" / ADAPTER_FILE).exists()  # peft cannot misread int8 as float
    assert q8["adapter_mb"] < 0.4 * f32["adapter_mb"]
    exact = load_adapter_state(tmp_path / "f32" / ADAPTER_FILE)
    approx = load_adapter_state(tmp_path / "q8" / ADAPTER_INT8_FILE)
    assert exact.keys() == approx.keys()
    for key, value in exact.items():
        err = (approx[key] - value).abs().max() / value.abs().max()
        assert err <= 0.5 / 127 + 1e-3, key  # half a step of the block's absmax
    got, _ = load_model(tuned_model_dir(tmp_path / "q8", base_dir=base))
    want, _ = load_model(tuned)
    before, _ = load_model(base)
    for (name, a), (_, b), (_, c) in zip(
        got.named_parameters(), want.named_parameters(), before.named_parameters(), strict=True
    ):
        change = (b - c).norm()
        assert (a - b).norm() <= 0.01 * change + 1e-6, name  # within 1 % of the fine-tune's change
    card = json.loads((tmp_path / "q8" / ADAPTER_CARD).read_text())
    (tmp_path / "q8" / ADAPTER_INT8_FILE).write_bytes(b"x")
    with pytest.raises(ModelLoadError, match="damaged"):
        verified_adapter(tmp_path / "q8")
    assert card["adapter_sha256"] != file_sha256(tmp_path / "q8" / ADAPTER_INT8_FILE)


def test_int4_packs_two_values_a_byte_and_round_trips():
    t = torch.randn(6, 96)
    t[0, :32] = 0.0  # an all-zero block
    packed, scale = quantize_int4(t)
    assert packed.dtype == torch.uint8 and packed.shape == (6, 48) and scale.shape == (6, 3)
    back = dequantize_int4(packed, scale)
    assert back[0, :32].abs().max() == 0
    blocks = t.reshape(6, 3, 32).abs().amax(-1, keepdim=True)
    err = ((back - t).reshape(6, 3, 32).abs() / blocks.clamp_min(1e-12)).max()
    assert err <= 0.5 / 7 + 1e-3  # half a step of the block's absmax
    q = torch.randint(-7, 8, (6, 96)).float()
    q[:, ::32] = 7.0  # each block's absmax is 7: scale 1, the values come back exactly
    assert torch.equal(dequantize_int4(*quantize_int4(q)), q)


def test_int4_adapter_is_a_quarter_of_float_and_merges_close(pair, tmp_path):
    base, tuned = pair
    f32 = extract(tuned, tmp_path / "f32", rank=4, base=str(base), dtype="float32")
    q4 = extract(tuned, tmp_path / "q4", rank=4, base=str(base), dtype="int4")
    assert q4["adapter_file"] == ADAPTER_INT4_FILE
    assert q4["adapter_mb"] < 0.3 * f32["adapter_mb"]
    exact = load_adapter_state(tmp_path / "f32" / ADAPTER_FILE)
    approx = load_adapter_state(tmp_path / "q4" / ADAPTER_INT4_FILE)
    assert exact.keys() == approx.keys()
    for key, value in exact.items():  # rank-4 B factors (rows of 4) fall back to int8
        bound = 0.5 / 7 if value.dim() == 2 and value.shape[1] % 32 == 0 else 0.5 / 127
        assert (approx[key] - value).abs().max() / value.abs().max() <= bound + 1e-3, key
    got, _ = load_model(tuned_model_dir(tmp_path / "q4", base_dir=base))
    want, _ = load_model(tuned)
    before, _ = load_model(base)
    for (name, a), (_, b), (_, c) in zip(
        got.named_parameters(), want.named_parameters(), before.named_parameters(), strict=True
    ):
        # int4 rounding of both factors: ~10-15 % of the change (int8: under 1 %)
        assert (a - b).norm() <= 0.15 * (b - c).norm() + 1e-6, name


def test_extract_refuses_a_change_it_cannot_carry(pair, tmp_path, monkeypatch):
    base, tuned = pair
    model, tok = load_model(tuned)
    with torch.no_grad():
        model.model.norm.weight.add_(0.5)
    model.save_pretrained(tmp_path / "norm")
    tok.save_pretrained(tmp_path / "norm")
    monkeypatch.setattr("training.extract.MAX_WHOLE_PARAMS", 8)  # the norm is now "big"
    with pytest.raises(ExtractError, match="model.norm.weight"):
        extract(tmp_path / "norm", tmp_path / "out", rank=2, base=str(base))
    assert not (tmp_path / "out").exists()


@pytest.mark.e2e
def test_tampered_or_missing_adapter_falls_back_to_the_base(pair, tmp_path, caplog):
    base, tuned = pair
    adapter = tmp_path / "adapter"
    extract(tuned, adapter, rank=2, base=str(base))
    data = bytearray((adapter / ADAPTER_FILE).read_bytes())
    data[-1] ^= 0xFF
    (adapter / ADAPTER_FILE).write_bytes(bytes(data))
    with pytest.raises(ModelLoadError, match="damaged"):
        verified_adapter(adapter)
    (adapter / ADAPTER_FILE).unlink()
    with pytest.raises(ModelLoadError, match="missing"):
        verified_adapter(adapter)
    models._warned.clear()
    with caplog.at_level(logging.WARNING, logger="sitcom.model.catalog"):
        first = models.resolve_tuned_default(adapter)
        again = models.resolve_tuned_default(adapter)
    assert first == again == str(models.default_model_dir())
    lines = [r.getMessage() for r in caplog.records if r.name == "sitcom.model.catalog"]
    assert len(lines) == 1 and "missing" in lines[0] and "untuned base" in lines[0]


def test_unwritable_cache_is_a_clear_error(pair, tmp_path, monkeypatch):
    base, tuned = pair
    extract(tuned, tmp_path / "adapter", rank=2, base=str(base))
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    monkeypatch.setenv("SITCOM_CACHE", str(blocker / "cache"))
    with pytest.raises(ModelLoadError, match="SITCOM_CACHE"):
        tuned_model_dir(tmp_path / "adapter", base_dir=base)


@pytest.mark.e2e
@pytest.mark.xdist_group("gemma3-cache")  # one worker dequantizes Gemma for both (pyproject)
@pytest.mark.skipif(not (SHIPPED_ADAPTER / ADAPTER_CARD).is_file(), reason="no shipped adapter")
def test_the_shipped_adapter_matches_its_card_and_is_served_over_gemma(monkeypatch):
    """The real default: a LoRA adapter on Gemma 3 270M (sitcom/seinfeld_lora), checked
    against its card, built once into the cache as an adapter checkpoint and served as the
    packaged Q4_K_M base with the adapter merged in (llama.cpp), or by transformers where
    llama.cpp is refused here."""
    import numpy as np

    from sitcom.model import serving

    adapter, card = verified_adapter()
    size = (adapter / card.get("adapter_file", ADAPTER_FILE)).stat().st_size
    assert size < 25e6 and card["adapter_mb"] == pytest.approx(size / 1e6, abs=0.01)
    assert card["base_model"] == "gemma3"
    notice = "Gemma is provided under and subject to the Gemma Terms of Use found at "
    assert (adapter / "NOTICE").read_text().startswith(notice + "ai.google.dev/gemma/terms")
    for key in (
        "corpus_manifest_sha256",
        "steps",
        "tokens_seen",
        "precision",
        "val_loss",
        "val_bpb",
        "train_wall_minutes",
        "adapter_val",
    ):
        assert card.get(key) is not None, key
    monkeypatch.delenv("SITCOM_BACKEND", raising=False)
    served = serving.resolve("seinfeld")
    assert (served.label, served.fell_back) == ("seinfeld", False)
    assert served.peft == models.tuned_cache_entry() / ADAPTER_FILE
    model, tok = serving.load(served, max_batch=1)
    ids = tok("JERRY: What is the deal with")["input_ids"]
    if served.backend == "llamacpp":
        try:
            assert (served.gguf, served.lora) == (models.tuned_cache_entry() / "merged.gguf", None)
            # Served with the head of the corpus's tokens (sitcom.model.gguf_vocab): those
            # have logits, every other token -inf.
            kept = json.loads((adapter / "served_vocab.json").read_text())["ids"]
            assert len(kept) == card["served_vocab"]["tokens"] < len(tok)
            logits = model.logits_of(ids)
            assert np.isfinite(logits[:, kept]).all()
            assert np.isneginf(np.delete(logits, kept, axis=1)).all()
        finally:
            model.close()
    else:
        with torch.no_grad():
            assert torch.isfinite(model(torch.tensor([ids])).logits).all()


def test_a_trained_adapter_merges_into_what_training_saw(pair, tmp_path):
    """Training an adapter with a tied embedding: peft's ensure_weight_tying lets the LM head
    see the embedding's change during training, and the shipped form (the embedding's LoRA
    only, merged once into the shared matrix) computes exactly what training computed."""
    from peft import LoraConfig

    from sitcom.model.adapters import load_adapter, merge_adapter, save_adapter, tied_adapter_state

    base, tuned = pair
    model, tok = load_model(tuned)
    with torch.no_grad():
        embed = model.model.embed_tokens.weight
        embed.add_(0.01 * torch.randn_like(embed))
        model.model.norm.weight.add_(0.25)
    model.save_pretrained(tmp_path / "full")
    tok.save_pretrained(tmp_path / "full")
    extract(tmp_path / "full", tmp_path / "a", rank=2, embed_rank=2, base=str(base), dtype="int8")
    training = load_adapter(load_model(base)[0], tmp_path / "a", ADAPTER_INT8_FILE, trainable=True)
    trainable = [p for p in training.parameters() if p.requires_grad]
    assert trainable and any(p.dim() == 1 for p in trainable)  # the norms train too
    # The head's LoRA factors are views of the embedding's: one gradient, one optimizer step.
    params = dict(training.named_parameters())
    owner = next(p for n, p in params.items() if "embed_tokens.lora_embedding_B" in n)
    alias = next(p for n, p in params.items() if "lm_head.lora_A" in n)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    loss = training(ids, labels=ids).loss
    want_owner, want_alias = torch.autograd.grad(loss, [owner, alias], retain_graph=True)
    loss.backward()
    assert alias.grad is None
    torch.testing.assert_close(owner.grad, want_owner + want_alias.t())
    training.zero_grad()
    gen = torch.Generator().manual_seed(9)
    with torch.no_grad():  # stands in for optimizer steps
        for p in trainable:
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    with torch.no_grad():
        seen = training(ids).logits
    state = tied_adapter_state(training)
    assert state and not any("lm_head" in k for k in state)
    LoraConfig.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    save_adapter(state, tmp_path / "b", "float32")
    merged = merge_adapter(load_model(base)[0], tmp_path / "b").eval()
    with torch.no_grad():
        torch.testing.assert_close(merged(ids).logits, seen, atol=1e-4, rtol=1e-4)
    # peft's own merge of the training model adds the embedding's change twice: not used.
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # peft's own warning about exactly this
        doubled = training.merge_and_unload()(ids).logits
    assert not torch.allclose(doubled, seen, atol=1e-3)
