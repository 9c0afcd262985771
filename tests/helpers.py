"""Builders the test modules share: tiny models and tokenizers built in seconds, a tiny corpus,
the bot's test config and loader, and the real corpus path.

Test modules import these from here (`from helpers import ...`), never from each other or from
conftest; conftest turns some of them into fixtures. The network fakes live beside this file
(discord_payloads.py, slack_fake.py). Heavy libraries are imported inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import json
from pathlib import Path

from sitcom.script import END_OF_TEXT

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

# One episode of the tiny corpus, and a scene opening the tiny tokenizer knows.
EPISODE = TINY_TEXT.strip()
PROMPT = "JERRY: Hello, Newman."

# What the bot's scripted model writes: model-written lines to vote for (and an @everyone
# to neutralise).
SCRIPT = "GEORGE: What is it?\nKRAMER: Giddyup! @everyone\n"


# -- tiny models --------------------------------------------------------------------------

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


def teleprompter_model(tokenizer, text: str):
    """A tiny Llama that, greedily, writes `text` token by token (then starts over)."""
    model = build_tiny_model(tokenizer)
    ids = tokenizer.encode(text)
    step = 0

    def hook(module, args, kwargs, output):
        nonlocal step
        step = 0 if kwargs["input_ids"].shape[1] > 1 else step + 1  # prefill starts over
        output.logits[:, -1, ids[step % len(ids)]] += 100.0
        return output

    model.register_forward_hook(hook, with_kwargs=True)
    return model


# -- a tiny corpus ------------------------------------------------------------------------

def write_corpus(
    path: Path, train: list[str], val: list[str], manifest: dict | None = None
) -> Path:
    """train.txt, val.txt and manifest.json as `python -m data prepare` writes them."""
    path.mkdir(parents=True, exist_ok=True)
    sep = f"\n{END_OF_TEXT}\n"
    (path / "train.txt").write_text(sep.join(train) + "\n")
    (path / "val.txt").write_text(sep.join(val) + "\n")
    (path / "manifest.json").write_text(json.dumps(manifest or {"main_cast": ["JERRY"]}))
    return path


# -- the bot ------------------------------------------------------------------------------

def make_config(tmp_path: Path, model_dir, **extra):
    """The bot's Config on files under `tmp_path`, serving `model_dir`."""
    from bot.config import Config

    return Config(
        db_path=tmp_path / "bot.db", checkpoints_dir=tmp_path / "checkpoints",
        default_checkpoint=str(model_dir), db_timeout_s=0.1, timeout_s=60, **extra,
    )


def scripted_loader(script: str = SCRIPT):
    """The real loader's tokenizer with a tiny model that writes `script` (greedy-ish), so
    scenes have model-written lines to vote for."""
    from sitcom.models import load_model

    def load(name: str):
        _, tokenizer = load_model(name)
        return teleprompter_model(tokenizer, script), tokenizer

    return load


async def start_bot(config, sync: bool = False, loader=None):
    """A SitcomBot over a started Core, its HTTP recorded (discord_payloads.install)."""
    from discord_payloads import install

    from bot.bot import SitcomBot
    from bot.core import Core
    from bot.posting import RetryPolicy

    core = await Core.start(config, loader=loader or scripted_loader())
    core.retry = RetryPolicy(attempts=3, first_delay_s=0.01)
    bot = SitcomBot(config, core)
    await bot.__aenter__()  # what `async with bot` does before login: the loop, ready event
    recorder = install(bot)
    bot.sync_on_setup = sync
    await bot.setup_hook()
    return bot, recorder
