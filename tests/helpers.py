"""Builders the test modules share: tiny models and tokenizers built in seconds, a tiny corpus,
the bot's test config and loader, and the real corpus path.

Test modules import these from here (`from helpers import ...`), never from each other or from
conftest; conftest turns some of them into fixtures. The network fakes live beside this file
(discord_payloads.py, slack_fake.py). Heavy libraries are imported inside the functions, so
importing this module stays cheap.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from sitcom.scenes.script import END_OF_TEXT

ROOT = Path(__file__).resolve().parent.parent
RAW_CORPUS = ROOT.parent / "shared" / "data" / "seinfeld-raw"

# Text the tiny BPE is trained on: enough script shape that speaker names are single tokens.
TINY_TEXT = (
    """[Scene: Jerry's apartment]
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
"""
    * 3
)

# One episode of the tiny corpus, and a scene opening the tiny tokenizer knows.
EPISODE = TINY_TEXT.strip()
PROMPT = "JERRY: Hello, Newman."

# What the bot's scripted model writes: model-written lines to vote for (and an @everyone
# to neutralise).
SCRIPT = "GEORGE: What is it?\nKRAMER: Giddyup! @everyone\n"


# -- tiny models --------------------------------------------------------------------------


def build_tiny_tokenizer(extra: str = ""):
    """A byte-level BPE trained on TINY_TEXT (+ `extra`, for words a test needs whole)."""
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
    tok.train_from_iterator([TINY_TEXT + extra], trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|endoftext|>",
        bos_token="<|endoftext|>",
        pad_token="<|endoftext|>",
        unk_token="<|endoftext|>",
    )


def bos_tokenizer():
    """The tiny tokenizer made to add a BOS of its own by default, as Gemma's does."""
    from tokenizers.processors import TemplateProcessing
    from transformers import PreTrainedTokenizerFast

    tok = build_tiny_tokenizer()
    inner = tok.backend_tokenizer
    inner.add_special_tokens(["<bos>"])
    bos = inner.token_to_id("<bos>")
    inner.post_processor = TemplateProcessing(single="<bos> $A", special_tokens=[("<bos>", bos)])
    return PreTrainedTokenizerFast(
        tokenizer_object=inner,
        eos_token="<|endoftext|>",
        bos_token="<bos>",
        pad_token="<|endoftext|>",
    )


def build_tiny_model(tokenizer, seed: int = 0):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=True,
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


def save_tiny_pair(root: Path) -> tuple[Path, Path]:
    """(base dir, tuned dir) under `root`: the tuned model's linear layers moved by a rank-2
    change, and an adapter card with its steps and val_bpb."""
    import torch

    from sitcom.model.adapters import ADAPTER_CARD
    from sitcom.model.catalog import load_model

    base = save_tiny_model_dir(root / "base")
    model, tok = load_model(base)
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for layer in model.model.layers:
            for lin in (layer.self_attn.q_proj, layer.mlp.down_proj):
                out_f, in_f = lin.weight.shape
                change = torch.randn(out_f, 2, generator=gen) @ torch.randn(2, in_f, generator=gen)
                lin.weight += change
    tuned = root / "tuned"
    model.save_pretrained(tuned)
    tok.save_pretrained(tuned)
    (tuned / ADAPTER_CARD).write_text(json.dumps({"steps": 7, "val_bpb": 1.0}))
    return base, tuned


def teleprompter_model(tokenizer, text: str):
    """A tiny Llama that, greedily, writes `text` token by token (then starts over)."""
    model = build_tiny_model(tokenizer)
    ids = tokenizer.encode(text)
    step = 0

    def hook(module, args, kwargs, output):
        nonlocal step
        if "input_ids" in kwargs:  # generate's own pass; guidance's runs positionally, same step
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
        db_path=tmp_path / "bot.db",
        checkpoints_dir=tmp_path / "checkpoints",
        default_checkpoint=str(model_dir),
        db_timeout_s=0.1,
        timeout_s=60,
        **extra,
    )


