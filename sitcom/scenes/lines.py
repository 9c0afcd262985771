"""Script line text: when two lines are "the same", and raw model text -> clean script lines."""

from __future__ import annotations

import re

from sitcom.scenes.script import is_well_formed, normalize_prompt

_SPEAKER_PREFIX_RE = re.compile(r"^\s*[A-Za-z][A-Za-z0-9.'#&\- ]{0,40}?:\s*")
_PARENS_RE = re.compile(r"\([^)]*\)?")
_NON_WORD_RE = re.compile(r"[\W_]+")


def line_key(line: str) -> str:
    """What makes two lines 'the same': the speech without speaker or parentheticals,
    lowercased, punctuation-free. A pure stage direction is compared by its own text."""
    rest = _SPEAKER_PREFIX_RE.sub("", line, count=1)
    speech = _NON_WORD_RE.sub(" ", _PARENS_RE.sub(" ", rest)).strip().lower()
    return speech or _NON_WORD_RE.sub(" ", rest).strip().lower()


_JUNK_RE = re.compile(r"[\x00-\x1f\x7f-\x9f\ufffd]")


def _is_garbage(line: str) -> bool:
    """Byte soup from a confused model: few letters among the visible characters."""
    visible = line.replace(" ", "")
    letters = sum(c.isalpha() for c in visible)
    return letters < 2 or letters < 0.6 * len(visible)


def _repair(line: str) -> str:
    """`Jerry: hi` -> `JERRY: hi`; other lines unchanged."""
    return normalize_prompt(line).strip() if ":" in line else line


def clean_lines(prompt_text: str, generated: str, complete: bool) -> list[str]:
    """Prompt lines + the generated ones as clean script lines.

    `complete` says the generated text ended at end-of-text, so its last line is whole;
    otherwise the trailing partial line is dropped. Generation past a new scene heading,
    empty/garbage lines and repeats of earlier lines are dropped; when any generated line
    is well-formed, only well-formed lines are kept.
    """
    out = [line for line in prompt_text.splitlines() if line.strip()]
    keys = {line_key(line) for line in out}
    if not complete:
        generated = generated.rsplit("\n", 1)[0] if "\n" in generated else ""
    candidates = []
    for raw in generated.split("\n"):
        line = " ".join(_JUNK_RE.sub("", " ".join(raw.split())).split())
        if not line:
            continue
        if line.startswith("["):  # a new scene heading: this scene is over
            break
        line = _repair(line)
        if _is_garbage(line):
            continue
        key = line_key(line)
        if key in keys:
            continue
        keys.add(key)
        candidates.append(line)
    well_formed = [line for line in candidates if is_well_formed(line)]
    return out + (well_formed or candidates)


def has_heading(generated: str) -> bool:
    """Whether generated text started a new `[Scene: ...]` heading (the scene is over)."""
    return any(line.lstrip().startswith("[") for line in generated.split("\n"))


def finished_lines(generated: str) -> int:
    """How many whole (newline-ended), non-blank lines generated text holds."""
    return sum(1 for line in generated.split("\n")[:-1] if line.strip())
