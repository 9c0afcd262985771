"""One raw transcript page -> clean episode lines in the `sitcom.scenes.script` format.

Pages come from many transcribers, so nothing here knows a layout by its file name: each
line is classified by shape (turn, name alone, heading, direction, junk, plain text), the
script body is the stretch between the first and last turn of a speaker who talks more
than once, and the page's own majority layout decides how ambiguous lines are read.
No library parses free-form sitcom transcripts, hence the hand-written rules.
"""

from __future__ import annotations

import re
import unicodedata
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, field

from sitcom.scenes.script import MAIN_CHARACTERS, normalize_speaker

# Typographic characters the transcribers mixed freely; one ASCII form keeps the vocabulary small.
_TRANSLATE = str.maketrans(
    {
        "\xa0": " ",
        "\t": " ",
        "\u2018": "'",
        "\u2019": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u2013": "-",
        "\u2014": "--",
        "\u2026": "...",
        "\u00b4": "'",
        "`": "'",
    }
)

# Words allowed in lowercase inside a speaker name ("Woman Behind Elaine", "Man of the house").
_NAME_CONNECTORS = {"and", "&", "of", "the", "de", "la", "van", "von", "der", "with", "in"}
_NAME_CHARS = r"[A-Za-z][A-Za-z0-9.'#&,/\- ]{0,40}?"
_COLON_TURN_RE = re.compile(
    rf"^(?P<speaker>{_NAME_CHARS})\s*(?P<aside>\([^)]*\)|\[[^\]]*\])?\s*:\s*(?P<speech>.*)$"
)
# A name alone on its line, the speech below it: `STAN`, `Jerry`, `JERRY (CONT'D)`.
_ALONE_NAME_RE = re.compile(
    r"^(?P<speaker>[A-Za-z][A-Za-z0-9.'#&\- ]{0,30}?)\s*(?P<aside>\([^)]*\))?$"
)
# Screenplay sluglines: `INT. HOSPITAL ROOM - DAY (1)`.
_SLUG_RE = re.compile(
    r"^(?:INT|EXT|INT\./EXT)\.?\s+(?P<place>.+?)(?:\s+-+\s+[A-Z ]+)?(?:\s*\(\d+\))?$"
)
# Description lines some transcribers mark with a leading symbol: `% Jerry's apartment...`.
_MARKED_DESCRIPTION_RE = re.compile(r"^[%#]\s*(?P<text>[A-Za-z\"'].*)$")
_SCENE_PREFIX_RE = re.compile(r"^(?:scene|setting|location|place|int\.|ext\.)\s*[:.-]?\s*", re.I)

_NUM = r"(?:one|two|three|four|five|i{1,3}|iv|v|\d+)"
# Lines that are never script: credits, cast lists, site furniture, act/commercial markers.
_JUNK_RES = [
    re.compile(p, re.I)
    for p in (
        r"copyright|\(c\) ?\d{4}|\u00a9|all rights reserved",
        r"https?://|www\.|\.com\b|@\w+\.\w+",
        r"^(?:written|directed|produced|created|transcribed|transcript|typed|teleplay|story|"
        r"adapted|edited|formatted|corrected)(?:\s+(?:and|&)\s+\w+)?\s+by\b",
        r"^(?:written|directed|teleplay|story|broadcast|aired|writers?|directors?)\s*:",
        r"^(?:original(?:ly)?\s+)?(?:air(?:ed)?|broadcast)(?:\s+date)?\s*:",
        r"^episode\s*(?:#|no\.?|number|\d)",
        r"^season\s+\d",
        r"(?:spell-?\s?checked|reformatted|formatted|converted|corrected|updated|transcribed|"
        r"transcript|typed)\s+"
        r"(?:and\s+\w+\s+)?by\b|^last updated|^return to\b",
        r"^\S[^:]{0,60}?\s?\.{4,}\s?\S",  # cast list with dotted leaders
        r"^[=\-_*~#+.|]{3,}$",
        r"^-{3,}.*-{3,}$",  # separators, `--- COMMERCIAL BREAK ---`
        rf"^[\[({{]?\s*(?:end\s+of\s+)?(?:act|part)\s+{_NUM}\b[^\])}}]*[\])}}]?\.?$",
        r"^[\[({]?\s*(?:commercial(?:\s+break)?|break|intermission)\.?\s*[\])}]?\.?$",
        r"^[\[(]?\s*(?:the\s+end|end|fade (?:in|out)|teaser|tag|cold open)\.?\s*[\])]?\.?$",
        r"^[\[(]?the end\b",
        r"^(?:cut|dissolve|fade|smash cut|angle|back|close|pan)\b[\w ]* (?:to|on):",
        r"^scene\s+[a-z0-9]{1,2}\.?$",
        r"^(?:guest\s+)?(?:cast|starring|guest starring|with|and|credits|production credits|"
        r"the cast|characters?|character\s+actor|regular cast|also starring)\s*:?$",
    )
]


