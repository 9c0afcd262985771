"""/scene: queue a scene, acknowledge at once, then post it as votable channel messages.

The scene is posted when it is done rather than streamed: the 135M model finishes a scene
in seconds, every streamed edit would count against the channel's rate limit, and votes
need the final line-to-message mapping anyway. The acknowledgement is edited once to say
where the scene is (or why it failed).
"""

from __future__ import annotations

import asyncio
import logging

import discord
from discord import app_commands
from discord.ext import commands

from sitcom.engine import EngineError

from ..core import MAX_PROMPT_CHARS
from ..utils.formatting import KEYCAPS, neutralize, scene_messages, shorten

log = logging.getLogger(__name__)
NO_PINGS = discord.AllowedMentions.none()


class Scenes(commands.Cog):
    def __init__(self, bot) -> None:
        self.bot = bot

    @app_commands.command(name="scene", description="Write a sitcom scene opening with your lines")
    @app_commands.describe(prompt="How it opens, e.g. Elaine: Jerry! George! You guys, listen!")
    @app_commands.guild_only()
    async def scene(
        self, interaction: discord.Interaction,
        prompt: app_commands.Range[str, 1, MAX_PROMPT_CHARS],
    ) -> None:
        self.bot.track(asyncio.current_task())
        core = self.bot.core
        settings = await core.db.get_settings(interaction.channel_id)
        job = await core.submit(prompt, settings, interaction.user.id)
        await interaction.response.send_message(
            f"🎬 Writing your scene — #{job.position} in the queue…", allowed_mentions=NO_PINGS
        )
        try:
            scene = await job.result()
        except EngineError as e:
            await self._update_ack(interaction, f"😕 {e}")
            return
        if not scene.lines:
            await self._update_ack(interaction, "😕 The model wrote nothing this time; try again.")
            return
        stored = await core.record(
            scene, guild_id=interaction.guild_id, channel_id=interaction.channel_id,
            user_id=interaction.user.id, prompt=prompt,
        )
        try:
            first = await self._post(interaction.channel, stored.id, scene.lines, stored.line_ids)
        except discord.Forbidden:
            await self._update_ack(
                interaction, "😕 I can't post or react in this channel; I need Send Messages, "
                "Read Message History and Add Reactions here."
            )
            return
        await self._update_ack(
            interaction,
            f"🎬 Scene {stored.id} is ready: {first.jump_url} "
            f"({len(scene.lines)} lines, {scene.seconds:.1f} s, {core.checkpoint})"
            + (f" — {scene.note}" if scene.partial else ""),
        )

    async def _post(self, channel, scene_id: int, lines: list[str], line_ids: list[int]):
        """Post the scene; each message gets keycap reactions for the lines it shows."""
        first, start = None, 0
        for content, count in scene_messages(scene_id, lines):
            message = await channel.send(content, allowed_mentions=NO_PINGS)
            first = first or message
            # Stored before the reactions go up, so the earliest votes already count.
            await self.bot.core.db.place_lines(message.id, line_ids[start : start + count])
            start += count
            for emoji in KEYCAPS[:count]:
                await message.add_reaction(emoji)
        return first

    async def _update_ack(self, interaction: discord.Interaction, text: str) -> None:
        try:
            await interaction.edit_original_response(
                content=shorten(neutralize(text), 2000), allowed_mentions=NO_PINGS
            )
        except discord.HTTPException:  # tokens expire after 15 minutes; the scene is posted
            log.info("could not edit the /scene acknowledgement: %s", text)


async def setup(bot) -> None:
    await bot.add_cog(Scenes(bot))
