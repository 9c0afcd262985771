"""training/: packing, BPB, an end-to-end fine-tune (full and LoRA) and evaluate, in-process."""

from __future__ import annotations

import errno
import json
import math
import shutil
from pathlib import Path

import helpers
import pytest
import torch
from helpers import EPISODE, bos_tokenizer, write_corpus

from sitcom.scenes.script import END_OF_TEXT
from sitcom.settings import SceneSettings
from training.__main__ import main
from training.corpus import (
    block_lead,
    load_corpus,
    pack_eval,
    pack_train,
    token_stream,
    utf8_bytes,
)
from training.metrics import block_nats


@pytest.fixture
def corpus_dir(tmp_path) -> Path:
    return write_corpus(tmp_path / "corpus", [EPISODE] * 12, [EPISODE] * 2)


def test_packing_keeps_eos_between_episodes_and_never_pads(tiny_tokenizer):
    episodes = ["JERRY: Hello, Newman.", "NEWMAN: Hello, Jerry.\nJERRY: Serenity now!"]
    eos = tiny_tokenizer.eos_token_id
    stream = token_stream(episodes, tiny_tokenizer)
    assert stream.count(eos) == 3 and stream[0] == eos and stream[-1] == eos
    first = tiny_tokenizer(episodes[0], add_special_tokens=False)["input_ids"]
    assert stream[1 : 1 + len(first)] == first and stream[1 + len(first)] == eos

    train = pack_train(stream, 8)
    assert len(train) == len(stream) // 8
    flat = [t for i in range(len(train)) for t in train[i]["input_ids"]]
    assert flat == stream[: len(flat)]  # contiguous: no padding, nothing dropped but the tail
    for i in range(len(train)):
        item = train[i]
        assert len(item["input_ids"]) == 8 and item["labels"] == item["input_ids"]
        assert all(item["attention_mask"])  # EOS included: nothing masked

    val = pack_eval(stream, 8)
    predicted = sum(len(val[i]["input_ids"]) - 1 for i in range(len(val)))
    assert predicted == len(stream) - 1  # every token after the first is predicted exactly once


def test_blocks_start_with_the_bos_a_tokenizer_adds_and_still_score_each_token_once(
    tiny_tokenizer,
):
    tok = bos_tokenizer()
    bos = tok.bos_token_id
    assert block_lead(tok) == (bos,)
    assert block_lead(tiny_tokenizer) == ()  # BOS defined but never added: no lead
    stream = token_stream([EPISODE[:400], "JERRY: Hello, Newman."], tok)
    assert bos not in stream

    train = pack_train(stream, 8, block_lead(tok))
    blocks = [train[i]["input_ids"] for i in range(len(train))]
    assert all(len(b) == 8 and b[0] == bos for b in blocks)
    assert [t for b in blocks for t in b[1:]] == stream[: 7 * len(blocks)]  # contiguous text

    val = pack_eval(stream, 8, block_lead(tok))
    scored = []
    for i in range(len(val)):
        item = val[i]
        assert item["input_ids"][0] == bos
        scored += [t for t in item["labels"][1:] if t != -100]
    assert scored == stream[1:]  # every token after the first, once, in order


def test_block_nats_matches_log_softmax():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 11)
    labels = torch.randint(0, 11, (2, 5))
    labels[1, 3:] = -100  # padding of a short block
    rows = block_nats(logits, labels)
    logp = torch.log_softmax(logits, -1)
    want0 = -sum(logp[0, t, labels[0, t + 1]] for t in range(4))
    want1 = -sum(logp[1, t, labels[1, t + 1]] for t in range(2))
    assert torch.allclose(rows[:, 0], torch.stack([want0, want1]), atol=1e-5)
    assert rows[:, 1].tolist() == [4.0, 2.0]
    uniform = block_nats(torch.zeros(1, 4, 11), torch.zeros(1, 4, dtype=torch.long))
    assert uniform[0, 0].item() == pytest.approx(3 * math.log(11))


