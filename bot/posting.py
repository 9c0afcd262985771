"""Posting a stored scene to a chat channel, once for every platform.

The plan says which lines go into which message and which keycap votes for which line; the
delivery sends the messages through a platform `Surface` (a thin adapter: Discord channel,
Slack channel), retries transient failures with backoff, records every message before its
reactions go up, and never leaves a scene half-posted:

- A scene is stored before anything is posted; `posted_at` is set when its last message is
  out. If posting still fails after the retries, the ack says so and `/scene #ID` posts the
  rest later (messages already out are not posted twice).
- Missing permission to react (Discord's Add Reactions, Slack's reactions:write): every line
  is still posted, without the bot's keycaps, and the ack says which permission is missing;
  users can add the keycaps themselves and those votes count.
- The user's own prompt lines are shown (💬) but get no keycap, so they are never votable.

The libraries already retry on their own (discord.py: 429s and 5xx; slack_sdk: the retry
handlers installed in bot.slack), so this is the backstop for what gets through them, such
as a dropped connection mid-request.
"""

from __future__ import annotations

import asyncio
import logging
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

from .db import Database, StoredLine, StoredScene
from .markup import shorten

log = logging.getLogger(__name__)

KEYCAP_SLOTS = 10  # 1️⃣ … 🔟: votable lines per message
T = TypeVar("T")


class Transient(Exception):
    """A failure worth retrying: a dropped connection, a 5xx, a 429 (`retry_after` s)."""

    def __init__(self, message: str, retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = retry_after


class Refused(Exception):
    """The platform said no for good (a missing permission or scope, not in the channel);
    str(e) is a user-facing sentence that says what to fix."""


@dataclass(frozen=True)
class Posted:
    ref: str  # the platform's message reference, stored in lines.message_id
    link: str | None = None


class Surface(Protocol):
    """What a platform adapter provides; see bot.discord.cogs.scenes, bot.slack.surface and
    bot.console."""

    platform: str
    max_chars: int  # per message
    line_chars: int  # per line, so one long line can't fill a message
    keycaps: str  # how the keycaps read in a help text, e.g. "1️⃣…🔟"

    def escape(self, text: str) -> str: ...
    def header(self, scene_id: int, part: int, note: str | None) -> str: ...
    def line(self, slot: int | None, text: str, line_no: int = 0) -> str: ...
    def link(self, url: str, label: str) -> str: ...
    async def send(self, text: str) -> Posted: ...
    async def react(self, ref: str, slot: int) -> None: ...


def scene_header(scene_id: int, part: int, note: str | None, bold: str) -> str:
    """A scene message's first line, the same on every platform; `bold` is its markup
    (`**` on Discord, `*` on Slack). The note goes under the first part only."""
    text = f"🎬 {bold}Scene {scene_id}{bold}" + (f" (part {part})" if part > 1 else "")
    text += " — react to vote for the best lines"
    return text + (f"\n{note}" if note and part == 1 else "")


@dataclass(frozen=True)
class RetryPolicy:
    attempts: int = 4
    first_delay_s: float = 1.0
    max_delay_s: float = 60.0

    def delay(self, attempt: int, error: Transient) -> float:
        if error.retry_after is not None:  # the platform said how long; believe it
            return min(max(error.retry_after, 0.0), self.max_delay_s)
        backoff = self.first_delay_s * 2 ** (attempt - 1)
        return min(backoff * (1 + random.random() / 4), self.max_delay_s)  # a little jitter


async def retrying(call: Callable[[], Awaitable[T]], policy: RetryPolicy, what: str) -> T:
    for attempt in range(1, policy.attempts + 1):
        try:
            return await call()
        except Transient as e:
            if attempt == policy.attempts:
                raise
            delay = policy.delay(attempt, e)
            log.warning(
                "%s failed (%s); retry %d/%d in %.1f s",
                what,
                e,
                attempt,
                policy.attempts - 1,
                delay,
            )
            await asyncio.sleep(delay)
    raise AssertionError("unreachable")


@dataclass(frozen=True)
class Message:
    text: str
    lines: list[tuple[StoredLine, int | None]]  # (line, keycap slot or None)

    @property
    def posted(self) -> bool:
        return all(line.message_id is not None for line, _ in self.lines)


def plan(scene: StoredScene, surface: Surface) -> list[Message]:
    """The scene as messages: at most 10 votable lines and `max_chars` per message, split
    on line boundaries; model-written lines carry the keycap that votes for them."""
    messages: list[Message] = []
    text, placed, slot = "", [], 0

    def close() -> None:
        nonlocal text, placed, slot
        if placed:
            messages.append(Message(text, placed))
        text, placed, slot = "", [], 0

    for line in scene.lines:
        shown = shorten(surface.escape(line.text), surface.line_chars)
        row_slot = None if line.from_prompt else slot + 1
        if placed and row_slot is not None and row_slot > KEYCAP_SLOTS:
            close()
            row_slot = 1
        row = surface.line(row_slot, shown, line.line_no)
        if placed and len(text) + 1 + len(row) > surface.max_chars:
            close()
            row_slot = None if line.from_prompt else 1
            row = surface.line(row_slot, shown, line.line_no)
        if not placed:
            text = surface.header(scene.id, len(messages) + 1, scene.note)
        text += "\n" + row
        placed.append((line, row_slot))
        slot = row_slot or slot
    close()
    return messages


@dataclass(frozen=True)
class Delivery:
    posted: bool  # every message is out
    link: str | None = None  # to the first message posted now
    problem: str | None = None  # why not posted (user-facing)
    reactions_problem: str | None = None  # posted, but without the bot's keycaps: why


async def deliver(
    db: Database, scene: StoredScene, surface: Surface, policy: RetryPolicy
) -> Delivery:
    """Post what of `scene` is not out yet; see the module docstring."""
    link = None
    no_reactions: str | None = None
    try:
        for message in plan(scene, surface):
            if message.posted:
                continue  # a re-post: this part went out before
            posted = await retrying(
                lambda m=message: surface.send(m.text), policy, f"posting scene {scene.id}"
            )
            link = link or posted.link
            # Stored before the reactions go up, so the earliest votes already count.
            await db.place_lines(posted.ref, [(line.id, slot) for line, slot in message.lines])
            slots = [slot for _, slot in message.lines if slot is not None]
            for slot in slots if no_reactions is None else ():
                try:
                    await retrying(
                        lambda s=slot, ref=posted.ref: surface.react(ref, s),
                        policy,
                        f"reacting to scene {scene.id}",
                    )
                except Refused as e:
                    no_reactions = str(e)
                    break
                except Transient as e:
                    no_reactions = f"adding the voting reactions kept failing ({e})"
                    break
    except Refused as e:
        return Delivery(False, link, problem=str(e))
    except Transient as e:
        return Delivery(False, link, problem=f"{surface.platform.title()} kept failing ({e})")
    except Exception:  # the scene is stored; whatever this was, it can be re-posted
        log.exception("posting scene %d failed", scene.id)
        return Delivery(False, link, problem="something went wrong on my side (logged)")
    await db.mark_posted(scene.id)
    return Delivery(True, link, reactions_problem=no_reactions)
