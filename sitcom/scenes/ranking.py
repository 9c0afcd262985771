"""Best of n: rank candidate scenes written for one opening and pick the one to post.

A candidate's score is its coherence (cheap checks on the script, in [0, 1]) plus how funny
a humour model finds its lines (`sitcom.scenes.humour`, P(laugh) per line; optional). The checks
are the failures blind readers named in today's scenes: the opening's characters never
answer, one speaker talks to himself, invented strangers (AUDIENCE, BABY) take over, prose
paragraphs instead of turns, filler loops ("Okay." "Yeah."), repeated lines, scenes that
stop after a line or two; and, from the second round of blind reading, what readers
rewarded most: lines that keep to the opening's situation (its people, places, objects), and
a scene that ends cleanly rather than running on into a loop. So each candidate is first
trimmed (`keep_lines`): it ends before the first turn that derails it (a speaker who names
himself or claims another's name, a phrase looping inside a turn, a repeated line, a run of
filler, an invented stranger, prose), and the trimmed scene is what is scored and posted.
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
_MIN_TURNS = 4  # a scene of fewer generated turns has no room for a beat
_MIN_KEPT = 2  # trimming never leaves fewer generated turns than this
_PREMISE_TURNS = 4  # the first turns after the opening should keep to its situation
# Words too common to tell one situation from another (the premise check skips them).
STOPWORDS = frozenset(
    """
    about above after again against all also and any are aren't because been before being
    below between both but can can't cannot could couldn't did didn't does doesn't doing don't
    down during each few for from further had hadn't has hasn't have haven't having he'd he'll
    he's her here here's hers herself him himself his how how's i'd i'll i'm i've into isn't
    it's its itself just let's like me more most mustn't my myself nor not now of off on once
    only other ought our ours ourselves out over own same shan't she she'd she'll she's should
    shouldn't some such than that that's the their theirs them themselves then there there's
    these they they'd they'll they're they've this those through too under until very was
    wasn't we'd we'll we're we've were weren't what what's when when's where where's which
    while who who's whom why why's will with won't would wouldn't you you'd you'll you're
    you've your yours yourself yourselves gonna wanna gotta know think going want tell
    said says okay yeah well right really something anything nothing thing things good
    look come came just mean maybe even still back get got make made take took give gave
    time little much many every never always one two three listen guys hello please
    sorry thanks people great sure fine believe talk talking saying call wait hear need feel
    kind sort stuff hell god
    """.split()
)


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
    keep: int  # lines of the candidate to post (keep_lines): the opening and its good part


def cast_of_prompt(prompt_lines: Sequence[str], main: Iterable[str] = MAIN_CHARACTERS) -> set[str]:
    """Characters the opening brings in: its speakers and main characters it names."""
    cast = {s.upper() for s in map(speaker_of, prompt_lines) if s}
    text = " ".join(prompt_lines).upper()
    cast |= {name for name in main if re.search(rf"\b{re.escape(name)}\b", text)}
    return cast


def premise_words(prompt_lines: Sequence[str]) -> set[str]:
    """The opening's situation as words: its content words (4+ letters, not STOPWORDS, not
    the four main characters' names, which every scene mentions), lower case."""
    words: set[str] = set()
    for line in prompt_lines:
        speech = line.split(":", 1)[1] if speaker_of(line) else line
        words |= {w for w in _WORD_RE.findall(speech.lower()) if _content(w)}
    return words - {name.lower() for name in MAIN_CHARACTERS}


def _content(word: str) -> bool:
    word = word.strip("'")
    return len(word) >= 4 and word not in STOPWORDS and not word.endswith("n't")


def on_premise(body_speeches: Sequence[str], premise: set[str]) -> float:
    """Share of the first few generated turns that keep to the opening's situation: each
    names one of its content words (or a word stem of one: "steal" for "stealing"). 1.0
    when the opening has nothing specific to keep to."""
    if not premise:
        return 1.0
    stems = {w[:5] for w in premise if len(w) >= 5}
    first = body_speeches[:_PREMISE_TURNS]
    if not first:
        return 0.0
    hits = 0
    for speech in first:
        words = {w for w in _WORD_RE.findall(speech.lower()) if _content(w)}
        hits += bool(words & premise) or any(w[:5] in stems for w in words if len(w) >= 5)
    return hits / len(first)


