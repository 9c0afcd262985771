"""Contrast with an anonymous speaker (the `voice` setting): a line sounds like who says it.

Readers score every writer low on character voice: Jerry, George, Elaine and Kramer say
interchangeable lines. Inside a line of speaker S, the next token is drawn from

    logits(x | scene, "S:") + v * [log p(x | scene, "S:") - log p(x | scene, "A:")]

where A is the show's commonest walk-on, MAN (for a line of MAN himself, the scene's last
other speaker): what S would say and an anonymous man in the same scene would not is
favoured. (Until the twenty-first session A was the scene's other speaker, who shares the
topic: readers preferred MAN.) A guidance of the speaker tag, the way
sitcom.decoding.guidance guides on the opening. On llama.cpp the row gets a third
sequence: once a line's tag is written, it catches up with the row's lines so far, reads `A:`
instead of the tag, then every token the row writes; at the line's end it drops that line
(sitcom.decoding.batcher). On transformers, RowVoice runs A's version of the scene through
the model at every step inside a line (no cache: a fallback, slower).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch
from transformers import LogitsProcessor

from sitcom.decoding.vocab import tag_after_newline, vocab_info
from sitcom.scenes.script import MAIN_CHARACTERS, SPEAKER_PATTERN

TAG_RE = re.compile(rf"^(?P<speaker>{SPEAKER_PATTERN}):$")


def tag_of(line_so_far: str) -> str | None:
    """The speaker when `line_so_far` is exactly a finished tag (`GEORGE:`), else None."""
    m = TAG_RE.match(line_so_far)
    return m.group("speaker") if m else None


WALK_ON = "MAN"  # the show's commonest unnamed speaker (120 lines of the train split)


def contrast_speaker(lines: Sequence[str], speaker: str) -> str:
    """Whom a line of `speaker` is read against: MAN, an anonymous man in the same scene,
    so the gain is what makes the line this character's, not what makes it this scene's;
    for MAN's own lines, the scene's last other speaker (other_speaker).

    Blind readers preferred it to contrasting with the scene's other speaker (who shares the
    topic, so the contrast pushed lines off it): 128/216 pairs over six sets, coherence
    2.01 against 1.77 (training/EXPERIMENTS.md, twenty-first session)."""
    return WALK_ON if speaker != WALK_ON else other_speaker(lines, speaker)


def other_speaker(lines: Sequence[str], speaker: str, main: Sequence[str] = MAIN_CHARACTERS) -> str:
    """The last speaker of `lines` who is not `speaker`; else the first main character who
    is not."""
    for line in reversed(lines):
        name, colon, _ = line.partition(":")
        if colon and name.strip() and name.strip() != speaker and name.strip().isupper():
            return name.strip()
    return next(m for m in main if m != speaker)


def tag_ids(tokenizer, name: str) -> list[int]:
    """`NAME:` as the tokenizer spells it at the start of a line (after a newline)."""
    return tag_after_newline(tokenizer, name) or tokenizer.encode(
        f"{name}:", add_special_tokens=False
    )


def name_ids(tokenizer, names: Sequence[str]) -> torch.Tensor:
    """Token ids that spell `names` as tags or as a word in speech (`GEORGE`, ` George`)."""
    ids: set[int] = set()
    for name in names:
        for text in (f"{name}:", f" {name}", f" {name.title()}", f"{name.title()}"):
            ids.update(tokenizer.encode(text, add_special_tokens=False))
    return torch.tensor(sorted(ids), dtype=torch.long)


def voice(
    scores: torch.Tensor,
    cond: torch.Tensor,
    other: torch.Tensor,
    weight: float,
    names: torch.Tensor | None = None,
) -> torch.Tensor:
    """`scores` (the row's logits, guided or not) shifted by weight x the speaker's
    log-probability gain over the other speaker (cond: with the line's own tag, other: with
    the other's); tokens either side rules out keep their score, and so do `names` (the two
    speakers' names: one calls the other by name, never himself, and that is not a voice)."""
    gain = torch.log_softmax(cond, dim=-1) - torch.log_softmax(other, dim=-1)
    gain = torch.where(torch.isfinite(gain), gain, torch.zeros_like(gain))
    if names is not None and len(names):
        gain[..., names] = 0
    return scores + weight * gain


_TAG_TOKENS = 16  # a line whose first 16 tokens hold no tag has none (the batcher's limit)


def voiced_line(tokenizer, line: Sequence[int]) -> tuple[str, int] | None:
    """(speaker, tokens of its tag) when the tokens of a line so far start with a finished
    tag, else None."""
    for k in range(1, min(len(line), _TAG_TOKENS) + 1):
        speaker = tag_of(tokenizer.decode(line[:k]))
        if speaker is not None:
            return speaker, k
    return None


class Raw(LogitsProcessor):
    """Keeps the model's own logits of the step (before guidance) for RowVoice."""

    scores: torch.Tensor | None = None

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        self.scores = scores
        return scores


class RowVoice(LogitsProcessor):
    """The voice contrast on transformers, one weight per row (0: that row untouched): for
    a row inside a line after its tag, the same scene with the contrast speaker's tag goes
    through `model` (whole, no cache), and `voice` shifts the row's scores by the gain of
    the model's own logits (`raw`, kept before guidance) over it."""

    def __init__(self, weights: Sequence[float], model, tokenizer, plan, raw: Raw):
        self.weights = list(weights)
        self.model, self.tokenizer, self.raw = model, tokenizer, raw
        self.row_ids = [list(ids) for ids in plan.row_ids]  # each prompt, unpadded
        self.prompt_texts = list(plan.prompt_texts)
        self.prompt_len = plan.prompt_len  # padded: where every row's new tokens start
        self.line_ends = vocab_info(tokenizer).line_end_ids
        self._names: dict[tuple[str, str], torch.Tensor] = {}  # per pair, not per step

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        out = scores.clone()
        for row, weight in enumerate(self.weights):
            if weight <= 0:
                continue
            new = input_ids[row, self.prompt_len :].tolist()
            ends = [i for i, t in enumerate(new) if t in self.line_ends]
            start = ends[-1] + 1 if ends else 0
            found = voiced_line(self.tokenizer, new[start:])
            if found is None:  # writing a tag, or a line with none
                continue
            speaker, k = found
            before = self.tokenizer.decode(new[:start])
            other = contrast_speaker((self.prompt_texts[row] + before).splitlines(), speaker)
            alt = (
                self.row_ids[row] + new[:start] + tag_ids(self.tokenizer, other) + new[start + k :]
            )
            ids = torch.tensor([alt], device=self.model.device)
            other_logits = self.model(ids).logits[:, -1].to(scores)  # positional, as guidance
            names = self._names.get((speaker, other))
            if names is None:
                names = self._names[speaker, other] = name_ids(self.tokenizer, [speaker, other])
            raw = self.raw.scores[row : row + 1]
            out[row : row + 1] = voice(scores[row : row + 1], raw, other_logits, weight, names)
        return out
