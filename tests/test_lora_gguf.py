"""A LoRA adapter served by llama.cpp over an unchanged GGUF base (sitcom.model.lora_gguf):
how a writer on Gemma 3's quantized base is served without a merge."""

from __future__ import annotations

import copy
import json
import logging
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import PROMPT, build_tiny_model, build_tiny_tokenizer

from sitcom.model.catalog import ModelLoadError
from sitcom.model.gguf_export import export_gguf
from sitcom.model.lora_gguf import export_lora_gguf, write_adapter_checkpoint
from sitcom.settings import SceneSettings

pytest.importorskip("llama_cpp")

SEGFAULT = [sys.executable, "-c", "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)"]


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
    # What a checkpoint serves: gguf-adapter keeps the adapter in bf16, for both backends.
    rounded = copy.deepcopy(peft_model)
    with torch.no_grad():
        for name, p in rounded.named_parameters():
            if "lora_" in name:
                p.copy_(p.to(torch.bfloat16).float())
    merged_bf16 = rounded.merge_and_unload().eval()
    merged = peft_model.merge_and_unload().eval()
    return root, tokenizer, base, merged, merged_bf16


@pytest.fixture(scope="module")
def base_dir(base_and_adapter):
    """A model dir holding model.gguf: the base's tokenizer and HF weights too."""
    root, tokenizer, base, *_ = base_and_adapter
    path = root / "base_dir"
    if not path.is_dir():
        path.mkdir()
        base.save_pretrained(path)
        tokenizer.save_pretrained(path)
        shutil.copyfile(root / "base.gguf", path / "model.gguf")
    return path


@pytest.fixture(scope="module")
def checkpoint(base_and_adapter, base_dir, tmp_path_factory):
    root, *_ = base_and_adapter
    out = tmp_path_factory.mktemp("checkpoints") / "tiny-lora"
    return write_adapter_checkpoint(root / "adapter", str(base_dir), base_dir / "model.gguf", out)


def logits(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0].numpy()


def test_llamacpp_with_the_adapter_gguf_matches_the_merged_model(base_and_adapter):
    from sitcom.model.llamacpp import LlamaCppModel

    root, tokenizer, base, merged, _ = base_and_adapter
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


def test_the_merge_into_a_quantized_base_serves_like_the_adapter_at_run_time(
    base_and_adapter, tmp_path
):
    from gguf import GGMLQuantizationType, GGUFReader

    from sitcom.model.gguf_merge import merge_lora_gguf
    from sitcom.model.llamacpp import LlamaCppModel

    root, tokenizer, base, merged, _ = base_and_adapter
    export_gguf(base, tokenizer, tmp_path / "q8.gguf", qtype="q8_0")
    adapter = export_lora_gguf(root / "adapter", tmp_path / "q8.gguf", tmp_path / "a.gguf")
    out = merge_lora_gguf(tmp_path / "q8.gguf", adapter, tmp_path / "merged.gguf")
    kinds = {t.name: t.tensor_type for t in GGUFReader(out).tensors}
    assert kinds["blk.0.ffn_up.weight"] == GGMLQuantizationType.Q8_0
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    runtime = LlamaCppModel(tmp_path / "q8.gguf", max_batch=1, n_threads=1, lora=adapter)
    merged_file = LlamaCppModel(out, max_batch=1, n_threads=1)
    try:
        want = logits(merged, ids)
        got, ref = merged_file.logits_of(ids), runtime.logits_of(ids)
        assert np.abs(got - want).max() < 0.1  # Q8_0's rounding, twice
        assert np.abs(got - ref).max() < 0.1
        assert (got.argmax(-1) == want.argmax(-1)).mean() > 0.9
        assert np.abs(got - logits(base, ids)).max() > 0.5  # the adapter is in it
    finally:
        runtime.close()
        merged_file.close()


def test_a_merge_that_does_not_fit_the_base_is_one_line_and_writes_nothing(
    base_and_adapter, tmp_path
):
    from sitcom.model.gguf_merge import merge_lora_gguf

    root, *_ = base_and_adapter
    adapter = export_lora_gguf(root / "adapter", root / "base.gguf", tmp_path / "a.gguf")
    with pytest.raises(ModelLoadError, match="not a LoRA adapter GGUF"):
        merge_lora_gguf(root / "base.gguf", root / "base.gguf", tmp_path / "m.gguf")
    other = tmp_path / "other.gguf"  # a base without the adapted layers' names
    import gguf

    writer = gguf.GGUFWriter(other, "llama")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelLoadError, match="is not in"):
        merge_lora_gguf(other, adapter, tmp_path / "m.gguf")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gguf", "other.gguf"]


