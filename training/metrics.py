"""Validation metrics: loss, perplexity and bits per byte.

BPB = total nats / ln 2 / UTF-8 bytes of the validation text. Unlike loss per token it
does not depend on the tokenizer, so GPT-2 and SmolLM2 compare fairly.

Trainer's own eval_loss is a mean of per-batch means (a short last block gets too much
weight), so we sum nats per block inside the eval loop instead: preprocess_logits_for_metrics
shrinks each batch's logits to (nats, tokens) per block before Trainer gathers them.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch


def block_nats(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """(batch, seq, vocab) logits + labels -> (batch, 2): summed nats and predicted tokens."""
    logits = logits[:, :-1].float()
    target = labels[:, 1:]
    nll = torch.nn.functional.cross_entropy(
        logits.reshape(-1, logits.size(-1)), target.reshape(-1), ignore_index=-100, reduction="none"
    ).view(target.shape)
    mask = target != -100
    return torch.stack([(nll * mask).sum(1), mask.sum(1).float()], dim=1)


def preprocess_logits_for_metrics(logits, labels: torch.Tensor) -> torch.Tensor:
    if isinstance(logits, tuple):  # some models return (logits, past_key_values, ...)
        logits = logits[0]
    return block_nats(logits, labels)


def summarize_nats(total_nats: float, tokens: float, n_bytes: int) -> dict[str, float]:
    nll = total_nats / tokens
    return {
        "nll": nll,
        "ppl": math.exp(min(nll, 700.0)),  # exp overflows past ~709 nats
        "bpb": total_nats / math.log(2) / n_bytes,
        "tokens": tokens,
    }


def compute_metrics_for(n_bytes: int) -> Callable:
    """A Trainer compute_metrics that turns gathered (nats, tokens) rows into nll/ppl/bpb."""

    def compute_metrics(pred) -> dict[str, float]:
        rows = np.asarray(pred.predictions, dtype=np.float64).reshape(-1, 2)
        return summarize_nats(float(rows[:, 0].sum()), float(rows[:, 1].sum()), n_bytes)

    return compute_metrics
