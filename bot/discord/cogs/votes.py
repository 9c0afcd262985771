"""Votes are keycap reactions on scene messages; /best shows the leaderboard."""

from __future__ import annotations

import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from ...db import DatabaseError
from ..utils.formatting import neutralize, slot_of
from .scenes import PLATFORM, place_of

log = logging.getLogger(__name__)


class Votes(commands.Cog):
    def __init__(self, bot) -> None:
        self.bot = bot

    async def _vote(self, payload: discord.RawReactionActionEvent, add: bool) -> None:
        if self.bot.user is not None and payload.user_id == self.bot.user.id:
            return  # the bot's own keycaps are not votes
        try:
            await self.bot.core.vote(
                platform=PLATFORM,
                message_id=str(payload.message_id),
                slot=slot_of(str(payload.emoji)),
                user_id=str(payload.user_id),
                add=add,
            )
        except DatabaseError as e:  # nobody to reply to for a reaction
            log.warning("vote by %s not stored: %s", payload.user_id, e)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        await self._vote(payload, add=True)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        await self._vote(payload, add=False)

    @app_commands.command(name="best", description="The most-voted scene lines")
    @app_commands.describe(scope="This whole server, or only this channel")
    @app_commands.guild_only()
    async def best(
        self, interaction: discord.Interaction, scope: Literal["server", "channel"] = "server"
    ) -> None:
        text = await self.bot.core.best_text(
            place_of(interaction),
            channel_only=scope == "channel",
            where="server",
            escape=neutralize,
        )
        await interaction.response.send_message(
            text, allowed_mentions=discord.AllowedMentions.none()
        )


async def setup(bot) -> None:
    await bot.add_cog(Votes(bot))