def served_ids(
    tokenizer, text: str = PROMPT + "\nGEORGE: Serenity now!\nJERRY: Hello"
) -> list[int]:
    """The tokens of `text` plus newline, EOS: the vocabulary a tiny corpus would name."""
    return sorted(set(tokenizer.encode(text + "\n")) | {tokenizer.eos_token_id})


def test_a_merge_that_keeps_some_tokens_serves_their_logits_in_full_ids(base_and_adapter, tmp_path):
    """A served vocabulary (sitcom.model.gguf_vocab): the merge keeps those tokens' rows;
    llama.cpp's logits for them are the whole model's, in the tokenizer's own ids, and -inf
    for every other token; a token outside reads as the unknown one; scenes use only kept
    tokens."""
    from sitcom.model import llamacpp
    from sitcom.model.gguf_merge import merge_lora_gguf
    from sitcom.model.gguf_vocab import write_served_vocab

    root, tokenizer, *_ = base_and_adapter
    adapter = export_lora_gguf(root / "adapter", root / "base.gguf", tmp_path / "a.gguf")
    keep = served_ids(tokenizer)
    vocab = write_served_vocab(tmp_path / "served_vocab.json", keep, len(tokenizer))
    whole = merge_lora_gguf(root / "base.gguf", adapter, tmp_path / "whole.gguf")
    cut = merge_lora_gguf(root / "base.gguf", adapter, tmp_path / "cut.gguf", served_vocab=vocab)
    assert cut.stat().st_size < whole.stat().st_size
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    big = llamacpp.LlamaCppModel(whole, max_batch=2, n_threads=1)
    small = llamacpp.LlamaCppModel(cut, max_batch=2, n_threads=1)
    try:
        assert small.n_vocab == big.n_vocab == len(tokenizer)
        want, got = big.logits_of(ids), small.logits_of(ids)
        assert np.abs(got[:, keep] - want[:, keep]).max() < 1e-4
        others = np.setdiff1d(np.arange(len(tokenizer)), keep)
        assert np.isneginf(got[:, others]).all()
        outside = int(others[0])  # read as the unknown token (the tiny tokenizer's EOS)
        unknown = tokenizer.unk_token_id
        assert np.allclose(
            small.logits_of(ids[:3] + [outside])[-1, keep],
            big.logits_of(ids[:3] + [unknown])[-1, keep],
            atol=1e-4,
        )
        scenes = llamacpp.generate_scenes(
            small,
            tokenizer,
            ["elaine: Get out!"] * 2,
            SceneSettings(max_new_tokens=24, guidance=1, voice=0),  # two rows, one sequence each
            seed=3,
        )
        written = [t for s in scenes for t in tokenizer.encode(s.raw)[-s.new_tokens :]]
        assert written and set(written) <= set(keep) | set(tokenizer.encode("elaine: Get out!"))
    finally:
        big.close()
        small.close()


