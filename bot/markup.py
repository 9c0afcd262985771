"""Text helpers every platform shares (Discord, Slack, the console): control characters,
markdown that can impersonate, shortening. Platform markup stays in each frontend."""

from __future__ import annotations

import re

# Control characters and bidi overrides; newline and tab survive.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


# `[label](url)` (also `[label](<url>)`): a masked link whose label can lie about the target.
MASKED_LINK_RE = re.compile(r"\]\(")
# `# `, `## `, `### ` headers and `-# ` subtext: big or grey "system" text that can
# impersonate the bot or staff. Discord renders them at the start of a line, also inside
# block quotes (`> `, `>>> `) and list items (`- `, `* `, `1. `, nested), and its parser
# (JavaScript regexes) takes any Unicode space as the space after the marker (`#\u00a0x`)
# and \r, U+2028, U+2029 as line breaks, so all of those count here.
_SPACE = r"[^\S\n]|\ufeff"  # JavaScript's \s, less the newline
_LINE_START = r"(?<![^\n\r\x85\u2028\u2029])"  # the start, or right after any line break
HEADING_RE = re.compile(
    rf"{_LINE_START}((?:{_SPACE}|>|[-*+](?={_SPACE})|[0-9]{{1,9}}[.)](?={_SPACE}))*)"
    rf"(#{{1,3}}|-#)(?={_SPACE})"
)
ZWSP = "\u200b"


def neutralize_markdown(text: str) -> str:
    """Markdown that can impersonate, made inert for every platform's formatter.

    A zero-width space breaks the syntax without a visible change, where a backslash
    escape would show up literally on platforms without escapes (Slack): `](` of a masked
    link, and a heading/subtext marker at the start of a line. A bare URL still links,
    but it shows where it goes.
    """
    text = MASKED_LINK_RE.sub("]" + ZWSP + "(", text)
    return HEADING_RE.sub(lambda m: m.group(1) + ZWSP + m.group(2), text)


def shorten(text: str, limit: int) -> str:
    """`text` cut to `limit` characters, an ellipsis marking the cut."""
    return text if len(text) <= limit else text[: limit - 1] + "…"
