"""The llama.cpp self-test: a crashing or disagreeing child means transformers serves; a
healthy one means llama.cpp serves; verdicts are remembered per machine."""

from __future__ import annotations

import logging
import shutil
import sys

import numpy as np
import pytest
import torch
from helpers import bos_tokenizer, build_tiny_model, save_tiny_model_dir

from sitcom.model import llamacpp, llamacpp_check, serving
from sitcom.model.catalog import ModelLoadError
from sitcom.model.llamacpp_check import check_llamacpp, compare_logits, extra_bufts_allowed
from training.gguf_export import export_gguf

pytest.importorskip("llama_cpp")

SEGFAULT = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SITCOM_BACKEND", raising=False)
    return tmp_path / "cache"


@pytest.fixture(scope="module")
def gguf_dir(tmp_path_factory):
    path = save_tiny_model_dir(tmp_path_factory.mktemp("probe") / "m")
    export_gguf(path, qtype="f32")
    return path


@pytest.mark.e2e
def test_crashing_probe_means_transformers_with_one_log_line(gguf_dir, cache, caplog):
    verdict = check_llamacpp(gguf_dir / "model.gguf", str(gguf_dir), command=SEGFAULT)
    assert not verdict.ok and "crashed (signal 11)" in verdict.reason
    # Remembered: the next start asks no child (this command would fail if it ran).
    again = check_llamacpp(gguf_dir / "model.gguf", str(gguf_dir), command=["false"])
    assert again.cached and not again.ok
    with caplog.at_level(logging.WARNING, logger="sitcom.model.serving"):
        model, _ = serving.load_serving_model(str(gguf_dir))
    assert not isinstance(model, llamacpp.LlamaCppModel)
    lines = [r.getMessage() for r in caplog.records if r.name == "sitcom.model.serving"]
    assert len(lines) == 1 and "crashed" in lines[0] and "SITCOM_BACKEND=llamacpp" in lines[0]


@pytest.mark.e2e
def test_forcing_llamacpp_skips_the_verdict(gguf_dir, cache, monkeypatch):
    check_llamacpp(gguf_dir / "model.gguf", str(gguf_dir), command=SEGFAULT)
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    model, _ = serving.load_serving_model(str(gguf_dir))
    assert isinstance(model, llamacpp.LlamaCppModel)
    model.close()


@pytest.mark.e2e
def test_healthy_probe_means_llamacpp(gguf_dir, cache):
    model, _ = serving.load_serving_model(str(gguf_dir))  # runs the real child
    assert isinstance(model, llamacpp.LlamaCppModel)
    model.close()
    [record] = (cache / "llamacpp-probe").glob("*.json")
    assert '"ok": true' in record.read_text()


@pytest.mark.e2e
def test_disagreeing_gguf_means_transformers(gguf_dir, tmp_path, cache):
    # A GGUF of another model beside this model's weights: llama.cpp runs, but wrongly.
    other = save_tiny_model_dir(tmp_path / "other", seed=7)
    export_gguf(other, qtype="f32")
    mixed = tmp_path / "mixed"
    shutil.copytree(gguf_dir, mixed)
    shutil.copyfile(other / "model.gguf", mixed / "model.gguf")
    verdict = check_llamacpp(mixed / "model.gguf", str(mixed))
    assert not verdict.ok and "disagrees" in verdict.reason


@pytest.mark.e2e
def test_hanging_probe_is_a_failure(gguf_dir, cache):
    hang = [sys.executable, "-c", "import time; time.sleep(60)"]
    verdict = check_llamacpp(gguf_dir / "model.gguf", str(gguf_dir), command=hang, timeout_s=1)
    assert not verdict.ok and "hung" in verdict.reason
    assert not (cache / "llamacpp-probe").exists()  # a busy machine is judged again next time