def test_a_served_vocabulary_that_does_not_fit_is_one_line_and_writes_nothing(
    base_and_adapter, tmp_path
):
    from sitcom.model.gguf_merge import merge_lora_gguf
    from sitcom.model.gguf_vocab import write_served_vocab

    root, tokenizer, *_ = base_and_adapter
    adapter = export_lora_gguf(root / "adapter", root / "base.gguf", tmp_path / "a.gguf")
    bad = {
        "other.json": {"vocab_size": len(tokenizer) + 1, "ids": [0, 1]},
        "order.json": {"vocab_size": len(tokenizer), "ids": [3, 1]},
        "range.json": {"vocab_size": len(tokenizer), "ids": [1, len(tokenizer)]},
        "empty.json": {"vocab_size": len(tokenizer), "ids": []},
    }
    for name, content in bad.items():
        (tmp_path / name).write_text(json.dumps(content))
    (tmp_path / "junk.json").write_text("{not json")
    for name, match in [
        ("other.json", "vocabulary of"),
        ("order.json", "must ascend"),
        ("range.json", "must ascend"),
        ("empty.json", "must ascend"),
        ("junk.json", "unreadable"),
        ("missing.json", "unreadable"),
    ]:
        with pytest.raises(ModelLoadError, match=match) as err:
            merge_lora_gguf(root / "base.gguf", adapter, tmp_path / "m.gguf", tmp_path / name)
        assert "\n" not in str(err.value)
    assert not (tmp_path / "m.gguf").exists()
    with pytest.raises(ValueError, match="served ids"):
        write_served_vocab(tmp_path / "v.json", [len(tokenizer)], len(tokenizer))


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
    base_and_adapter, base_dir, tmp_path, monkeypatch, capsys
):
    from bot import checkpoints
    from sitcom.model import serving
    from training.__main__ import main

    root, tokenizer, *_, merged_bf16 = base_and_adapter
    ck = tmp_path / "checkpoints" / "tiny-lora"
    args = ["gguf-adapter", str(root / "adapter"), "--base", str(base_dir), "--out", str(ck)]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    assert sorted(p.name for p in ck.iterdir()) == [
        "adapter.gguf",
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint.json",
        "merged.gguf",
    ]
    assert main(args) == 2  # an existing OUT needs --overwrite
    assert "--overwrite" in capsys.readouterr().err
    assert checkpoints.available(ck.parent)[-1] == "tiny-lora"  # /checkpoint list shows it

    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    served = serving.resolve(str(ck))
    # llama.cpp serves the merge; the self-test would judge the base's file
    assert (served.backend, served.lora, served.gguf, served.probe) == (
        "llamacpp",
        None,
        ck / "merged.gguf",
        base_dir / "model.gguf",
    )
    model, tok = serving.load(served, max_batch=1, n_threads=1)
    try:
        ids = tokenizer.encode(PROMPT)
        assert np.abs(model.logits_of(ids) - logits(merged_bf16, ids)).max() < 1e-3
    finally:
        model.close()
    # A checkpoint written before merges (its card names none) gets the adapter at run time.
    card = json.loads((ck / "checkpoint.json").read_text())
    del card["merged"]
    (ck / "checkpoint.json").write_text(json.dumps(card))
    served = serving.resolve(str(ck))
    assert (served.lora, served.gguf, served.probe) == (
        ck / "adapter.gguf",
        base_dir / "model.gguf",
        None,
    )
    model, tok = serving.load(served, max_batch=1, n_threads=1)
    try:
        assert np.abs(model.logits_of(ids) - logits(merged_bf16, ids)).max() < 1e-3
    finally:
        model.close()
    (ck / "checkpoint.json").write_text("{}")
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    with pytest.raises(ModelLoadError, match="not a sitcom-gguf-adapter card"):
        serving.resolve(str(ck))


def test_the_checkpoint_holds_the_peft_adapter_in_bf16(base_and_adapter, checkpoint):
    from safetensors import safe_open

    root, *_ = base_and_adapter
    card = json.loads((checkpoint / "checkpoint.json").read_text())
    assert card["peft_adapter"] == {
        "config": "adapter_config.json",
        "weights": "adapter_model.safetensors",
        "dtype": "bfloat16",
    }
    source = root / "adapter" / "adapter_model.safetensors"
    stored = checkpoint / "adapter_model.safetensors"
    with safe_open(source, "pt") as want, safe_open(stored, "pt") as got:
        assert sorted(got.keys()) == sorted(want.keys())
        for key in want.keys():
            assert got.get_tensor(key).dtype == torch.bfloat16
            assert torch.equal(got.get_tensor(key), want.get_tensor(key).to(torch.bfloat16))
    config = json.loads((checkpoint / "adapter_config.json").read_text())
    assert config == json.loads((root / "adapter" / "adapter_config.json").read_text())
    sizes = [p.stat().st_size for p in (source, stored, checkpoint / "adapter.gguf")]
    print("bytes: fp32 source, bf16 copy, adapter.gguf (f32 of the bf16 values):", sizes)
    assert stored.stat().st_size < 0.6 * source.stat().st_size


def served_scenes(model, tokenizer, backend):
    """Greedy scenes for prompts whose greedy choices are clear on the tiny model (each step's
    top-2 logits differ by >= 0.03, 100x the backends' difference): a random tiny model has
    near-ties elsewhere that round either way."""
    from sitcom.decoding import generation
    from sitcom.model import llamacpp

    prompts = ["elaine: Get out!"]
    settings = SceneSettings(max_new_tokens=24, guidance=1, voice=0)  # served with one sequence
    if backend == "llamacpp":
        scenes = llamacpp.generate_scenes(model, tokenizer, prompts, settings, do_sample=False)
    else:
        scenes = generation.generate_scenes(
            model, tokenizer, prompts, settings, do_sample=False, precision="fp32"
        )
    return [(s.raw, s.new_tokens, s.finished) for s in scenes]


