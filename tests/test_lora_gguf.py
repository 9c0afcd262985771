"""A LoRA adapter served by llama.cpp over an unchanged GGUF base (sitcom.model.lora_gguf):
how a writer on Gemma 3's quantized base is served without a merge."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from helpers import PROMPT, build_tiny_model, build_tiny_tokenizer

from sitcom.model.catalog import ModelLoadError
from sitcom.model.gguf_export import export_gguf
from sitcom.model.lora_gguf import export_lora_gguf

pytest.importorskip("llama_cpp")


@pytest.fixture(scope="module")
def base_and_adapter(tmp_path_factory):
    from peft import LoraConfig, get_peft_model

    root = tmp_path_factory.mktemp("lora_gguf")
    tokenizer = build_tiny_tokenizer()
    base = build_tiny_model(tokenizer)
    export_gguf(base, tokenizer, root / "base.gguf", qtype="f32")
    peft_model = get_peft_model(
        build_tiny_model(tokenizer),
        LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", lora_dropout=0.0),
    )
    torch.manual_seed(1)
    with torch.no_grad():  # peft starts B at zero: give every adapted layer a real change
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    peft_model.save_pretrained(root / "adapter")
    merged = peft_model.merge_and_unload().eval()
    return root, tokenizer, base, merged


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_llamacpp_with_the_adapter_gguf_matches_the_merged_model(base_and_adapter):
    from sitcom.model.llamacpp import LlamaCppModel

    root, tokenizer, base, merged = base_and_adapter
    out = export_lora_gguf(root / "adapter", root / "base.gguf", root / "adapter.gguf")
    assert out.stat().st_size < (root / "base.gguf").stat().st_size
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    plain = LlamaCppModel(root / "base.gguf", max_batch=1, n_threads=1)
    adapted = LlamaCppModel(root / "base.gguf", max_batch=1, n_threads=1, lora=out)
    try:
        want = logits(merged, ids)
        assert np.abs(adapted.logits_of(ids) - want).max() < 1e-3
        assert np.abs(plain.logits_of(ids) - logits(base, ids)).max() < 1e-3
        assert np.abs(plain.logits_of(ids) - want).max() > 1e-2  # the adapter does change it
    finally:
        plain.close()
        adapted.close()


def test_an_adapter_that_does_not_fit_the_base_is_one_line(base_and_adapter, tmp_path):
    root, *_ = base_and_adapter
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 4}))
    from safetensors.numpy import save_file

    save_file(
        {
            "base_model.model.model.layers.9.mlp.up_proj.lora_A.weight": np.zeros((2, 32), "f4"),
            "base_model.model.model.layers.9.mlp.up_proj.lora_B.weight": np.zeros((64, 2), "f4"),
        },
        tmp_path / "adapter_model.safetensors",
    )
    with pytest.raises(ModelLoadError, match="no tensor in the base"):
        export_lora_gguf(tmp_path, root / "base.gguf", tmp_path / "a.gguf")
    assert not (tmp_path / "a.gguf").exists()  # nothing half-written
    with pytest.raises(ModelLoadError, match="cannot read the adapter"):
        export_lora_gguf(tmp_path / "missing", root / "base.gguf", tmp_path / "b.gguf")


def test_an_adapter_checkpoint_is_listed_and_served_over_its_base(
    base_and_adapter, tmp_path, monkeypatch, capsys
):
    from bot import checkpoints
    from sitcom.model import serving
    from training.__main__ import main

    root, tokenizer, base, merged = base_and_adapter
    base_dir = root / "base_dir"  # a model dir holding model.gguf: the base's tokenizer too
    base_dir.mkdir(exist_ok=True)
    base.save_pretrained(base_dir)
    tokenizer.save_pretrained(base_dir)
    (base_dir / "model.gguf").write_bytes((root / "base.gguf").read_bytes())
    ck = tmp_path / "checkpoints" / "tiny-lora"
    args = ["gguf-adapter", str(root / "adapter"), "--base", str(base_dir), "--out", str(ck)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in ck.iterdir()) == ["adapter.gguf", "checkpoint.json"]
    assert main(args) == 2  # an existing OUT needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert checkpoints.available(ck.parent)[-1] == "tiny-lora"  # /checkpoint list shows it

    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    served = serving.resolve(str(ck))
    assert (served.backend, served.lora, served.gguf) == (
        "llamacpp",
        ck / "adapter.gguf",
        base_dir / "model.gguf",
    )
    model, tok = serving.load(served, max_batch=1, n_threads=1)
    try:
        ids = tokenizer.encode(PROMPT)
        assert np.abs(model.logits_of(ids) - logits(merged, ids)).max() < 1e-3
    finally:
        model.close()
    monkeypatch.setenv("SITCOM_BACKEND", "torch")  # transformers cannot apply it: one line
    with pytest.raises(ModelLoadError, match="llama.cpp adapter"):
        serving.resolve(str(ck))
    (ck / "checkpoint.json").write_text("{}")
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    with pytest.raises(ModelLoadError, match="not a sitcom-gguf-adapter card"):
        serving.resolve(str(ck))
