"""Discord text: keycap slots, the 2000-char limit, mention neutralising (the message plan
itself is bot.posting.plan, shared with Slack)."""

from __future__ import annotations

import re

import discord

KEYCAPS = ("1️⃣", "2️⃣", "3️⃣", "4️⃣", "5️⃣", "6️⃣", "7️⃣", "8️⃣", "9️⃣", "🔟")
MESSAGE_LIMIT = 2000
LINE_LIMIT = 1500  # leaves room for the header and the keycap prefix
# Control characters and bidi overrides; newline and tab survive.
CONTROL_RE = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def neutralize(text: str) -> str:
    """Text safe to show: no control characters, and @everyone/@here/<@id> cannot ping.

    AllowedMentions.none() already stops the ping; the zero-width space also keeps the
    text from *looking* like a mention.
    """
    text = CONTROL_RE.sub("", text)
    text = discord.utils.escape_mentions(text)
    return re.sub(r"<@([!&]?\d+)>", "<@\u200b\\1>", text)


def shorten(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


def slot_of(emoji: str) -> int | None:
    """1-10 for a keycap reaction, None for any other emoji."""
    try:
        return KEYCAPS.index(emoji) + 1
    except ValueError:
        return None
