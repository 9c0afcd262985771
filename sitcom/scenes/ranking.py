"""Best of n: rank candidate scenes written for one opening and pick the one to post.

A candidate's score is its coherence (cheap checks on the script, in [0, 1]) plus how funny
a humour model finds its lines (`sitcom.scenes.humour`, P(laugh) per line; optional). The checks
are the failures blind readers named in today's scenes: the opening's characters never
answer, one speaker talks to himself, invented strangers (AUDIENCE, BABY) take over, prose
paragraphs instead of turns, filler loops ("Okay." "Yeah."), repeated lines, scenes that
stop after a line or two.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Protocol

from sitcom.scenes.script import KNOWN_SPEAKERS, MAIN_CHARACTERS, is_well_formed, speaker_of

FILLER = frozenset(
    {
        "ok",
        "okay",
        "yeah",
        "yes",
        "no",
        "what",
        "oh",
        "uh",
        "um",
        "hmm",
        "well",
        "right",
        "sure",
        "huh",
        "hey",
        "hi",
        "so",
        "really",
        "yep",
        "nope",
        "alright",
        "all right",
        "ah",
    }
)
# Speakers a reader takes for noise rather than characters.
_NOISE_SPEAKERS = frozenset({"AUDIENCE", "BABY", "ALL", "EVERYONE", "CROWD", "VOICE", "NARRATOR"})
_WORD_RE = re.compile(r"[a-z']+")
_LONG_TURN_CHARS = 280  # a turn longer than this reads as prose
_MIN_TURNS = 5  # a scene of fewer generated turns has no room for a beat


class LineScorer(Protocol):
    """Anything that gives each script line a P(laugh) given the lines before it."""

    def line_scores(self, lines: list[str]) -> list[float]: ...


@dataclass(frozen=True)
class Ranked:
    index: int  # position among the candidates as given
    total: float
    coherence: float
    humour: float
    problems: tuple[str, ...]


def cast_of_prompt(prompt_lines: Sequence[str], main: Iterable[str] = MAIN_CHARACTERS) -> set[str]:
    """Characters the opening brings in: its speakers and main characters it names."""
    cast = {s.upper() for s in map(speaker_of, prompt_lines) if s}
    text = " ".join(prompt_lines).upper()
    cast |= {name for name in main if re.search(rf"\b{re.escape(name)}\b", text)}
    return cast


def coherence(
    lines: Sequence[str], prompt_count: int, known: Iterable[str] = KNOWN_SPEAKERS
) -> tuple[float, tuple[str, ...]]:
    """A score in [0, 1] (1: no problem found) and the problems found, for the lines after
    the first `prompt_count` (the user's opening)."""
    prompt = [x for x in lines[:prompt_count] if x.strip()]
    body = [x.strip() for x in lines[prompt_count:] if x.strip()]
    turns = [(speaker_of(x), x) for x in body]
    turns = [(s.upper(), x) for s, x in turns if s]
    if len(turns) < 2:
        return 0.0, ("no scene",)
    penalties: dict[str, float] = {}
    if len(turns) < _MIN_TURNS:
        penalties["short"] = 0.3 * (_MIN_TURNS - len(turns)) / _MIN_TURNS
    cast = cast_of_prompt(prompt)
    speakers = [s for s, _ in turns]
    missing = [c for c in cast if c not in speakers and c in MAIN_CHARACTERS]
    if missing:
        penalties["opening's characters silent"] = 0.25 * len(missing) / max(1, len(cast))
    allowed = {k.upper() for k in known} | cast
    strangers = sum(
        1
        for s in speakers
        if s in _NOISE_SPEAKERS or not all(p.strip() in allowed for p in re.split(r" AND |, ", s))
    )
    if strangers:
        penalties["invented strangers"] = 0.5 * strangers / len(turns)
    same = sum(a == b for a, b in zip(speakers, speakers[1:], strict=False))
    if same:
        penalties["talks to himself"] = 0.4 * same / (len(speakers) - 1)
    top = max(Counter(speakers).values()) / len(speakers)
    if top > 0.6 and len(speakers) >= 4:
        penalties["monologue"] = top - 0.6
    prose = sum(not is_well_formed(x) for x in body) + sum(
        len(x) > _LONG_TURN_CHARS for _, x in turns
    )
    if prose:
        penalties["prose"] = 0.5 * min(1.0, prose / len(body))
    filler = sum(_is_filler(x.split(":", 1)[1]) for _, x in turns)
    if filler / len(turns) > 0.25:
        penalties["filler"] = filler / len(turns) - 0.25
    seen: set[str] = set()
    repeats = 0
    for _, x in turns:
        key = " ".join(_WORD_RE.findall(x.split(":", 1)[1].lower()))
        repeats += key in seen and len(key) > 0
        seen.add(key)
    if repeats:
        penalties["repeats"] = 0.5 * repeats / len(turns)
    echoes = _echoes([x.split(":", 1)[1] for _, x in turns])
    if echoes:
        penalties["echoes"] = 0.6 * echoes / len(turns)
    score = max(0.0, 1.0 - sum(penalties.values()))
    return score, tuple(sorted(penalties, key=penalties.get, reverse=True))


def _echoes(speeches: Sequence[str], window: int = 3, share: float = 0.7) -> int:
    """Turns that mostly say again what one of the last few said ("I can't go." "You can't
    go?" "I can't go, I don't have a place to go."): the scene stands still."""
    bags = [set(_WORD_RE.findall(s.lower())) for s in speeches]
    count = 0
    for i, words in enumerate(bags):
        if len(words) >= 3 and any(
            len(words & earlier) >= share * len(words) for earlier in bags[max(0, i - window) : i]
        ):
            count += 1
    return count


def _is_filler(speech: str) -> bool:
    words = _WORD_RE.findall(speech.lower())
    return len(words) <= 3 and all(w in FILLER for w in words)


def humour_score(lines: Sequence[str], prompt_count: int, scorer: LineScorer | None) -> float:
    """Mean P(laugh) of the generated turns, averaged with the mean of the best three:
    a scene needs a few lines that land, not one and not only filler."""
    if scorer is None:
        return 0.0
    probs = scorer.line_scores(list(lines))
    gen = [
        p
        for line, p in zip(lines[prompt_count:], probs[prompt_count:], strict=False)
        if speaker_of(line.strip())
    ]
    if not gen:
        return 0.0
    best = sorted(gen, reverse=True)[:3]
    return 0.5 * sum(gen) / len(gen) + 0.5 * sum(best) / len(best)


def rank(
    candidates: Sequence[Sequence[str]],
    prompt_count: int,
    scorer: LineScorer | None = None,
    *,
    humour_weight: float = 1.0,
) -> list[Ranked]:
    """Candidates (each the full scene's lines, the opening first) best first. Ties keep
    the given order, so with nothing to choose between them the first one is posted."""
    out = []
    for i, lines in enumerate(candidates):
        coh, problems = coherence(lines, prompt_count)
        fun = humour_score(lines, prompt_count, scorer)
        out.append(Ranked(i, coh + humour_weight * fun, coh, fun, problems))
    return sorted(out, key=lambda r: (-r.total, r.index))