@pytest.mark.parametrize("block_size", [1024, 40])
def test_bpb_matches_direct_computation(tiny_model_dir, block_size):
    from sitcom.model.catalog import load_model
    from training.evaluate import val_metrics

    model, tok = load_model(tiny_model_dir)
    episodes = [EPISODE[:700], "JERRY: Hello, Newman. Ünïcode costs bytes: ☕"]
    got = val_metrics(model, tok, episodes, block_size=block_size, batch_size=3)

    stream = token_stream(episodes, tok)
    nats = 0.0
    with torch.no_grad():  # the same blocks, one at a time, through the model's own loss
        for start in range(0, len(stream) - 1, block_size - 1):
            ids = torch.tensor([stream[start : start + block_size]])
            nats += model(input_ids=ids, labels=ids).loss.item() * (ids.shape[1] - 1)
    n_bytes = sum(len(e.encode()) for e in episodes)
    assert got["bytes"] == n_bytes == utf8_bytes(episodes)
    assert got["tokens"] == len(stream) - 1
    assert got["loss"] == pytest.approx(nats / (len(stream) - 1), rel=1e-4)
    assert got["bpb"] == pytest.approx(nats / math.log(2) / n_bytes, rel=1e-4)
    assert got["ppl"] == pytest.approx(math.exp(got["loss"]), rel=1e-6)


def finetune_args(corpus: Path, out: Path, base: Path, *extra: str) -> list[str]:
    """40 steps at a high learning rate, so the tiny model learns the corpus's format."""
    return helpers.finetune_args(
        corpus,
        out,
        base,
        *extra,
        batch_size=4,
        max_steps=40,
        eval_steps=10,
        save_steps=10,
        lr="3e-3",
        warmup_steps=2,
        log_steps=2,
        gguf=None,
    )


def test_finetune_end_to_end_then_evaluate(tmp_path, corpus_dir, tiny_model_dir, capsys):
    from transformers import AutoModelForCausalLM, GenerationConfig

    from training.evaluate import evaluate

    out = tmp_path / "ck"
    before = evaluate(str(tiny_model_dir), corpus_dir, samples=0)["val"]
    assert main(finetune_args(corpus_dir, out, tiny_model_dir)) == 0
    assert "saved" in capsys.readouterr().out

    for name in (
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "generation_config.json",
        "checkpoint.json",
        "metrics.jsonl",
        "loss.png",
        "model.gguf",
    ):
        assert (out / name).is_file(), name
    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "model.gguf").read_bytes()[:4] == b"GGUF"  # what the bot serves
    assert not (tmp_path / "ck.work").exists()  # removed after a successful export
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp leftovers

    card = json.loads((out / "checkpoint.json").read_text())
    manifest_sha = __import__("hashlib").sha256((corpus_dir / "manifest.json").read_bytes())
    assert card["corpus_manifest_sha256"] == manifest_sha.hexdigest()
    assert card["steps"] == 40 and card["tokens_seen"] == 40 * 4 * 64
    assert card["precision"] == "fp32" and card["base_model"] == str(tiny_model_dir)
    assert card["val_bpb"] < before["bpb"] * 0.8  # a repetitive corpus is learned fast
    assert card["created"].endswith("+00:00")

    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    train = [r["loss"] for r in records if "loss" in r]
    evals = [r for r in records if "eval_bpb" in r]
    assert train[-1] < train[0] - 1.0
    assert [r["step"] for r in evals] == [10, 20, 30, 40]
    assert all(r["tokens_per_second"] > 0 for r in records if "loss" in r and r["step"] > 1)
    best = min(evals, key=lambda r: r["eval_bpb"])
    assert card["best_step"] == best["step"] and card["val_bpb"] == best["eval_bpb"]

    model = AutoModelForCausalLM.from_pretrained(out)  # plain transformers, no sitcom code
    assert model.config.architectures == ["LlamaForCausalLM"]
    gen = GenerationConfig.from_pretrained(out)
    assert gen.do_sample and gen.temperature == SceneSettings().temperature
    assert gen.repetition_penalty == SceneSettings().repetition_penalty

    result = evaluate(str(out), corpus_dir, samples=3, max_new_tokens=16, eval_tokens=0)
    assert result["val"]["loss"] == pytest.approx(card["val_loss"], rel=1e-4)  # the best exported
    assert result["card"]["steps"] == 40
    assert set(result["quality"]) == {
        "lines",
        "well_formed",
        "known_speaker",
        "repeated",
        "distinct_2",
        "top_speaker",
    }
    assert len(result["samples"]) == 3
    assert result["samples"][0]["lines"][0] == "ELAINE: Jerry! George! You guys, listen!"


