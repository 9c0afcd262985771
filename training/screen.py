"""Screen a writer before readers: the bits per byte it gives the show's real continuation
of validation openings (`judge openings` files), with the opening as a `/scene` prompt.

Readers decide; this is a cheap first look at a *writer* (a training change). It does not
screen decoding: guidance on the opening, which readers reward, raises it (it moves
probability toward the opening's own material, which the show's next lines do not need;
training/EXPERIMENTS.md, eleventh session). Written here because it is the loss of a
prompt-conditioned continuation, which transformers' Trainer evaluation does not give.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import torch

from training.judge import JudgeError, load_openings


def continuation_nats(
    model, tokenizer, opening: Sequence[str], continuation: Sequence[str]
) -> tuple[float, int]:
    """(nats, bytes) of the continuation's text after the opening, as a scene prompt."""
    from sitcom.decoding.plan import scene_prompt_ids
    from sitcom.decoding.vocab import stop_token_ids
    from sitcom.scenes.script import normalize_prompt

    context = scene_prompt_ids(
        tokenizer, normalize_prompt("\n".join(opening)), stop_token_ids(tokenizer)
    )
    text = "\n".join(continuation) + "\n"
    target = tokenizer(text, add_special_tokens=False)["input_ids"]
    ids = torch.tensor([context + target])
    start = len(context)
    with torch.no_grad():
        logits = model(input_ids=ids).logits[0, start - 1 : -1].float()
    logp = torch.log_softmax(logits, dim=-1)[torch.arange(len(target)), torch.tensor(target)]
    return -logp.sum().item(), len(text.encode())


def screen(models: Sequence[str], openings_path: Path) -> list[dict]:
    """Per model: BPB over all continuations, and on how many openings it beats the first."""
    from sitcom.model.catalog import ModelLoadError, load_model

    openings = load_openings(openings_path)
    per_model = []
    for name in models:
        try:
            model, tokenizer = load_model(name)
        except ModelLoadError as e:
            raise JudgeError(str(e)) from None
        per_model.append(
            [continuation_nats(model, tokenizer, r["opening"], r["continuation"]) for r in openings]
        )
    first = per_model[0]
    return [
        {
            "model": name,
            "bpb": sum(n for n, _ in rows) / sum(b for _, b in rows) / math.log(2),
            "better_than_first": sum(n < f for (n, _), (f, _) in zip(rows, first, strict=True)),
            "openings": len(rows),
        }
        for name, rows in zip(models, per_model, strict=True)
    ]


def screen_cli(args) -> int:
    results = screen(args.model, args.openings)
    for r in results:
        print(
            f"{r['model']}: continuation BPB {r['bpb']:.4f}, better than {results[0]['model']} "
            f"on {r['better_than_first']}/{r['openings']} openings"
        )
    return 0
