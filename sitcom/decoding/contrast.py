"""Contrast with the untuned base (the `contrast` setting): more of what the fine-tune adds.

A scene's next token is drawn from

    logits + beta * [log p_tuned(x | context) - log p_base(x | context)]

over the tokens the tuned model finds plausible, p_tuned(x) >= ALPHA * max p_tuned, and
never from the rest (Li et al., 2023, "Contrastive decoding"; the amateur here is the base
the writer was fine-tuned from, so the contrast is what fine-tuning on the show taught it).
Without the plausibility cut the contrast favours tokens both models find unlikely; with
it, it only reorders the tuned model's own candidates. It runs after guidance and the
guards and just before sampling: it contrasts the logits sampling would have seen (guided,
penalised for repeats) with the base's raw ones, so it strengthens those steers too; that
is the form readers judged.

The base reads exactly the rows' contexts: llama.cpp as a second model with the same KV
slots (sitcom.decoding.batcher), transformers as a second model with its own cache
(ModelSource). Off by default: at beta 0.5 readers tied it with the default (55 of 108
blind pairs over three sets) and a scene took 2.4x as long (training/EXPERIMENTS.md,
thirteenth session).
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence

import torch

ALPHA = 0.1  # the plausibility cut: tokens under 0.1 x the likeliest token's probability go


def contrast(scores: torch.Tensor, base: torch.Tensor, beta: float | torch.Tensor) -> torch.Tensor:
    """scores [rows, vocab] shifted by beta x (log p_scores - log p_base) on the plausible
    tokens, -inf elsewhere; beta 0 leaves a row untouched. Tokens the base rules out
    (-inf) keep their own score when plausible."""
    beta = torch.as_tensor(beta, dtype=torch.float32).reshape(-1, 1)
    logp = torch.log_softmax(scores.float(), dim=-1)
    gain = logp - torch.log_softmax(base.float(), dim=-1)
    shifted = scores.float() + beta * torch.where(torch.isfinite(gain), gain, 0.0)
    plausible = logp >= logp.max(dim=-1, keepdim=True).values + math.log(ALPHA)
    out = torch.where(plausible, shifted, float("-inf"))
    return torch.where(beta > 0, out, scores.float()).to(scores.dtype)


class Contrast:
    """The logits processor: `source(input_ids)` gives the base's logits for the rows
    ([rows, vocab]); the backend sets it before decoding starts."""

    def __init__(self, betas: Sequence[float]):
        self.betas = torch.tensor(list(betas), dtype=torch.float32)
        self.source: Callable[[torch.Tensor], torch.Tensor] | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        if self.source is None:
            raise RuntimeError("contrast needs the base model's logits; none was given")
        base = self.source(input_ids).to(scores.device)
        if base.shape != scores.shape:
            shapes = f"{tuple(base.shape)}, not {tuple(scores.shape)}"
            raise RuntimeError(f"the base's logits are {shapes}")
        return contrast(scores, base, self.betas.to(scores.device))


class ModelSource:
    """transformers: the base model fed each step's new tokens with its own KV cache, the
    left-padded prompt masked as generate() masks it."""

    def __init__(self, model, prompt_mask: torch.Tensor):
        self.model = model
        self.mask = prompt_mask.long().to(model.device)
        self.cache = None
        self.seen = 0
        self.last = None  # each row's last position
        # transformers 5 renames past_key_values to cache (the old name warns, then goes)
        params = inspect.signature(model.forward).parameters
        self.kv_name = "cache" if "cache" in params else "past_key_values"

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        new = input_ids[:, self.seen :]
        if self.cache is None:
            pos = (self.mask.cumsum(-1) - 1).clamp(min=0)
        else:
            self.mask = torch.cat([self.mask, torch.ones_like(new)], dim=1)
            pos = self.last + torch.arange(1, new.shape[1] + 1, device=new.device)
        kv = {self.kv_name: self.cache}
        out = self.model(
            input_ids=new, attention_mask=self.mask, position_ids=pos, use_cache=True, **kv
        )
        self.cache = out[self.kv_name]
        self.seen, self.last = input_ids.shape[1], pos[:, -1:]
        return out.logits[:, -1].float()
