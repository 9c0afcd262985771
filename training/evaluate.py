"""Evaluate a checkpoint (or an untouched base model): val loss/ppl/BPB and scene quality.

Scenes are sampled through sitcom.decoding.generation.write_scenes, the bot's own decoding, so the
scores describe what users get.
"""

from __future__ import annotations

import json
import tempfile
from datetime import UTC, datetime
from pathlib import Path

import torch
from transformers import Trainer, TrainingArguments

from data.outputs import check_output_file
from sitcom.decoding.generation import write_scenes
from sitcom.files import atomic_path
from sitcom.model.catalog import load_model, resolve_model
from sitcom.scenes.quality import SceneScore, score_scene, summarize
from sitcom.scenes.script import normalize_prompt
from sitcom.settings import SceneSettings
from training.card import CARD_NAME, card_block_size
from training.corpus import block_lead, load_corpus, pack_eval, token_stream, utf8_bytes
from training.finetune import first_episodes, right_padding_collator
from training.metrics import compute_metrics_for, preprocess_logits_for_metrics
from training.outputs import check_json_path

# Fixed openings so runs compare; each hands the model a different cast member and mood.
PROMPTS: tuple[str, ...] = (
    "ELAINE: Jerry! George! You guys, listen!",
    "[Scene: Monk's Cafe]\nGEORGE: I have to tell you something, and you can't laugh.",
    "KRAMER: (bursting in) Jerry, I've got a business idea.",
    "JERRY: What is the deal with airline peanuts?",
    "[Scene: Jerry's apartment]\nELAINE: I broke up with him. Because of his jacket.",
    "GEORGE: My parents are coming to the city. Both of them.",
    "NEWMAN: Hello, Jerry.",
    "[Scene: The coffee shop]\nKRAMER: You know what you need? A good lawyer.",
)


# Bytes of one batch's fp32 logits at most. The eval loop holds a few copies of them at once
# (the model's logits, its own loss's log-softmax, block_nats'): Gemma's 262,144-token head at
# 4 x 2048 tokens is 8.6 GB a copy, which the 24 GB machines do not survive (OOM-killed, no
# message). Fewer sequences a batch give the same sums.
LOGITS_BUDGET = 2**31


