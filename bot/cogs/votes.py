"""Votes are keycap reactions on scene messages; /best shows the leaderboard."""

from __future__ import annotations

import logging
from typing import Literal

import discord
from discord import app_commands
from discord.ext import commands

from ..db import DatabaseError, RankedLine
from ..utils.formatting import neutralize, shorten, slot_of

log = logging.getLogger(__name__)


def leaderboard(title: str, rows: list[RankedLine]) -> str:
    if not rows:
        return f"🏆 **{title}**\nNo votes yet — react to a scene's lines with 1️⃣…🔟 to vote."
    out = [f"🏆 **{title}**"]
    for rank, row in enumerate(rows, start=1):
        votes = "vote" if row.votes == 1 else "votes"
        text = shorten(neutralize(row.text), 160)
        where = f"scene {row.scene_id}, line {row.line_no}"
        out.append(f"{rank}. {text} — **{row.votes}** {votes} ({where})")
    return "\n".join(out)


class Votes(commands.Cog):
    def __init__(self, bot) -> None:
        self.bot = bot

    async def _line(self, payload: discord.RawReactionActionEvent) -> int | None:
        if self.bot.user is not None and payload.user_id == self.bot.user.id:
            return None  # the bot's own keycaps are not votes
        slot = slot_of(str(payload.emoji))
        if slot is None:
            return None
        return await self.bot.core.db.line_at(payload.message_id, slot)

    @commands.Cog.listener()
    async def on_raw_reaction_add(self, payload: discord.RawReactionActionEvent) -> None:
        try:
            line_id = await self._line(payload)
            if line_id is not None:
                await self.bot.core.db.add_vote(payload.user_id, line_id)
        except DatabaseError as e:  # nobody to reply to for a reaction
            log.warning("vote by %s not stored: %s", payload.user_id, e)

    @commands.Cog.listener()
    async def on_raw_reaction_remove(self, payload: discord.RawReactionActionEvent) -> None:
        try:
            line_id = await self._line(payload)
            if line_id is not None:
                await self.bot.core.db.remove_vote(payload.user_id, line_id)
        except DatabaseError as e:
            log.warning("vote removal by %s not stored: %s", payload.user_id, e)

    @app_commands.command(name="best", description="The most-voted scene lines")
    @app_commands.describe(scope="This whole server, or only this channel")
    @app_commands.guild_only()
    async def best(
        self, interaction: discord.Interaction, scope: Literal["server", "channel"] = "server"
    ) -> None:
        channel = interaction.channel_id if scope == "channel" else None
        rows = await self.bot.core.db.best(interaction.guild_id, channel)
        title = "Best lines in this channel" if channel else "Best lines in this server"
        await interaction.response.send_message(
            leaderboard(title, rows), allowed_mentions=discord.AllowedMentions.none()
        )


async def setup(bot) -> None:
    await bot.add_cog(Votes(bot))