@dataclass
class Episode:
    """The cleaned script of one page and what was found in it."""

    lines: list[str] = field(default_factory=list)
    speakers: Counter = field(default_factory=Counter)
    layout: str = "colon"

    @property
    def turns(self) -> int:
        return sum(self.speakers.values())


@dataclass
class _Item:
    kind: str  # turn | heading | direction | plain
    text: str = ""
    speaker: str = ""
    gap: bool = False  # a blank line came before it
    from_name: bool = False  # speaker was a name alone on its line


def normalize_text(text: str) -> str:
    """One ASCII-ish spelling of punctuation and spaces, CRLF -> LF."""
    text = text.replace("\r\n", "\n").replace("\r", "\n").translate(_TRANSLATE)
    return unicodedata.normalize("NFC", text)


def tidy(text: str) -> str:
    """Collapse runs of spaces and the `word , word .` spacing some transcribers used."""
    text = re.sub(r"\s+", " ", text).strip()
    return re.sub(r"(?<=\w) ([,.!?;:])(?=\s|$)", r"\1", text)


def is_junk(line: str) -> bool:
    return any(r.search(line) for r in _JUNK_RES)


def _ascii_name(name: str) -> str:
    name = unicodedata.normalize("NFKD", name).encode("ascii", "ignore").decode()
    name = re.sub(r"\.(?:\s*\.)+", ".", name)  # `Mr. . Steinbrenner`
    return re.sub(r"\s+", " ", name).strip(" .,-/")


def _valid_name(name: str, max_words: int = 5) -> bool:
    words = [w for w in re.split(r"[\s,/]+", name) if w]
    if not words or len([w for w in words if w.lower() not in _NAME_CONNECTORS]) > max_words:
        return False
    if any(w.endswith(".") and len(w) > 4 for w in words):  # `ALLISON. HI. UH--LISTEN:`
        return False
    return all(w.lower() in _NAME_CONNECTORS or not w[0].isalpha() or w[0].isupper() for w in words)


def _aside(text: str | None) -> str:
    return f"({text.strip()[1:-1].strip()})" if text else ""


def _brackets_to_parens(speech: str) -> str:
    # Inline actions were written in [ ] or ( ); the corpus uses ( ) inside speeches.
    return re.sub(r"\[([^\[\]]*)\]", r"(\1)", speech)


def _place(text: str) -> str:
    text = _SCENE_PREFIX_RE.sub("", text.strip()).strip(" .:-")
    text = text.replace("[", "(").replace("]", ")")
    if text.isupper():  # `JERRY'S APARTMENT` -> `Jerry's apartment`
        text = text.capitalize()
    return text[:1].upper() + text[1:]


def split_lines(text: str) -> list[tuple[str, bool]]:
    """Non-empty tidied lines, each with whether blank lines preceded it."""
    out: list[tuple[str, bool]] = []
    gap = True
    for raw in normalize_text(text).split("\n"):
        line = tidy(raw)
        if not line:
            gap = True
            continue
        out.append((line, gap))
        gap = False
    return out


