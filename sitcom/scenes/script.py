"""The script format every part agrees on: corpus, training evaluation and the bot.

A clean episode is a sequence of lines, each one of:

    [Scene: Jerry's apartment]        scene heading
    (Kramer bursts in)                stage direction on its own line
    JERRY: Hello, Newman.             a turn: UPPERCASE speaker, colon, speech

Episodes in train.txt / val.txt are separated by END_OF_TEXT on its own line.
"""

from __future__ import annotations

import difflib
import re
import unicodedata
from collections.abc import Iterable

END_OF_TEXT = "<|endoftext|>"

# Default cast for the Seinfeld corpus; other shows pass their own list.
MAIN_CHARACTERS: tuple[str, ...] = ("JERRY", "GEORGE", "ELAINE", "KRAMER")
KNOWN_SPEAKERS: tuple[str, ...] = MAIN_CHARACTERS + (
    "NEWMAN",
    "FRANK",
    "ESTELLE",
    "MORTY",
    "HELEN",
    "PUDDY",
    "SUSAN",
    "UNCLE LEO",
    "PETERMAN",
    "STEINBRENNER",
    "WILHELM",
    "LIPPMAN",
    "JACK",
    "MICKEY",
    "BANIA",
)

# A speaker: starts with a letter, up to ~5 words of letters/digits/.'#&,- (MAN #1, DR. REESE,
# `JERRY, GEORGE AND ELAINE`).
SPEAKER_PATTERN = r"[A-Z][A-Z0-9.'#&,\- ]{0,40}?"
TURN_RE = re.compile(rf"^(?P<speaker>{SPEAKER_PATTERN}): (?P<speech>\S.*)$")
HEADING_RE = re.compile(r"^\[Scene: (?P<place>[^\]]+)\]$")
DIRECTION_RE = re.compile(r"^\((?P<text>[^()]*(?:\([^()]*\)[^()]*)*)\)$")


def is_turn(line: str) -> bool:
    return TURN_RE.match(line) is not None


def is_heading(line: str) -> bool:
    return HEADING_RE.match(line) is not None


def is_direction(line: str) -> bool:
    return DIRECTION_RE.match(line) is not None


def is_well_formed(line: str) -> bool:
    """A non-empty line in the corpus format."""
    return is_turn(line) or is_heading(line) or is_direction(line)


def speaker_of(line: str) -> str | None:
    m = TURN_RE.match(line)
    return m.group("speaker") if m else None


def normalize_speaker(name: str, main: Iterable[str] = MAIN_CHARACTERS) -> str:
    """`Jerry `, `jerry`, `KRMAER`, `Jerry and Elaine` -> `JERRY`, `KRAMER`, `JERRY AND ELAINE`.

    Typos are repaired only against the main cast (one edit-ish away), so a guest whose
    name merely looks similar keeps it.
    """
    main = tuple(m.upper() for m in main)
    name = re.sub(r"\s+", " ", name.strip().rstrip(":").strip()).upper()
    parts = re.split(r"( AND | & |, | / )", name)
    fixed = []
    for part in parts:
        if part in (" AND ", " & ", ", ", " / "):
            fixed.append(" AND " if part.strip() in ("AND", "&", "/") else ", ")
            continue
        if part and part not in main and len(part) >= 4 and " " not in part:
            close = difflib.get_close_matches(part, main, n=1, cutoff=0.7)
            if close and sorted(close[0]) == sorted(part) or close and _one_edit(part, close[0]):
                part = close[0]
        fixed.append(part)
    return "".join(fixed)


def _one_edit(a: str, b: str) -> bool:
    """True when a and b differ by one insertion, deletion, substitution or swap."""
    if abs(len(a) - len(b)) > 1:
        return False
    sm = difflib.SequenceMatcher(None, a, b)
    edits = sum(max(i2 - i1, j2 - j1) for op, i1, i2, j1, j2 in sm.get_opcodes() if op != "equal")
    return edits <= 2 and len(a) >= 4


_PROMPT_SPEAKER_RE = re.compile(
    r"^\s*(?P<speaker>[A-Za-z][A-Za-z0-9.'#&\- ]{0,40}?)\s*:\s*(?P<speech>.*)$"
)
# An emoji code before a speaker: Discord's custom `<:party:123…>` or Slack's `:tada:`.
_EMOJI_CODE_RE = re.compile(r"<a?:\w{2,32}:\d{5,25}>|:[a-z0-9_+'\-]{1,40}:")


def _after_emoji(line: str) -> str:
    """`line` without the emoji (and their joiners, variation selectors, skin tones) it
    starts with: `🎉Kramer: hi` -> `Kramer: hi`."""
    i = 0
    while i < len(line):
        code = _EMOJI_CODE_RE.match(line, i)
        if code:
            i = code.end()
        elif line[i].isspace() or unicodedata.category(line[i]) in ("So", "Sk", "Mn", "Cf"):
            i += 1
        else:
            break
    return line[i:]


def normalize_prompt(prompt: str, main: Iterable[str] = MAIN_CHARACTERS) -> str:
    """The user's scene opening in corpus format: `Elaine: hi` -> `ELAINE: hi`.

    Each line of the prompt (split wherever str.splitlines splits) that starts with
    `Name:` (after any emoji: `🎉Kramer: hi` -> `KRAMER: hi`) gets its speaker normalised;
    other lines are kept as they are. Returns the text with a trailing newline.
    """
    out = []
    for raw in prompt.splitlines():  # \r\n, \r, U+2028/U+2029 and the like are breaks too
        line = raw.strip()
        if not line:
            continue
        m = _PROMPT_SPEAKER_RE.match(line) or _PROMPT_SPEAKER_RE.match(_after_emoji(line))
        if m and m.group("speech").strip():
            line = f"{normalize_speaker(m.group('speaker'), main)}: {m.group('speech').strip()}"
        out.append(line)
    return "\n".join(out) + "\n"