def test_compare_logits():
    rng = np.random.default_rng(0)
    hf = rng.normal(size=(6, 50))
    assert compare_logits(hf, hf + rng.normal(scale=0.01, size=hf.shape))[0]
    assert not compare_logits(hf, rng.normal(size=hf.shape))[0]
    assert not compare_logits(hf, np.full_like(hf, np.nan))[0]
    assert compare_logits(np.zeros((2, 5)), np.zeros((2, 5)))[0]  # flat rows agree


def test_extra_buffer_types_off_only_for_amx_builds_on_amx_cpus():
    def amx_build():
        return True

    def plain_build():
        return False

    assert not extra_bufts_allowed("auto", ["avx512f", "amx_int8"], amx_build)
    assert extra_bufts_allowed("auto", ["avx512f", "amx_int8"], plain_build)
    assert extra_bufts_allowed("auto", ["avx512f"], amx_build)
    assert extra_bufts_allowed("on", ["amx_int8"], amx_build)
    assert not extra_bufts_allowed("off", ["avx2"], plain_build)
    with pytest.raises(ModelLoadError, match="SITCOM_LLAMA_EXTRA_BUFTS"):
        extra_bufts_allowed("maybe", ["avx2"], plain_build)


def test_unknown_backend_is_a_clear_error(gguf_dir, monkeypatch):
    monkeypatch.setenv("SITCOM_BACKEND", "cuda")
    with pytest.raises(ModelLoadError, match="SITCOM_BACKEND must be"):
        serving.load_serving_model(str(gguf_dir))


def test_cpu_flags_are_simd_flags():
    flags = llamacpp_check.cpu_flags()
    assert flags == sorted(flags)
    assert all(f.startswith(llamacpp_check._FLAG_PREFIXES) for f in flags)


@pytest.mark.parametrize("qtype", ["f32", "q8_0"])
def test_file_type_read_from_the_header_matches_gguf_reader(tmp_path, qtype):
    import gguf

    path = save_tiny_model_dir(tmp_path / "m")
    export_gguf(path, qtype=qtype)
    field = gguf.GGUFReader(str(path / "model.gguf")).fields["general.file_type"]
    want = gguf.LlamaFileType(int(field.parts[field.data[0]][0])).name
    assert llamacpp_check.gguf_file_type(path / "model.gguf") == want
    (tmp_path / "junk.gguf").write_bytes(b"GGUF\x03\x00")  # truncated: the probe judges it
    assert llamacpp_check.gguf_file_type(tmp_path / "junk.gguf") == "unknown"


def test_the_probe_feeds_both_backends_the_bos_the_tokenizer_adds(monkeypatch, capsys):
    """Gemma's BOS holds its attention sink: probed without it, the Q4_K_M base and its
    transformers copy both leave their normal regime and disagree (min cosine 0.85)."""
    from sitcom.model import catalog, llamacpp_probe

    tok = bos_tokenizer()
    model = build_tiny_model(tok)
    fed: list[list[int]] = []

    class Recorder:
        def __init__(self, *args, **kwargs):
            pass

        def logits_of(self, ids):
            fed.append(list(ids))
            with torch.no_grad():
                return model(torch.tensor([ids])).logits[0].float().numpy()

        def close(self):
            pass

    monkeypatch.setattr(catalog, "load_model", lambda source: (model, tok))
    monkeypatch.setattr(llamacpp, "LlamaCppModel", Recorder)
    assert llamacpp_probe.probe_main("unused.gguf", "unused") == 0
    assert fed[0][0] == tok.bos_token_id
    assert '"ok": true' in capsys.readouterr().out


@pytest.mark.e2e
@pytest.mark.xdist_group("gemma3-cache")  # shares the worker's cache with test_shipped_model
def test_the_packaged_gemma_base_passes_the_self_test(tmp_path, monkeypatch):
    from sitcom.model import catalog

    # The session's cache: the shipped default's test (test_shipped_model) builds on it too.
    monkeypatch.delenv("SITCOM_BACKEND", raising=False)
    gguf, source = catalog.gemma_gguf(), catalog.resolve_model("gemma3")
    verdict = check_llamacpp(gguf, source)
    assert verdict.ok, verdict.reason