def _join_open_brackets(lines: list[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """`[Scene: Pete's luncheonette. Jerry and ...` wrapped over lines -> one line."""
    out: list[tuple[str, bool]] = []
    i = 0
    while i < len(lines):
        line, gap = lines[i]
        pairs = {"[": "]", "(": ")"}
        opener = line[0]
        if opener in pairs and pairs[opener] not in line:
            for j in range(i + 1, min(i + 8, len(lines))):
                if pairs[opener] in lines[j][0]:
                    if lines[j][0].endswith(pairs[opener]):
                        line = " ".join(part for part, _ in lines[i : j + 1])
                        i = j
                    break
        out.append((line, gap))
        i += 1
    return out


def _looks_like_place(text: str) -> bool:
    """`Jerry's Apartment`, `Monk's`, `Yankee Stadium`: short, and no verb like `enters`."""
    words = text.rstrip(" .").split()
    if not words or len(words) > 6 or words[0][0].islower():
        return False
    # Third-person verbs (`enters`, `walks`) mark an action; possessives (`Jerry's`) do not.
    return not any(w.islower() and w.endswith("s") and not w.endswith("'s") for w in words[1:])


def classify(line: str) -> tuple[str, str, str]:
    """(kind, speaker, text) for one line; kind is turn/name/heading/direction/junk/plain."""
    if line[0] == "[" and line.endswith("]") and line.count("[") == 1:
        inner = line[1:-1].strip()
        if not inner or is_junk(inner):
            return "junk", "", ""
        if _SCENE_PREFIX_RE.match(inner) or _looks_like_place(inner):
            return "heading", "", _place(inner)
        # `[pause]`, `[Kramer enters with his golf clubs]`: an action, not a new scene,
        # so generation does not stop at it as a scene break.
        return "direction", "", inner
    if line[0] == "(" and line.endswith(")") and _balanced(line):
        inner = line[1:-1].strip()
        if not inner or is_junk(inner):
            return "junk", "", ""
        return "direction", "", inner
    if is_junk(line):
        return "junk", "", ""
    if m := _SLUG_RE.match(line):
        return "heading", "", _place(m.group("place"))
    if m := _MARKED_DESCRIPTION_RE.match(line):
        return "heading", "", _place(m.group("text"))
    m = _COLON_TURN_RE.match(line)
    if m and _valid_name(m.group("speaker")):
        speech = " ".join(p for p in (_aside(m.group("aside")), m.group("speech").strip()) if p)
        if speech:
            return "turn", m.group("speaker"), speech
        return "name", m.group("speaker"), ""
    m = _ALONE_NAME_RE.match(line)
    if m and _valid_name(m.group("speaker"), max_words=4) and not line.endswith("."):
        return "name", m.group("speaker"), _aside(m.group("aside"))
    return "plain", "", line


def _balanced(line: str) -> bool:
    depth = 0
    for i, ch in enumerate(line):
        depth += (ch == "(") - (ch == ")")
        if depth == 0 and i < len(line) - 1:
            return False
    return depth == 0


def _ends_sentence(text: str) -> bool:
    return bool(re.search(r"[.!?\"')\]*]$", text))


def parse_page(
    text: str,
    main_cast: Iterable[str] = MAIN_CHARACTERS,
    boilerplate: frozenset[str] = frozenset(),
    known_speakers: frozenset[str] = frozenset(),
) -> Episode:
    """Clean one page; pages without a script body come back with no lines.

    boilerplate: lines seen on many pages of the site (navigation, ads), dropped.
    known_speakers: upper-case names seen across the corpus; they let a page that writes
    `Jerry Hello.` with no colon at all be read.
    """
    main = tuple(main_cast)
    lines = [(line, gap) for line, gap in split_lines(text) if line not in boilerplate]
    lines = _join_open_brackets(lines)
    tokens = [(classify(line), gap) for line, gap in lines]

    # The page's own majority decides whether a bare name starts a speech or names a place.
    names = Counter(_ascii_name(spk).upper() for (kind, spk, _), _ in tokens if kind == "name")
    colon_turns = sum(1 for (kind, _, _), _ in tokens if kind == "turn")
    alone_turns = sum(n for n in names.values() if n >= 2)
    prefixed = [
        _prefixed_turn(body, known_speakers) if kind == "plain" else None
        for (kind, _, body), _ in tokens
    ]
    layout = max(
        (colon_turns, "colon"),
        (alone_turns, "alone"),
        (sum(p is not None for p in prefixed) // 2, "prefix"),
    )[1]
    if layout == "prefix":
        tokens = [
            (("turn", *p) if p else tok, gap)
            for (tok, gap), p in zip(tokens, prefixed, strict=True)
        ]
    alone = layout == "alone"

    items: list[_Item] = []
    for (kind, speaker, body), gap in tokens:
        if kind == "junk":
            continue
        if kind == "name":
            key = _ascii_name(speaker).upper()
            if alone and names[key] >= 2:
                items.append(_Item("turn", body, speaker, gap, from_name=True))
                continue
            if not alone and speaker.isupper() and len(speaker.split()) <= 6 and not body:
                items.append(_Item("heading", _place(speaker), "", gap))
                continue
            kind, body = "plain", (speaker + (" " + body if body else "")).strip()
        if (
            kind == "direction"
            and items
            and items[-1].kind == "turn"
            and items[-1].from_name
            and not items[-1].text
        ):
            items[-1].text = f"({body})"  # `JANE / (from the stall) / are you talking to me?`
            continue
        # Screenplay action paragraphs are written in capitals: never part of a speech.
        action = alone and body.isupper() and len(body.split()) >= 4
        if (
            kind == "plain"
            and items
            and _continues(items[-1], body, gap)
            and not (action and items[-1].kind == "turn")
        ):
            items[-1].text = f"{items[-1].text} {body}".strip()
            continue
        items.append(_Item("direction" if action else kind, body, speaker, gap))
    return _assemble(items, main, layout)


def _prefixed_turn(line: str, known: frozenset[str]) -> tuple[str, str] | None:
    """`Jerry I told you.` -> ("Jerry", "I told you.") when Jerry is a known speaker."""
    words = line.split(" ")
    for n in (3, 2, 1):
        if len(words) > n and " ".join(words[:n]).upper() in known and words[0][0].isupper():
            return " ".join(words[:n]), " ".join(words[n:])
    return None


def _continues(prev: _Item, line: str, gap: bool) -> bool:
    """Is a plain line the hard-wrapped rest of the previous item?"""
    if prev.kind == "turn" and (prev.from_name or not gap):
        return True
    if prev.kind in ("turn", "plain") and (not line[0].isupper() or not _ends_sentence(prev.text)):
        return True
    if prev.kind == "direction" and prev.text.isupper() and line.isupper():
        return True  # a capitals action paragraph wrapped over lines
    if prev.kind == "heading" and not gap and not _ends_sentence(prev.text):
        return True  # `% Jerry and George are sitting / outside.`
    return prev.kind == "plain" and not gap


def _cast_like(speech: str) -> bool:
    """`Megan Cole`: a cast-list entry read as a turn (only capitalised words)."""
    words = speech.split()
    return len(words) >= 2 and all(w[0].isupper() for w in words) and speech[-1] not in "!?"


def _body_start(items: list[_Item], strong: list[int]) -> int | None:
    """First recurring-speaker turn that opens real dialogue, not a cast list or notes."""
    for i in strong:
        it = items[i]
        following = items[i + 1 : i + 6]
        if _cast_like(it.text) or len(it.text) > 1500:
            continue
        if sum(f.kind == "turn" and not _cast_like(f.text) for f in following) >= 3:
            return i
    return strong[0] if strong else None


def _assemble(items: list[_Item], main: tuple[str, ...], layout: str) -> Episode:
    turns = [i for i, it in enumerate(items) if it.kind == "turn" and it.text]
    counts = Counter(_ascii_name(items[i].speaker).upper() for i in turns)
    # The body runs from the first to the last turn of a recurring speaker: credits,
    # cast lists and site furniture around it go, whatever their layout.
    strong = [i for i in turns if counts[_ascii_name(items[i].speaker).upper()] >= 2]
    episode = Episode(layout=layout)
    start = _body_start(items, strong)
    if start is None:
        return episode
    end = strong[-1]
    for _ in range(2):  # the scene heading and action just before the first line
        if start > 0 and items[start - 1].kind in ("heading", "direction"):
            start -= 1
    while end + 1 < len(items) and items[end + 1].kind in ("heading", "direction"):
        end += 1
    for it in items[start : end + 1]:
        if it.kind == "turn":
            speaker = normalize_speaker(_ascii_name(it.speaker), main)
            if it.text and speaker[:1].isalpha():
                speech = re.sub(r"\.{4,}", "...", _brackets_to_parens(it.text))
                episode.lines.append(f"{speaker}: {speech}")
                episode.speakers[speaker] += 1
        elif it.kind == "heading" and it.text:
            episode.lines.append(f"[Scene: {it.text.rstrip(' .')}]")
        elif it.text:
            episode.lines.append(_direction(it.text))
    return episode


def _direction(text: str) -> str:
    """Narration between turns -> one `(text)` line (nested brackets flattened)."""
    if text.startswith("(") and text.endswith(")") and _balanced(text):
        text = text[1:-1]
    text = re.sub(r"[()\[\]]", "", text).strip()
    return f"({text})"


def raw_speakers(text: str) -> Counter:
    """Speaker names as written (upper-cased), for deriving a show's main cast."""
    return parse_page(text, main_cast=()).speakers