def derails(speaker: str, speech: str) -> str | None:
    """Why one turn derails a scene, or None: a speaker addressing or naming himself
    ("JERRY: Jerry, listen", "JERRY: (to Jerry)"), claiming another character's name
    ("KRAMER: My name is Elaine"), or a phrase looping inside the turn ("hey hey hey")."""
    name = speaker.split()[0].capitalize() if speaker else ""
    low = speech.lower()
    if name and len(name) > 2:
        n = re.escape(name.lower())
        if re.search(rf"\(to {n}\b|^\s*{n}\s*[,!?]|,\s*{n}\s*[.!?]*$", low):
            return "talks to himself"
        claim = re.search(r"\b(?:my name is|i'm|i am|it's me,?)\s+([a-z]+)\b", low)
        if claim and claim.group(1).upper() in MAIN_CHARACTERS and claim.group(1) != name.lower():
            return "mixed-up names"
    if _loops(low):
        return "loops"
    return None


def _loops(speech: str, times: int = 3) -> bool:
    """A phrase of one to four words said `times` times in a row inside one turn."""
    words = _WORD_RE.findall(speech)
    for n in range(1, 5):
        for i in range(len(words) - times * n + 1):
            phrase = words[i : i + n]
            if all(words[i + k * n : i + (k + 1) * n] == phrase for k in range(1, times)):
                return True
    return False


def keep_lines(
    lines: Sequence[str], prompt_count: int, known: Iterable[str] = KNOWN_SPEAKERS
) -> int:
    """How many of `lines` (the opening first) to post: all of them, or up to the turn
    before the first that derails the scene (see the module docstring). Never fewer than
    _MIN_KEPT generated turns: a scene that derails at once is left whole, for the ranking
    to judge. Blank and non-speaker lines between kept turns stay."""
    prompt = [x for x in lines[:prompt_count] if x.strip()]
    allowed = {k.upper() for k in known} | cast_of_prompt(prompt)
    seen: set[str] = set()
    kept_turns = 0
    filler_run = 0
    for i in range(prompt_count, len(lines)):
        line = lines[i].strip()
        if not line:
            continue
        speaker = speaker_of(line)
        why = None
        if not speaker or not is_well_formed(line) or len(line) > _LONG_TURN_CHARS:
            why = "prose"
        else:
            who = speaker.upper()
            speech = line.split(":", 1)[1]
            key = " ".join(_WORD_RE.findall(speech.lower()))
            filler_run = filler_run + 1 if _is_filler(speech) else 0
            if who in _NOISE_SPEAKERS or not all(
                p.strip() in allowed for p in re.split(r" AND |, ", who)
            ):
                why = "stranger"
            elif key and key in seen:
                why = "repeat"
            elif filler_run >= 2:
                why = "filler"
            else:
                why = derails(who, speech)
            seen.add(key)
        if why is not None:
            if kept_turns < _MIN_KEPT:
                return len(lines)
            end = i
            while end > prompt_count and not lines[end - 1].strip():
                end -= 1
            if why == "filler":  # the first filler turn of the run goes too
                end -= 1
            return end
        kept_turns += 1
    return len(lines)


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
    speeches = [x.split(":", 1)[1] for _, x in turns]
    echoes = _echoes(speeches)
    if echoes:
        penalties["echoes"] = 0.6 * echoes / len(turns)
    derailed = sum(derails(s, x) is not None for s, x in zip(speakers, speeches, strict=True))
    if derailed:
        penalties["mixed-up or looping turns"] = 0.5 * derailed / len(turns)
    kept = on_premise(speeches, premise_words(prompt))
    if kept < 0.5:
        penalties["drops the opening"] = 0.4 * (0.5 - kept) / 0.5
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
    humour_weight: float = 0.5,  # readers agreed best at 0.5 (training/EXPERIMENTS.md)
) -> list[Ranked]:
    """Candidates (each the full scene's lines, the opening first) best first, each scored
    as trimmed by keep_lines (Ranked.keep). Ties keep the given order, so with nothing to
    choose between them the first one is posted."""
    out = []
    for i, whole in enumerate(candidates):
        keep = keep_lines(whole, prompt_count)
        lines = list(whole[:keep])
        coh, problems = coherence(lines, prompt_count)
        fun = humour_score(lines, prompt_count, scorer)
        out.append(Ranked(i, coh + humour_weight * fun, coh, fun, problems, keep))
    return sorted(out, key=lambda r: (-r.total, r.index))


def best_next_line(
    candidates: Sequence[Sequence[str]],
    prompt_count: int,
    scorer: LineScorer | None = None,
    *,
    humour_weight: float = 0.5,
) -> int:
    """Choosing line by line: candidates are one scene's lines so far, alike but for their
    last line; the index of the one whose last line is best: the scene's coherence with it
    (untrimmed: a line that derails must lose) plus the line's own P(laugh). Ties keep the
    given order."""
    scores = []
    for lines in candidates:
        coh, _ = coherence(lines, prompt_count)
        fun = 0.0
        if scorer is not None and len(lines) > prompt_count and speaker_of(lines[-1].strip()):
            fun = scorer.line_scores(list(lines))[-1]
        scores.append(coh + humour_weight * fun)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))
