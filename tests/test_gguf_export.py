"""GGUF export round trip: llama.cpp must read our file as the same model transformers runs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers import build_tiny_model, build_tiny_tokenizer

from training.gguf_export import ExportError, export_gguf, main

pytest.importorskip("llama_cpp")
from sitcom.model.llamacpp import LlamaCppModel  # noqa: E402  (needs llama_cpp)

gguf = pytest.importorskip("gguf")

TEXT = "[Scene: Monk's]\nJERRY: Hello, Newman. 1234 soup!\n(Kramer bursts in)\nGEORGE:"


@pytest.fixture(scope="module")
def sharp_model_dir(tmp_path_factory):
    """The tiny model with large random weights: confident logits, so greedy decoding is
    not a tie-break lottery and a wrong rotary permutation changes the tokens."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=1)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim == 2:
                p.normal_(0.0, 0.2)
    path = tmp_path_factory.mktemp("sharp") / "model"
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


def _hf(model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(model_dir).eval(), AutoTokenizer.from_pretrained(
        model_dir
    )


def _llama(path):
    # Through sitcom's wrapper, which keeps llama.cpp off the AMX kernels that crash.
    return LlamaCppModel(path, max_batch=1, n_ctx_per_seq=256, n_threads=1)


def _greedy(llm, ids, n):
    logits = llm.logits_of(ids)[-1]
    out = []
    for _ in range(n):
        out.append(int(logits.argmax()))
        logits = llm.decode([(0, [out[-1]], len(ids) + len(out) - 1)])[0]
    return out


@pytest.mark.parametrize("qtype", ["f32", "f16"])
def test_llamacpp_matches_transformers(sharp_model_dir, tmp_path, qtype):
    model, tok = _hf(sharp_model_dir)
    out = export_gguf(sharp_model_dir, tmp_path / f"m-{qtype}.gguf", qtype)
    llm = _llama(out)

    ids = tok(TEXT)["input_ids"]
    assert llm.tokenize(TEXT) == ids

    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    ll_logits = llm.logits_of(ids)
    # llama.cpp keeps its KV cache in f16 even for f32 weights
    np.testing.assert_allclose(ll_logits, hf_logits, atol=1e-2 * np.abs(hf_logits).max())
    if qtype == "f16":
        return  # greedy ties may break differently at f16; the logits check is the test

    with torch.no_grad():
        hf_tokens = model.generate(torch.tensor([ids]), max_new_tokens=24, do_sample=False)
    hf_tokens = hf_tokens[0, len(ids) :].tolist()
    assert len(set(hf_tokens)) > 3  # the check below means something only if tokens vary
    assert _greedy(llm, ids, len(hf_tokens)) == hf_tokens


def test_q8_0_is_close_and_smaller(sharp_model_dir, tmp_path):
    f32 = export_gguf(sharp_model_dir, tmp_path / "f32.gguf", "f32")
    q8 = export_gguf(sharp_model_dir, tmp_path / "q8.gguf", "q8_0")
    assert q8.stat().st_size < 0.5 * f32.stat().st_size
    types = {t.name: t.tensor_type for t in gguf.GGUFReader(q8).tensors}
    assert types["blk.0.attn_q.weight"] == gguf.GGMLQuantizationType.Q8_0
    assert types["blk.0.attn_norm.weight"] == gguf.GGMLQuantizationType.F32
    assert "output.weight" not in types  # tied: llama.cpp reuses token_embd

    model, tok = _hf(sharp_model_dir)
    ids = tok(TEXT)["input_ids"]
    llm = _llama(q8)
    with torch.no_grad():
        hf_logits = model(torch.tensor([ids])).logits[0].numpy()
    ll_logits = llm.logits_of(ids)
    # Int8 weights in a model this small and random drift more than in SmolLM2; a wrong
    # tensor layout would agree at chance level (1/400).
    assert np.abs(ll_logits - hf_logits).max() < 0.15 * np.abs(hf_logits).max()
    assert (ll_logits.argmax(-1) == hf_logits.argmax(-1)).mean() > 0.75


def test_metadata_and_default_path(tiny_model_dir, tmp_path):
    import shutil

    ckpt = tmp_path / "ckpt"
    shutil.copytree(tiny_model_dir, ckpt)
    out = export_gguf(ckpt, qtype="f16")
    assert out == ckpt / "model.gguf"
    assert not [p for p in ckpt.iterdir() if p.name.endswith(".tmp")]  # temp file renamed away
    reader = gguf.GGUFReader(out)
    fields = {
        k: f.contents() for k, f in reader.fields.items() if not k.startswith("tokenizer.ggml.")
    }
    assert fields["general.architecture"] == "llama"
    assert fields["llama.block_count"] == 2
    assert fields["llama.attention.head_count_kv"] == 2
    assert reader.fields["tokenizer.ggml.pre"].contents() == "gpt-2"


def test_bad_input_is_a_one_line_error(tmp_path, capsys):
    with pytest.raises(ExportError, match="qtype"):
        export_gguf(tmp_path, tmp_path / "x.gguf", "q3")
    assert main([str(tmp_path / "missing")]) != 0
    err = capsys.readouterr().err
    assert err.startswith("error:") and err.count("\n") == 1