def scripted_loader(script: str = SCRIPT):
    """The real loader's tokenizer with a tiny model that writes `script` (greedy-ish), so
    scenes have model-written lines to vote for."""
    from sitcom.model.catalog import load_model

    def load(name: str):
        _, tokenizer = load_model(name)
        return teleprompter_model(tokenizer, script), tokenizer

    return load


# `python -c SCRIPTED_BOT.format(tests=...)`: the real `python -m bot`, its model writing
# SCRIPT (a random tiny model may write nothing beyond the opening, which the bot reports).
SCRIPTED_BOT = """
import sys
sys.path.insert(0, {tests!r})
import sitcom.model.serving
from helpers import scripted_loader
sitcom.model.serving.load_hf_model = scripted_loader()
from bot.__main__ import main
sys.exit(main())
"""


async def start_bot(config, sync: bool = False, loader=None):
    """A SitcomBot over a started Core, its HTTP recorded (discord_payloads.install)."""
    from discord_payloads import install

    from bot.core import Core
    from bot.discord.bot import SitcomBot
    from bot.posting import RetryPolicy

    core = await Core.start(config, loader=loader or scripted_loader())
    core.retry = RetryPolicy(attempts=3, first_delay_s=0.01)
    bot = SitcomBot(config, core)
    await bot.__aenter__()  # what `async with bot` does before login: the loop, ready event
    recorder = install(bot)
    bot.sync_on_setup = sync
    await bot.setup_hook()
    return bot, recorder


# -- Slack (against slack_fake.FakeSlack) -------------------------------------------------


async def start_slack(tmp_path: Path, model_dir, fake, db_timeout_s: float | None = None, **extra):
    """A started SlackFrontend over a started Core (the scripted loader), talking to `fake`;
    Socket Mode unless `slack_app_token=None` is passed."""
    import dataclasses

    from slack_fake import APP_TOKEN, BOT_TOKEN

    from bot.core import Core
    from bot.posting import RetryPolicy
    from bot.slack.app import SlackFrontend
    from bot.slack.surface import make_client

    extra.setdefault("slack_app_token", APP_TOKEN)
    config = make_config(tmp_path, model_dir, slack_bot_token=BOT_TOKEN, **extra)
    if db_timeout_s is not None:
        config = dataclasses.replace(config, db_timeout_s=db_timeout_s)
    core = await Core.start(config, loader=scripted_loader())
    core.retry = RetryPolicy(attempts=3, first_delay_s=0.01)
    slack = SlackFrontend(
        config, core, client=make_client(BOT_TOKEN, fake.base_url), host="127.0.0.1"
    )
    await slack.start()
    return slack


async def answers(fake, payload: dict, count: int = 1) -> list[dict]:
    """Send a slash command over Socket Mode (the ack must come within Slack's 3 s) and
    return the app's first `count` answers: the ack's own text, if any, then what went to
    the command's response_url."""
    from slack_fake import command_envelope

    ack = await fake.send_envelope(command_envelope(payload))
    first = [ack] if ack.get("text") else []
    replies = fake.replies(payload["response_url"])
    await fake.wait_for(lambda: len(first) + len(replies) >= count)
    return (first + replies)[:count]


async def command(fake, name: str, text: str = "", **kw) -> dict:
    """A slash command's first answer."""
    from slack_fake import slash_command

    return (await answers(fake, slash_command(fake, name, text, **kw)))[0]


def refs(fake) -> list[str]:
    """CHANNEL/ts of every message the app posted, from what the fake server answered."""
    found = [f"{a['channel']}/{a['timestamp']}" for a in fake.find("reactions.add")]
    return list(dict.fromkeys(found))


def sign(secret: str, body: str, timestamp: int | None = None) -> dict:
    """The headers Slack signs an HTTP-mode request `body` with, under `secret`."""
    import hashlib
    import hmac
    import time

    ts = str(timestamp or int(time.time()))
    digest = hmac.new(secret.encode(), f"v0:{ts}:{body}".encode(), hashlib.sha256).hexdigest()
    return {"X-Slack-Request-Timestamp": ts, "X-Slack-Signature": f"v0={digest}"}


