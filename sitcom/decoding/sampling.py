"""Sampling per row: temperature / top-k / top-p / min-p with each row's own settings, and the
draw."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers import (
    LogitsProcessor,
    LogitsProcessorList,
    MinPLogitsWarper,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from sitcom.settings import SceneSettings


class _TopKThenTopP(LogitsProcessor):
    """TopKLogitsWarper followed by TopPLogitsWarper, with top-p run on the k survivors only.

    TopPLogitsWarper sorts the whole vocabulary (49k per row, ~3 ms a step at batch 8 on
    this CPU) although after top-k only k tokens are finite. Tokens outside the top k have
    probability 0, so softmax/cumsum over the k candidates gives the same nucleus; the
    library warper still does the top-p decision, just on a [batch, k] tensor.
    """

    def __init__(self, top_k: int, top_p: float):
        self.top_k = top_k
        self.top_k_warper = TopKLogitsWarper(top_k)
        self.top_p_warper = TopPLogitsWarper(top_p)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        k = min(self.top_k, scores.shape[-1])
        values, indices = torch.topk(scores, k, dim=-1)
        # TopKLogitsWarper keeps every token tied with the k-th score; if a tie pushes a
        # row past k tokens, take the library's full-vocabulary route for exactness.
        if bool(((scores >= values[:, -1:]).sum(dim=-1) > k).any()):
            return self.top_p_warper(input_ids, self.top_k_warper(input_ids, scores))
        kept = self.top_p_warper(input_ids, values)
        return torch.full_like(scores, -float("inf")).scatter_(1, indices, kept)


class PerRowSampling(LogitsProcessor):
    """Temperature / top-k / top-p / min-p per row: rows are grouped by their settings and
    each group goes through transformers' own warpers (which take one value per batch)."""

    def __init__(self, settings: Sequence[SceneSettings]):
        groups: dict[tuple, list[int]] = {}
        for row, s in enumerate(settings):
            groups.setdefault((s.temperature, s.top_k, s.top_p, s.min_p), []).append(row)
        self.groups = []
        for (temperature, top_k, top_p, min_p), rows in groups.items():
            warpers = LogitsProcessorList([TemperatureLogitsWarper(temperature)])
            if top_k > 0 and top_p < 1.0:
                warpers.append(_TopKThenTopP(top_k, top_p))
            elif top_k > 0:
                warpers.append(TopKLogitsWarper(top_k))
            elif top_p < 1.0:
                warpers.append(TopPLogitsWarper(top_p))
            if min_p > 0.0:
                warpers.append(MinPLogitsWarper(min_p))
            self.groups.append((torch.tensor(rows, dtype=torch.long), warpers))

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if len(self.groups) == 1:
            return self.groups[0][1](input_ids, scores)
        out = torch.empty_like(scores)
        for rows, warpers in self.groups:
            rows = rows.to(scores.device)
            out[rows] = warpers(input_ids[rows], scores[rows])
        return out


def sample(scores: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One token per row drawn from softmax(scores).

    argmax(p / Exp(1) noise) draws from p like torch.multinomial, which takes ~1 ms a row
    over a 49k vocabulary on this CPU. The noise itself costs about as much (8 ms a step at
    batch 8), so after top-k/top-p, where a few dozen tokens are finite, only those
    candidates get noise: the others have probability 0 either way.
    """
    finite = int((scores > -float("inf")).sum(dim=-1).max())  # what top-k/top-p left
    if finite < scores.shape[-1] // 4:
        values, candidates = torch.topk(scores, finite, dim=-1)
    else:
        values, candidates = scores, None
    noise = torch.empty_like(values).exponential_(generator=generator)
    picks = (torch.softmax(values, dim=-1) / noise).argmax(dim=-1)
    return picks if candidates is None else candidates.gather(1, picks[:, None])[:, 0]