def eval_batch_size(requested: int, block_size: int, vocab_size: int) -> int:
    """`requested`, lowered until a batch's logits fit LOGITS_BUDGET (never below 1)."""
    return max(1, min(requested, LOGITS_BUDGET // (block_size * vocab_size * 4)))


def val_metrics(model, tokenizer, episodes: list[str], block_size: int, batch_size: int) -> dict:
    """nll/ppl/bpb over the episodes, with the same eval code finetune uses (the batch made
    smaller where its logits would not fit: eval_batch_size)."""
    vocab = model.get_output_embeddings().weight.shape[0]
    batch_size = eval_batch_size(batch_size, block_size, vocab)
    dataset = pack_eval(token_stream(episodes, tokenizer), block_size, block_lead(tokenizer))
    with tempfile.TemporaryDirectory(prefix="sitcom-eval-") as tmp:
        args = TrainingArguments(
            output_dir=tmp,
            per_device_eval_batch_size=batch_size,
            report_to="none",
            use_cpu=not torch.cuda.is_available(),
            disable_tqdm=False,
        )
        trainer = Trainer(
            model=model,
            args=args,
            eval_dataset=dataset,
            data_collator=right_padding_collator(tokenizer),
            compute_metrics=compute_metrics_for(utf8_bytes(episodes)),
            preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        )
        metrics = trainer.evaluate()
    return {
        "loss": metrics["eval_nll"],
        "ppl": metrics["eval_ppl"],
        "bpb": metrics["eval_bpb"],
        "tokens": int(metrics["eval_tokens"]),
        "bytes": utf8_bytes(episodes),
        "episodes": len(episodes),
        "block_size": block_size,
    }


def sample_scenes(
    model, tokenizer, n: int, settings: SceneSettings, known: tuple[str, ...], seed: int
) -> list[dict]:
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(n)]
    scenes = write_scenes(model, tokenizer, prompts, settings, seed=seed) if prompts else []
    out = []
    for prompt, lines in zip(prompts, scenes, strict=True):
        skip = len(normalize_prompt(prompt).splitlines())
        out.append(
            {
                "prompt": prompt,
                "lines": lines,
                "score": score_scene(lines, known, skip=skip).as_dict(),
            }
        )
    return out


def evaluate(
    checkpoint: str,
    data: Path,
    *,
    samples: int = 8,
    max_new_tokens: int = 120,
    block_size: int | None = None,
    batch_size: int = 4,
    eval_tokens: int = 0,
    seed: int = 0,
    repetition_penalty: float | None = None,
) -> dict:
    settings = SceneSettings(max_new_tokens=max_new_tokens)
    if repetition_penalty is not None:  # e.g. 1.0 / 5.0, where the original experiment broke
        settings = settings.with_changes(repetition_penalty=repetition_penalty)
    settings = settings.validated()
    if samples < 0:
        raise ValueError("--samples must be 0 or more")
    corpus = load_corpus(data, splits=("val",))
    model, tokenizer = load_model(checkpoint)
    card_path = Path(resolve_model(checkpoint)) / CARD_NAME
    card = json.loads(card_path.read_text()) if card_path.is_file() else None
    if block_size is None:  # the context length the card's val numbers were measured with
        block_size = card_block_size(card)
    if block_size < 16:
        raise ValueError("--block-size must be at least 16")
    episodes = first_episodes(corpus.val, tokenizer, eval_tokens)
    scenes = sample_scenes(model, tokenizer, samples, settings, corpus.speakers, seed)
    return {
        "checkpoint": str(checkpoint),
        "data": str(data),
        "corpus_manifest_sha256": corpus.manifest_sha256,
        "created": datetime.now(UTC).isoformat(timespec="seconds"),
        "card": card,
        "val": val_metrics(model, tokenizer, episodes, block_size, batch_size),
        "quality": summarize([SceneScore(**s["score"]) for s in scenes]),
        "settings": settings.as_dict(),
        "samples": scenes,
    }


def format_report(result: dict) -> str:
    val, q = result["val"], result["quality"]
    rows = [
        ("val loss (nats/token)", f"{val['loss']:.4f}"),
        ("val perplexity", f"{val['ppl']:.2f}"),
        ("val bits per byte", f"{val['bpb']:.4f}"),
        ("val text", f"{val['episodes']} episodes, {val['tokens']} tokens, {val['bytes']} bytes"),
        ("scenes sampled", str(len(result["samples"]))),
    ]
    if result["samples"]:
        rows += [
            ("lines per scene", f"{q['lines']:.1f}"),
            ("well-formed lines", f"{q['well_formed']:.1%}"),
            ("known speakers", f"{q['known_speaker']:.1%}"),
            ("repeated lines", f"{q['repeated']:.1%}"),
            ("distinct-2", f"{q['distinct_2']:.3f}"),
            ("top speaker's turns", f"{q['top_speaker']:.1%}"),
        ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{result['checkpoint']}"] + [f"  {k:<{width}}  {v}" for k, v in rows]
    if result["samples"]:
        first = result["samples"][0]
        lines += ["", "sample:"] + [f"  {line}" for line in first["lines"]]
    return "\n".join(lines)


def write_json(path: Path, data: dict) -> None:
    """Write `path` atomically: only a regular file or a new name (OutputPathError for a
    symbolic link, a device node, a directory), checked again just before the rename."""
    check_output_file(path, "--json")
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp:
        tmp.write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
        check_output_file(path, "--json")  # again, just before the rename


def evaluate_cli(args) -> None:
    result = evaluate(
        args.checkpoint,
        args.data,
        samples=args.samples,
        max_new_tokens=args.max_new_tokens,
        block_size=args.block_size,
        batch_size=args.batch_size,
        eval_tokens=args.eval_tokens,
        seed=args.seed,
        repetition_penalty=args.repetition_penalty,
    )
    print(format_report(result))
    if args.json:
        check_json_path(args.json, args.checkpoint, args.data)  # again: minutes have passed
        write_json(args.json, result)
        print(f"wrote {args.json}")