def test_lora_merges_into_a_plain_checkpoint(tmp_path, corpus_dir, tiny_model_dir):
    from safetensors import safe_open
    from transformers import AutoModelForCausalLM

    out = tmp_path / "lora"
    args = finetune_args(corpus_dir, out, tiny_model_dir, "--lora", "--lr", "1e-2")
    args[args.index("--max-steps") + 1] = "10"
    assert main(args) == 0
    with safe_open(out / "model.safetensors", "pt") as f:
        keys = list(f.keys())
    assert keys and not any("lora" in k or "base_layer" in k for k in keys)
    assert not (out / "adapter_config.json").exists()
    merged = AutoModelForCausalLM.from_pretrained(out)
    base = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    w = "model.layers.0.self_attn.q_proj.weight"
    assert not torch.equal(merged.state_dict()[w], base.state_dict()[w])  # the adapter is in
    assert json.loads((out / "checkpoint.json").read_text())["lora"] is True


def test_disk_full_during_export_leaves_no_output(
    tmp_path, corpus_dir, tiny_model_dir, monkeypatch, capsys
):
    import training.card

    def full(*_args, **_kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp_path / "x"))

    monkeypatch.setattr(training.card.shutil, "copyfile", full)  # the library call, not ours
    out = tmp_path / "ck"
    args = finetune_args(corpus_dir, out, tiny_model_dir)
    args[args.index("--max-steps") + 1] = "2"
    assert main(args) == 1
    last = capsys.readouterr().err.strip().splitlines()[-1]  # above it: progress bars
    assert last.startswith("error: disk full while writing") and "Traceback" not in last
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".ck")] == []
    # the work dir survives, so the run can be resumed once space is free
    assert (tmp_path / "ck.work" / "checkpoint-2").is_dir()


def test_corpus_manifest_speakers_and_errors(tmp_path):
    from training.corpus import CorpusError

    c = write_corpus(
        tmp_path / "c",
        [EPISODE],
        [EPISODE],
        {"main_cast": ["JERRY"], "top_speakers": {"Jerry": 5, "BANIA": 2}},
    )
    assert load_corpus(c).speakers == ("JERRY", "BANIA")
    (c / "manifest.json").write_text("{not json")
    assert "KRAMER" in load_corpus(c).speakers  # fallback: the default cast
    (c / "val.txt").write_text(f"\n{END_OF_TEXT}\n  \n")
    with pytest.raises(CorpusError, match="val.txt holds no episodes"):
        load_corpus(c)
    shutil.rmtree(c)
    with pytest.raises(CorpusError, match="does not exist"):
        load_corpus(c)


