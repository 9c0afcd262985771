"""Cheap scores for generated scenes: does it look like a script, and does it loop?

Used by `training evaluate` and the benchmark so both judge scenes the same way.
Scores are shares in [0, 1]; a scene with no lines scores 0 everywhere (an empty
answer is a failure, not a perfect one).
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from sitcom.scenes.script import KNOWN_SPEAKERS, is_well_formed, speaker_of

_SPEAKER_JOIN_RE = re.compile(r" AND |, ")
_WORD_RE = re.compile(r"\w+(?:'\w+)?|[^\w\s]")


@dataclass(frozen=True)
class SceneScore:
    lines: int  # non-empty lines scored
    well_formed: float  # share of lines in the script format (turn, heading, direction)
    known_speaker: float  # share of turns whose speaker(s) are all known
    repeated: float  # share of lines that repeat an earlier line of the same scene
    distinct_2: float  # distinct word bigrams / all word bigrams
    top_speaker: float  # share of turns by the most talkative speaker (1.0: a monologue)

    def as_dict(self) -> dict[str, float]:
        return asdict(self)


def is_known_speaker(speaker: str, known: Iterable[str]) -> bool:
    """`JERRY AND ELAINE` is known when every named part is."""
    known_set = {k.upper() for k in known}
    return all(part.strip() in known_set for part in _SPEAKER_JOIN_RE.split(speaker.upper()))


def distinct_n(text: str, n: int = 2) -> float:
    words = _WORD_RE.findall(text.lower())
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return len(set(grams)) / len(grams) if grams else 0.0


def score_scene(
    lines: Sequence[str], known_speakers: Iterable[str] = KNOWN_SPEAKERS, skip: int = 0
) -> SceneScore:
    """Score one scene; `skip` leading lines (the user's prompt) are not the model's work."""
    body = [line.strip() for line in lines[skip:] if line.strip()]
    if not body:
        return SceneScore(0, 0.0, 0.0, 0.0, 0.0, 0.0)
    known = tuple(known_speakers)
    speakers = [s for s in map(speaker_of, body) if s is not None]
    seen: set[str] = set()
    repeats = 0
    for line in body:
        key = " ".join(line.lower().split())
        repeats += key in seen
        seen.add(key)
    return SceneScore(
        lines=len(body),
        well_formed=sum(map(is_well_formed, body)) / len(body),
        known_speaker=(
            sum(is_known_speaker(s, known) for s in speakers) / len(speakers) if speakers else 0.0
        ),
        repeated=repeats / len(body),
        distinct_2=distinct_n("\n".join(body), 2),
        top_speaker=(
            max(Counter(s.upper() for s in speakers).values()) / len(speakers) if speakers else 0.0
        ),
    )


def summarize(scores: Sequence[SceneScore]) -> dict[str, float]:
    """Mean of each score over scenes (lines: mean lines per scene)."""
    if not scores:
        return {k: 0.0 for k in SceneScore.__dataclass_fields__}
    return {
        k: sum(getattr(s, k) for s in scores) / len(scores) for k in SceneScore.__dataclass_fields__
    }
