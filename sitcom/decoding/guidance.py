"""Classifier-free guidance on the opening (the `guidance` setting).

A scene's next token is drawn from

    logits(x | opening, scene so far) + (g - 1) * [log p(x | opening, scene so far)
                                                   - log p(x | scene so far)]

which at g = 1 is the plain model and at g > 1 favours what the opening makes likelier
(Sanchez et al., 2023, "Stay on topic with classifier-free guidance"). Readers reward
scenes that keep to their opening: across systems, the writer whose tokens gained more
from the opening won 65 % of the blind pairs (training/EXPERIMENTS.md, fourth session).
Written as a shift of the raw logits (not transformers' log-softmax form) so that the
repetition penalty and sampling after it see the same scale with guidance on or off.

The unconditional side is the same scene without its opening: the lead a scene starts
with (END_OF_TEXT or BOS) and then the tokens written so far. llama.cpp runs it as a twin
sequence in the same batch (sitcom.decoding.batcher); transformers through its own
UnbatchedClassifierFreeGuidanceLogitsProcessor, with a scale per row.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from transformers.generation.logits_process import (
    UnbatchedClassifierFreeGuidanceLogitsProcessor,
)


def guide(cond: torch.Tensor, uncond: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """cond's logits shifted by (scale - 1) x the opening's log-probability gain; tokens
    either side rules out (-inf, e.g. outside a served vocabulary) keep cond's value."""
    gain = torch.log_softmax(cond, dim=-1) - torch.log_softmax(uncond, dim=-1)
    shifted = cond + (torch.as_tensor(scale, dtype=cond.dtype) - 1).reshape(-1, 1) * gain
    return torch.where(torch.isfinite(gain), shifted, cond)


class RowGuidance(UnbatchedClassifierFreeGuidanceLogitsProcessor):
    """transformers' guidance processor (its own KV cache for the scene without its
    opening: one more one-token forward a step, for the whole batch) with one scale per
    row (1: that row untouched)."""

    def __init__(self, scales: Sequence[float], model, lead_ids: Sequence[int]):
        lead = torch.tensor([list(lead_ids)] * len(scales), dtype=torch.long, device=model.device)
        super().__init__(1.0, model, unconditional_ids=lead)
        self.scales = torch.tensor(scales, dtype=torch.float32)

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        uncond = self.get_unconditional_logits(input_ids)[:, -1].to(scores)
        return guide(scores, uncond, self.scales.to(scores.device))