def test_finetune_goes_on_training_an_extracted_adapter(tmp_path, corpus_dir, tiny_model_dir):
    """--init-adapter: the shipped form trains further; its export is still a rank-r change
    of the base, so `extract` at the same rank takes it back without loss."""
    from training.extract import extract

    full = tmp_path / "full"
    args = finetune_args(corpus_dir, full, tiny_model_dir, "--gguf", "none")
    args[args.index("--max-steps") + 1] = "10"
    assert main(args) == 0
    extract(full, tmp_path / "a", rank=4, base=str(tiny_model_dir), dtype="float32")
    out = tmp_path / "more"
    args = finetune_args(
        corpus_dir,
        out,
        tiny_model_dir,
        "--init-adapter",
        str(tmp_path / "a"),
        "--gguf",
        "none",
        "--lr",
        "1e-2",
        "--keep-work",
    )
    args[args.index("--max-steps") + 1] = "20"
    assert main(args) == 0
    from safetensors import safe_open

    with safe_open(
        tmp_path / "more.work" / "checkpoint-20" / "adapter_model.safetensors", "pt"
    ) as f:  # Trainer's checkpoint: the adapter, not the frozen embedding
        assert not [k for k in f.keys() if "base_layer" in k]
    card = json.loads((out / "checkpoint.json").read_text())
    assert card["init_adapter"]["path"] == str(tmp_path / "a")
    assert card["init_adapter"]["steps"] == 10
    first = json.loads((full / "checkpoint.json").read_text())["val_bpb"]
    assert card["val_bpb"] < first  # it went on learning
    again = extract(out, tmp_path / "b", rank=4, base=str(tiny_model_dir), dtype="float32")
    assert again["extract_rel_error_max"] < 1e-3
    assert again["tokens_seen_total"] == 20 * 4 * 64 + 10 * 4 * 64  # both stages
    assert "embedding" in again["form"]  # the tied embedding's change trained too
    assert again["form"].endswith("of an adapter trained further")

    bad = finetune_args(
        corpus_dir,
        tmp_path / "x",
        tiny_model_dir,
        "--init-adapter",
        str(tmp_path),
        "--gguf",
        "none",
    )
    assert main(bad) == 2


def test_a_fine_tune_of_our_checkpoint_counts_both_stages(tmp_path, corpus_dir, tiny_model_dir):
    """--base DIR of an earlier fine-tune (e.g. a longer-context second stage): the card names
    that stage, and an adapter extracted against the original base counts both stages."""
    from training.extract import extract

    first = tmp_path / "first"
    args = finetune_args(corpus_dir, first, tiny_model_dir, "--gguf", "none")
    args[args.index("--max-steps") + 1] = "10"
    assert main(args) == 0
    second = tmp_path / "second"
    args = finetune_args(corpus_dir, second, first, "--gguf", "none", "--block-size", "128")
    args[args.index("--max-steps") + 1] = "5"
    assert main(args) == 0
    card = json.loads((second / "checkpoint.json").read_text())
    prior = card["init_checkpoint"]
    assert prior["path"] == str(first) and prior["steps"] == 10
    assert prior["base_model"] == str(tiny_model_dir) and prior["block_size"] == 64
    assert prior["train_wall_minutes"] is not None  # from the first stage's training log
    adapter = extract(second, tmp_path / "a", rank=4, base=str(tiny_model_dir))
    assert adapter["tokens_seen_total"] == 5 * 4 * 128 + 10 * 4 * 64
    assert adapter["base_model"] == str(tiny_model_dir)
    assert json.loads((first / "checkpoint.json").read_text()).get("init_checkpoint") is None


# -- --corpus-vocab: the softmax over the corpus's tokens while training ------------------------