def test_torch_backend_serves_the_adapter_merged_like_llamacpp(
    base_and_adapter, base_dir, checkpoint, monkeypatch, caplog
):
    from sitcom.model import serving
    from sitcom.model.llamacpp import LlamaCppModel

    _, tokenizer, base, _, merged_bf16 = base_and_adapter
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    fast, fast_tok, _ = serving.load_served(str(checkpoint), max_batch=1)
    try:
        want = fast.logits_of(ids)
        want_scenes = served_scenes(fast, fast_tok, "llamacpp")
    finally:
        fast.close()
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    with caplog.at_level(logging.WARNING, logger="sitcom.model.serving"):
        model, tok, served = serving.load_served(str(checkpoint))
    assert not caplog.records  # asked for: no warning
    assert (served.backend, served.gguf, served.lora) == ("torch", None, None)
    assert served.hf_dir == str(base_dir) and not isinstance(model, LlamaCppModel)
    assert not model.training and model.dtype == torch.float32
    assert not any("lora" in name for name, _ in model.named_parameters())  # merged
    got = logits(model, ids)
    assert np.abs(got - want).max() < 1e-3
    assert np.abs(got - logits(merged_bf16, ids)).max() < 1e-4
    assert np.abs(got - logits(base, ids)).max() > 1e-2  # the adapter does change it
    assert served_scenes(model, tok, "torch") == want_scenes
    assert want_scenes[0][1] == 24  # a whole scene's worth of tokens, not an early stop
    assert served_scenes(base, tok, "torch") != want_scenes


def test_a_refused_self_test_falls_back_to_transformers_with_one_line(
    base_dir, checkpoint, tmp_path, monkeypatch, caplog
):
    from sitcom.model import serving
    from sitcom.model.llamacpp_check import check_llamacpp

    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SITCOM_BACKEND", raising=False)
    verdict = check_llamacpp(base_dir / "model.gguf", str(base_dir), command=SEGFAULT)
    assert not verdict.ok
    with caplog.at_level(logging.WARNING, logger="sitcom.model.serving"):
        model, _, served = serving.load_served(str(checkpoint))
    assert served.backend == "torch" and served.lora is None
    assert type(model).__name__ == "LlamaForCausalLM"
    lines = [r.getMessage() for r in caplog.records if r.name == "sitcom.model.serving"]
    assert len(lines) == 1 and "crashed" in lines[0] and "with transformers" in lines[0]
    assert str(checkpoint) in lines[0] and "SITCOM_BACKEND=llamacpp" in lines[0]


