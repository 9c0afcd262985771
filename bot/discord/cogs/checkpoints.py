"""/checkpoint list|use: which fine-tuned model writes the scenes (bot admins only)."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from ... import checkpoints
from ..utils.checks import is_bot_admin

NO_PINGS = discord.AllowedMentions.none()


@app_commands.guild_only()
@app_commands.default_permissions(administrator=True)
class Checkpoints(
    commands.GroupCog, group_name="checkpoint", group_description="Switch the model (bot admins)"
):
    def __init__(self, bot) -> None:
        self.bot = bot

    @app_commands.command(name="list", description="List the checkpoints the bot can use")
    @is_bot_admin()
    async def list_(self, interaction: discord.Interaction) -> None:
        rows = "\n".join(f"• {row}" for row in self.bot.core.checkpoint_listing())
        await interaction.response.send_message(
            f"🎞️ **Checkpoints**\n{rows}", ephemeral=True, allowed_mentions=NO_PINGS
        )

    @app_commands.command(name="use", description="Switch to another checkpoint")
    @app_commands.describe(name="A name from /checkpoint list")
    @is_bot_admin()
    async def use(
        self, interaction: discord.Interaction, name: app_commands.Range[str, 1, 100]
    ) -> None:
        # Loading takes a few seconds: acknowledge first so the interaction doesn't expire.
        await interaction.response.defer(ephemeral=True, thinking=True)
        active = await self.bot.core.use_checkpoint(name)
        await interaction.followup.send(
            f"✅ {self.bot.core.switched_text(active, '`')}",
            ephemeral=True,
            allowed_mentions=NO_PINGS,
        )

    @use.autocomplete("name")
    async def use_autocomplete(
        self, interaction: discord.Interaction, current: str
    ) -> list[app_commands.Choice[str]]:
        core = self.bot.core
        every = core.list_checkpoints() + checkpoints.humour_available(core.config.checkpoints_dir)
        names = [n for n in dict.fromkeys(every) if current.lower() in n.lower()]
        return [app_commands.Choice(name=n, value=n) for n in names[:25]]


async def setup(bot) -> None:
    await bot.add_cog(Checkpoints(bot))