def test_corpus_vocab_head_and_loss(tiny_model_dir):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.corpus_vocab import causal_lm_loss, corpus_token_ids, restrict_head

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    tokenizer = AutoTokenizer.from_pretrained(tiny_model_dir)
    vocab = model.get_output_embeddings().weight.shape[0]
    ids = torch.tensor([tokenizer.encode(EPISODE)[:48]])
    keep = corpus_token_ids(ids.tolist(), tokenizer)
    assert 1 < len(keep) < vocab and keep.tolist() == sorted(set(keep.tolist()))
    with torch.no_grad():
        full = model(ids, labels=ids)
    restrict_head(model, keep)
    loss_func = causal_lm_loss(keep, vocab)
    model.train()
    with torch.no_grad():
        out = model(ids)
    assert out.logits.shape[-1] == len(keep)  # only the corpus's tokens are computed
    assert torch.allclose(out.logits, full.logits[..., keep])
    restricted = loss_func(out, ids).item()
    # the same cross-entropy, by hand, over the kept tokens
    logp = torch.log_softmax(full.logits[0, :-1, keep], -1)
    targets = torch.searchsorted(keep, ids[0, 1:])
    assert restricted == pytest.approx(-logp[torch.arange(47), targets].mean().item(), rel=1e-5)
    assert restricted < full.loss.item()  # fewer tokens share the probability
    # summed over the accumulated batch's tokens when Trainer says how many there are
    assert loss_func(out, ids, num_items_in_batch=94).item() == pytest.approx(
        restricted / 2, rel=1e-5
    )
    model.eval()  # evaluation sees the whole head: the honest full-vocabulary loss
    with torch.no_grad():
        again = model(ids)
    assert again.logits.shape[-1] == vocab
    assert loss_func(again, ids).item() == pytest.approx(full.loss.item(), rel=1e-5)
    assert "lm_head.weight" in model.state_dict()  # nothing of it is saved


def test_finetune_with_corpus_vocab_reports_full_vocabulary_bpb(
    tmp_path, corpus_dir, tiny_model_dir, capsys
):
    from training.evaluate import evaluate

    out = tmp_path / "ck"
    args = finetune_args(corpus_dir, out, tiny_model_dir, "--lora", "--corpus-vocab")
    args[args.index("--max-steps") + 1] = "10"
    assert main(args) == 0
    assert "softmax over the corpus's" in capsys.readouterr().out
    card = json.loads((out / "checkpoint.json").read_text())
    assert card["settings"]["corpus_vocab"] is True
    before = evaluate(str(tiny_model_dir), corpus_dir, samples=0)["val"]
    after = evaluate(str(out), corpus_dir, samples=0, eval_tokens=0)["val"]
    assert after["bpb"] < before["bpb"]  # it learned, measured over the whole vocabulary
    assert after["loss"] == pytest.approx(card["val_loss"], rel=1e-4)  # evals were full-vocab


def test_eval_batches_shrink_until_their_logits_fit(tiny_model_dir, monkeypatch):
    """Gemma's whole head at 4 x 2048 tokens is 8.6 GB of logits a copy (OOM-killed on the
    24 GB machines): the batch shrinks to what fits, and the sums stay the same."""
    from sitcom.model.catalog import load_model
    from training import evaluate
    from training.evaluate import eval_batch_size, val_metrics

    assert eval_batch_size(4, 2048, 262_144) == 1  # Gemma at the card's 2048
    assert eval_batch_size(4, 2048, 49_152) == 4  # SmolLM2: 1.6 GB
    assert eval_batch_size(4, 1024, 262_144) == 2
    assert eval_batch_size(4, 1 << 20, 1 << 20) == 1  # never below one sequence
    model, tok = load_model(tiny_model_dir)
    episodes = [EPISODE[:700]]
    want = val_metrics(model, tok, episodes, block_size=40, batch_size=3)
    seen = []
    monkeypatch.setattr(evaluate, "LOGITS_BUDGET", 40 * len(tok) * 4)  # one block's logits
    real = evaluate.TrainingArguments
    monkeypatch.setattr(
        evaluate,
        "TrainingArguments",
        lambda **kw: seen.append(kw["per_device_eval_batch_size"]) or real(**kw),
    )
    got = val_metrics(model, tok, episodes, block_size=40, batch_size=3)
    assert seen == [1] and got["loss"] == pytest.approx(want["loss"], rel=1e-5)