def finetune_args(corpus: Path, out: Path, base: Path, *extra: str, **options) -> list[str]:
    """`training finetune` arguments for a short fp32 run on a tiny model: 3 steps, an eval
    and a save each step, no GGUF. Keywords override a flag (max_steps=40 -> --max-steps 40;
    None drops it); `extra` is appended as given."""
    flags = {
        "block_size": 64,
        "batch_size": 2,
        "grad_accum": 1,
        "max_steps": 3,
        "eval_steps": 1,
        "save_steps": 1,
        "precision": "fp32",
        "log_steps": 1,
        "gguf": "none",
    } | options
    args = ["finetune", "--data", str(corpus), "--out", str(out), "--base", str(base)]
    for name, value in flags.items():
        if value is not None:
            args += [f"--{name.replace('_', '-')}", str(value)]
    return [*args, *extra]


def transition_model_dir(path: Path, tokenizer, steps) -> Path:
    """A tiny Llama saved (with a GGUF) at `path` whose next-token logits follow `steps`,
    (token, next token, logit) triples: its blocks add nothing to the residual stream, each
    token of the steps embeds as its own unit vector and the LM head maps it to the logits
    of its next tokens; tokens outside the steps get flat logits."""
    import torch

    from training.gguf_export import export_gguf

    tokens = sorted({t for here, there, _ in steps for t in (here, there)})
    model = build_tiny_model(tokenizer)
    model.config.tie_word_embeddings = False
    hidden = model.config.hidden_size
    assert len(tokens) <= hidden, "one embedding dimension per token"
    slot_of = {token: slot for slot, token in enumerate(tokens)}
    with torch.no_grad():
        emb = torch.zeros_like(model.model.embed_tokens.weight)
        head = torch.zeros(model.config.vocab_size, hidden)
        for token, slot in slot_of.items():
            emb[token, slot] = 1.0
        for here, there, logit in steps:
            head[there, slot_of[here]] = logit
        model.model.embed_tokens.weight = torch.nn.Parameter(emb)
        model.lm_head.weight = torch.nn.Parameter(head)
        for layer in model.model.layers:
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    export_gguf(path, qtype="f32")
    return path


# -- transformers' process-wide patches ---------------------------------------------------


def transformers_globals() -> dict[tuple[object, str], object]:
    """What transformers swaps process-wide while it builds or loads a model
    (transformers.initialization: PreTrainedModel.tie_weights / init_weights and the
    torch.nn.init functions), as {(owner, name): function}."""
    from transformers import initialization
    from transformers.modeling_utils import PreTrainedModel

    places = [(PreTrainedModel, "tie_weights"), (PreTrainedModel, "init_weights")]
    places += [
        (sys.modules[module], name)
        for module in initialization.TORCH_MODULES_TO_PATCH
        if module in sys.modules
        for name in initialization.TORCH_INIT_FUNCTIONS
        if hasattr(sys.modules[module], name)
    ]
    return {place: getattr(*place) for place in places}


def changed_globals(before: dict[tuple[object, str], object]) -> list[str]:
    """The names in `before` (transformers_globals()) that now hold another function."""
    return [f"{o.__name__}.{n}" for (o, n), f in before.items() if getattr(o, n) is not f]


def restore_globals(before: dict[tuple[object, str], object]) -> None:
    for (owner, name), function in before.items():
        setattr(owner, name, function)


def sharp_model_dir(path, seed: int = 3):
    """A tiny random Llama with its head scaled up, so greedy choices are far from ties
    (llama.cpp and torch differ in the last float bits), saved with its tokenizer and
    exported for llama.cpp; returns `path`."""
    import torch

    from training.gguf_export import export_gguf

    tok = build_tiny_tokenizer()
    model = build_tiny_model(tok, seed=seed)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        rng = torch.Generator().manual_seed(seed)
        model.lm_head.weight = torch.nn.Parameter(
            torch.randn(model.lm_head.weight.shape, generator=rng)
        )
    model.save_pretrained(path)
    tok.save_pretrained(path)
    export_gguf(path, qtype="f32")
    return path