def test_a_checkpoint_without_the_peft_copy_still_needs_llamacpp(
    base_dir, checkpoint, tmp_path, monkeypatch
):
    from sitcom.model import serving
    from sitcom.model.llamacpp_check import check_llamacpp

    old = tmp_path / "old-lora"  # as gguf-adapter wrote it before the peft copy
    old.mkdir()
    shutil.copyfile(checkpoint / "adapter.gguf", old / "adapter.gguf")
    card = json.loads((checkpoint / "checkpoint.json").read_text())
    card.pop("peft_adapter")
    (old / "checkpoint.json").write_text(json.dumps(card))
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    with pytest.raises(
        ModelLoadError, match="is a llama.cpp adapter: it needs SITCOM_BACKEND auto"
    ):
        serving.resolve(str(old))
    monkeypatch.setenv("SITCOM_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("SITCOM_BACKEND")
    check_llamacpp(base_dir / "model.gguf", str(base_dir), command=SEGFAULT)
    with pytest.raises(ModelLoadError, match="needs llama.cpp, which is off here: .*crashed"):
        serving.resolve(str(old))


def test_a_peft_copy_that_does_not_fit_the_base_is_one_line(checkpoint, tmp_path, monkeypatch):
    from sitcom.model import serving

    broken = shutil.copytree(checkpoint, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not safetensors")
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    with pytest.raises(ModelLoadError, match="cannot apply the adapter in .*broken"):
        serving.load_served(str(broken))


def test_the_peft_copy_keeps_only_the_lora_factors(base_and_adapter, base_dir, tmp_path):
    """A saved copy of a frozen embedding would be as big as the base's (Gemma: 335 MB in
    bf16); adapter.gguf leaves it out, and so does the copy: both backends serve the same."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    root, *_ = base_and_adapter
    source = shutil.copytree(root / "adapter", tmp_path / "adapter")
    state = load_file(source / "adapter_model.safetensors")
    save_file(
        {**state, "base_model.model.model.embed_tokens.weight": torch.ones(400, 32)},
        source / "adapter_model.safetensors",
    )
    ck = write_adapter_checkpoint(source, str(base_dir), base_dir / "model.gguf", tmp_path / "c")
    with safe_open(ck / "adapter_model.safetensors", "pt") as got:
        assert sorted(got.keys()) == sorted(state)


@pytest.fixture
def shipped(base_and_adapter, base_dir, tmp_path, monkeypatch):
    """The adapter shipped as the default on the tiny base (`training ship`), in place of
    sitcom/seinfeld_lora; a doc beside it (the model card) is kept by the ship."""
    from sitcom.model import catalog
    from training.ship import ship

    root, *_ = base_and_adapter
    out = tmp_path / "seinfeld_lora"
    out.mkdir()
    (out / "MODEL_CARD.md").write_text("# the card\n")
    (out / "adapter_model.int4.safetensors").write_bytes(b"the old default's weights")
    card = ship(root / "adapter", out, str(base_dir), overwrite=True)
    monkeypatch.setattr(catalog, "SHIPPED_ADAPTER", out)
    catalog.forget_tuned_fallback()
    yield out, card
    catalog.forget_tuned_fallback()


def test_ship_writes_the_adapter_in_bf16_with_a_card_the_bot_checks(
    base_and_adapter, base_dir, shipped, tmp_path
):
    from sitcom.model.catalog import verified_adapter
    from training.ship import ShipError, ship

    root, *_ = base_and_adapter
    out, card = shipped
    assert sorted(p.name for p in out.iterdir()) == [
        "MODEL_CARD.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "checkpoint.json",
    ]  # the old weights are gone, the card stays
    assert (out / "MODEL_CARD.md").read_text() == "# the card\n"
    assert (card["base_model"], card["adapter_dtype"], card["rank"]) == (
        str(base_dir),
        "bfloat16",
        4,
    )
    assert json.loads((out / "adapter_config.json").read_text())["base_model_name_or_path"] == str(
        base_dir
    )
    assert verified_adapter(out)[1] == card  # every hash on the card matches
    with pytest.raises(ShipError, match="--overwrite"):
        ship(root / "adapter", out, str(base_dir))
    with pytest.raises(ModelLoadError, match="not gemma3, smollm2 or a dir"):
        ship(root / "adapter", tmp_path / "nowhere", str(tmp_path))
    assert not (tmp_path / "nowhere").exists()


def test_a_default_on_another_base_is_served_as_an_adapter_over_it(
    base_and_adapter, base_dir, shipped, monkeypatch
):
    """The shipped default on a base other than SmolLM2 (Gemma 3 in the product, a tiny base
    here) is built once into the cache as an adapter checkpoint and served by llama.cpp from
    the base's GGUF with the adapter merged in, or merged into the base's HF model by
    transformers: same logits."""
    from sitcom.model import catalog, serving

    out, _ = shipped
    _, tokenizer, base, _, merged_bf16 = base_and_adapter
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    served = serving.resolve("seinfeld")
    entry = catalog.tuned_cache_entry(out)
    assert (served.label, served.fell_back, served.backend) == ("seinfeld", False, "llamacpp")
    assert (served.gguf, served.lora, served.probe, served.hf_dir) == (
        entry / "merged.gguf",
        None,
        base_dir / "model.gguf",
        str(base_dir),
    )
    built = served.gguf.stat().st_mtime_ns
    assert serving.resolve(None).gguf.stat().st_mtime_ns == built  # built once, then reused
    assert serving.find_gguf("seinfeld") == entry / "merged.gguf"
    model, _ = serving.load(served, max_batch=1, n_threads=1)
    try:
        fast = model.logits_of(ids)
    finally:
        model.close()
    assert np.abs(fast - logits(merged_bf16, ids)).max() < 1e-3
    assert np.abs(fast - logits(base, ids)).max() > 1e-2  # the adapter is applied
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    model, tok, torch_served = serving.load_served("seinfeld")
    assert (torch_served.backend, torch_served.label) == ("torch", "seinfeld")
    assert np.abs(logits(model, ids) - fast).max() < 1e-3
    evaluated, _ = catalog.load_model("seinfeld")  # what `training evaluate seinfeld` scores
    assert np.abs(logits(evaluated, ids) - fast).max() < 1e-3
    # A cache entry without its merge (deleted, or written before merges) is built again.
    (entry / "merged.gguf").unlink()
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    assert serving.resolve("seinfeld").gguf == entry / "merged.gguf"
    assert (entry / "merged.gguf").is_file()


def test_a_damaged_default_on_another_base_falls_back_to_the_base(shipped, monkeypatch, caplog):
    from sitcom.model import catalog, serving

    out, _ = shipped
    weights = out / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-8] + b"tampered")
    for module in (catalog, serving):  # the base it falls back to: the tiny one
        monkeypatch.setattr(module, "default_model_dir", lambda: Path(base_dir_of(out)))
    monkeypatch.setenv("SITCOM_BACKEND", "torch")
    with caplog.at_level(logging.WARNING, logger="sitcom.model.catalog"):
        served = serving.resolve("seinfeld")
    assert (served.label, served.fell_back, served.lora) == ("smollm2", True, None)
    assert "sha256 differs" in served.why
    assert sum("serving the untuned base" in r.getMessage() for r in caplog.records) == 1


def base_dir_of(shipped_dir):
    return json.loads((shipped_dir / "checkpoint.json").read_text())["base_model"]


def test_a_default_shipped_with_its_corpus_vocabulary_is_served_with_that_head(
    base_and_adapter, base_dir, tmp_path, monkeypatch
):
    """`training ship --served-vocab CORPUS` writes the tokens the corpus uses beside the
    adapter (hashed on its card); the bot's cache entry serves a merge of those rows only,
    with the whole model's logits for them."""
    from helpers import write_corpus

    from sitcom.model import catalog, serving
    from sitcom.model.catalog import verified_adapter
    from training.ship import ship

    root, tokenizer, _, _, merged_bf16 = base_and_adapter
    corpus = write_corpus(
        tmp_path / "corpus", [PROMPT + "\nGEORGE: Serenity now!"], ["JERRY: Hello"]
    )
    out = tmp_path / "seinfeld_lora"
    card = ship(root / "adapter", out, str(base_dir), served_vocab=corpus)
    vocab = json.loads((out / "served_vocab.json").read_text())
    assert vocab["vocab_size"] == len(tokenizer)
    assert set(tokenizer.encode(PROMPT)) <= set(vocab["ids"])
    assert card["served_vocab"]["tokens"] == len(vocab["ids"]) < len(tokenizer)
    assert "served_vocab.json" in card["adapter_files"]
    assert verified_adapter(out)[1] == card
    # Shipping another adapter without one drops it: it belongs to the adapter it came with.
    shutil.copytree(out, tmp_path / "kept")
    ship(root / "adapter", tmp_path / "kept", str(base_dir), overwrite=True)
    assert not (tmp_path / "kept" / "served_vocab.json").exists()

    monkeypatch.setattr(catalog, "SHIPPED_ADAPTER", out)
    catalog.forget_tuned_fallback()
    monkeypatch.setenv("SITCOM_BACKEND", "llamacpp")
    try:
        served = serving.resolve("seinfeld")
        entry = json.loads((served.gguf.parent / "checkpoint.json").read_text())
        assert entry["served_vocab"] is True
        model, _ = serving.load(served, max_batch=1, n_threads=1)
    finally:
        catalog.forget_tuned_fallback()
    ids = tokenizer.encode(PROMPT + "\nGEORGE: Serenity now!")
    try:
        got = model.logits_of(ids)
    finally:
        model.close()
    keep = vocab["ids"]
    assert np.abs(got[:, keep] - logits(merged_bf16, ids)[:, keep]).max() < 1e-3
    assert np.isneginf(np.delete(got, keep, axis=1)).all()


def test_base_facts_come_from_the_metadata_and_a_non_gguf_is_one_line(tiny_model_dir, tmp_path):
    from sitcom.model.lora_gguf import base_gguf_facts
    from training.gguf_export import export_gguf

    source = export_gguf(tiny_model_dir, tmp_path / "tiny.gguf", qtype="f32")
    facts = base_gguf_facts(source)
    config = json.loads((tiny_model_dir / "config.json").read_text())
    assert facts["arch"] == "llama"
    assert facts["blocks"] == config["num_hidden_layers"]
    assert facts["heads"] == config["num_attention_heads"]
    assert facts["kv_heads"] == config.get("num_key_value_heads", config["num_attention_heads"])
    assert "token_embd.weight" in facts["tensors"] and "blk.0.attn_q.weight" in facts["tensors"]
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"not a model at all, just text" * 4)
    with pytest.raises(ModelLoadError, match="is not a GGUF model") as err:
        base_gguf_facts(bad)
    assert "\n" not in str(err.value)
