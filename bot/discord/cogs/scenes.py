"""/scene on Discord: a thin adapter over Core.scene_command and bot.posting.

The scene is posted when it is done rather than streamed: the default model finishes a scene
in seconds, every streamed edit would count against the channel's rate limit, and votes
need the final line-to-message mapping anyway. The interaction is deferred at once
(Discord's 3 s limit), the acknowledgement then shows the queue position and is edited once
more to say where the scene is (or why it failed).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

import aiohttp
import discord
from discord import app_commands
from discord.ext import commands

from sitcom.jobs import clean_prompt

from ...commands import repost_id
from ...core import MAX_PROMPT_CHARS
from ...db import Place
from ...markup import shorten
from ...posting import Posted, Refused, Transient, retrying, scene_header
from ..utils.formatting import KEYCAPS, LINE_LIMIT, MESSAGE_LIMIT, neutralize

log = logging.getLogger(__name__)
NO_PINGS = discord.AllowedMentions.none()
PLATFORM = "discord"


def place_of(interaction: discord.Interaction) -> Place:
    return Place(PLATFORM, str(interaction.guild_id), str(interaction.channel_id))


class DiscordSurface:
    """bot.posting.Surface for one Discord channel."""

    platform = PLATFORM
    max_chars = MESSAGE_LIMIT
    line_chars = LINE_LIMIT
    keycaps = f"{KEYCAPS[0]}…{KEYCAPS[-1]}"

    def __init__(self, channel: discord.abc.Messageable, can_react: bool = True) -> None:
        self.channel = channel
        self.can_react = can_react  # from the interaction's app_permissions: skip doomed calls

    def escape(self, text: str) -> str:
        return neutralize(text)

    def header(self, scene_id: int, part: int, note: str | None) -> str:
        return scene_header(scene_id, part, note, bold="**")

    def line(self, slot: int | None, text: str, line_no: int = 0) -> str:
        # line_no: unused; the keycap says which line a vote is for
        return f"💬 {text}" if slot is None else f"{KEYCAPS[slot - 1]} {text}"

    def link(self, url: str, label: str) -> str:
        return url  # Discord shows a jump URL as a link by itself

    async def send(self, text: str) -> Posted:
        # The same nonce on every try of the same message, with enforce_nonce (discord.py
        # sets it with a nonce): when a try created the message but its answer was lost,
        # Discord answers the next try with that message instead of posting it again.
        try:
            message = await self.channel.send(
                text, allowed_mentions=NO_PINGS, nonce=message_nonce(text)
            )
        except discord.Forbidden as e:
            raise Refused(
                "I need the View Channel and Send Messages permissions in this channel"
            ) from e
        except discord.HTTPException as e:
            raise _transient(e) from e
        except discord.RateLimited as e:  # a 429 longer than discord.py waits by itself
            raise Transient("rate limited", e.retry_after) from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Transient(f"connection lost: {type(e).__name__}") from e
        return Posted(str(message.id), message.jump_url)

    async def react(self, ref: str, slot: int) -> None:
        if not self.can_react:
            raise Refused("I'm missing the Add Reactions permission in this channel")
        message = self.channel.get_partial_message(int(ref))
        try:
            await message.add_reaction(KEYCAPS[slot - 1])
        except discord.Forbidden as e:
            raise Refused(
                "I'm missing the Add Reactions (or Read Message History) permission in this channel"
            ) from e
        except discord.HTTPException as e:
            raise _transient(e) from e
        except discord.RateLimited as e:
            raise Transient("rate limited", e.retry_after) from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Transient(f"connection lost: {type(e).__name__}") from e


def message_nonce(text: str) -> str:
    """A stable nonce for a scene message (Discord allows 25 characters): its text names
    the scene and part, so two different messages never share one."""
    return "s" + hashlib.blake2b(text.encode(), digest_size=12).hexdigest()


def _transient(error: discord.HTTPException) -> Exception:
    # discord.py has already waited out 429s and retried 5xx a few times by itself.
    if error.status == 429 or error.status >= 500:
        return Transient(f"HTTP {error.status}", getattr(error, "retry_after", None))
    return error


class Scenes(commands.Cog):
    def __init__(self, bot) -> None:
        self.bot = bot
        if bot.core is not None:  # REDIS_URL: a scene whose asking gateway went away
            bot.core.surfaces[PLATFORM] = self.surface_for  # is posted by this one

    def surface_for(self, place: Place) -> DiscordSurface | None:
        """A surface for a channel this process (its shards) sees, else None."""
        channel = self.bot.get_channel(int(place.channel_id))
        return DiscordSurface(channel) if channel is not None else None

    @app_commands.command(name="scene", description="Write a sitcom scene opening with your lines")
    @app_commands.describe(
        prompt="How it opens, e.g. Elaine: Jerry! George! You guys, listen! "
        "(or #ID to post a saved scene again)"
    )
    @app_commands.guild_only()
    async def scene(
        self,
        interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
    ) -> None:
        self.bot.track(asyncio.current_task())
        if repost_id(prompt) is None:  # a bad opening: a private reply (no database read)
            clean_prompt(prompt, MAX_PROMPT_CHARS)
        # Discord drops an interaction not answered within 3 s (10062 Unknown interaction),
        # so it is deferred before anything that reads the database or the queue; a scene
        # whose acknowledgement failed is never queued: nobody would see it.
        try:
            await interaction.response.defer(thinking=True)
        except (discord.HTTPException, TimeoutError, aiohttp.ClientError, OSError) as e:
            log.warning(
                "/scene by %s: could not acknowledge it (%s); nothing queued",
                interaction.user.id,
                _reason(e),
            )
            return
        perms = interaction.app_permissions
        surface = DiscordSurface(interaction.channel, can_react=perms.add_reactions)
        update = lambda text: self._update_ack(interaction, text)  # noqa: E731
        try:
            await self.bot.core.scene_command(
                place=place_of(interaction),
                user_id=str(interaction.user.id),
                prompt=prompt,
                surface=surface,
                acknowledge=update,
                update=update,
            )
        except Exception:
            # Refused before it was queued (queue full, no such scene) or a bug: the
            # public "thinking…" goes, the error handler answers privately.
            try:
                await interaction.delete_original_response()
            except (discord.HTTPException, TimeoutError, aiohttp.ClientError, OSError) as e:
                log.info("could not remove the /scene acknowledgement: %s", _reason(e))
            raise

    async def _update_ack(self, interaction: discord.Interaction, text: str) -> None:
        """Edit the acknowledgement, retried like posts; a failure is a log line (the
        scene is posted and stored either way), never an error for the user."""

        async def edit() -> None:
            try:
                await interaction.edit_original_response(
                    content=shorten(text, MESSAGE_LIMIT), allowed_mentions=NO_PINGS
                )
            except discord.HTTPException as e:
                error = _transient(e)
                if error is e:  # a 4xx: retrying cannot help
                    raise
                raise error from e
            except discord.RateLimited as e:
                raise Transient("rate limited", e.retry_after) from e
            except (TimeoutError, aiohttp.ClientError, OSError) as e:
                raise Transient(f"connection lost: {type(e).__name__}") from e

        try:
            await retrying(edit, self.bot.core.retry, "editing the /scene acknowledgement")
        except (Transient, discord.HTTPException) as e:  # e.g. the 15-minute token expired
            log.warning("could not edit the /scene acknowledgement (%s): %s", _reason(e), text)


def _reason(error: BaseException) -> str:
    return str(error) or type(error).__name__


async def setup(bot) -> None:
    await bot.add_cog(Scenes(bot))
