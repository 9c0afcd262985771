"""Shared fixtures: tiny random models and tokenizers built in seconds, and the real corpus path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RAW_CORPUS = ROOT.parent / "shared" / "data" / "seinfeld-raw"

# Text the tiny BPE is trained on: enough script shape that speaker names are single tokens.
TINY_TEXT = """[Scene: Jerry's apartment]
(Kramer bursts in)
JERRY: Hello, Newman.
NEWMAN: Hello, Jerry.
ELAINE: Jerry! George! You guys, listen!
GEORGE: What? What is it?
KRAMER: Giddyup! I'm out there, Jerry, and I'm loving every minute of it!
ELAINE: Get out! I'm sorry. No soup for you.
JERRY: (to Elaine) I'm sorry. That's a shame. Not that there's anything wrong with that.
GEORGE: Serenity now! It's not a lie if you believe it.
FRANK: Serenity now! A Festivus for the rest of us.
PUDDY: Yeah, that's right. High five.
""" * 3

# Keep torch from fighting the other tests for the machine's two cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def build_tiny_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator([TINY_TEXT], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|endoftext|>", bos_token="<|endoftext|>",
        pad_token="<|endoftext|>", unk_token="<|endoftext|>",
    )


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config).eval()


def save_tiny_model_dir(path: Path, seed: int = 0) -> Path:
    """A complete HF checkpoint directory (config, safetensors, tokenizer) of a tiny model."""
    tokenizer = build_tiny_tokenizer()
    model = build_tiny_model(tokenizer, seed=seed)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


@pytest.fixture(scope="session")
def tiny_tokenizer():
    return build_tiny_tokenizer()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    """Read-only tiny checkpoint shared by the session; copy it before modifying."""
    return save_tiny_model_dir(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture
def raw_corpus() -> Path:
    if not RAW_CORPUS.is_dir():
        pytest.skip(f"real transcripts not found at {RAW_CORPUS} (needs ../shared beside it)")
    return RAW_CORPUS
