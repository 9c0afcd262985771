"""/settings show|set|reset: per-channel decoding settings, ranges from sitcom.settings.RANGES."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from sitcom.settings import RANGES, SceneSettings

NO_PINGS = discord.AllowedMentions.none()


def _range(kind: type, name: str):
    low, high = RANGES[name]
    return app_commands.Range[kind, kind(low), kind(high)]


# Discord enforces these in its client; SceneSettings.validated() checks again on our side,
# because a payload can come from an outdated command registration.
MaxNewTokens = _range(int, "max_new_tokens")
RepetitionPenalty = _range(float, "repetition_penalty")
Temperature = _range(float, "temperature")
TopP = _range(float, "top_p")
TopK = _range(int, "top_k")


def describe(settings: SceneSettings, title: str) -> str:
    rows = [f"⚙️ **{title}**"]
    for name, value in settings.as_dict().items():
        low, high = RANGES[name]
        rows.append(f"`{name}` = {value:g}  (allowed {low:g}–{high:g})")
    return "\n".join(rows)


@app_commands.guild_only()
class Settings(
    commands.GroupCog, group_name="settings", group_description="Scene settings for this channel"
):
    def __init__(self, bot) -> None:
        self.bot = bot

    @app_commands.command(name="show", description="Show this channel's scene settings")
    async def show(self, interaction: discord.Interaction) -> None:
        settings = await self.bot.core.db.get_settings(interaction.channel_id)
        await interaction.response.send_message(
            describe(settings, "Scene settings for this channel"), ephemeral=True,
            allowed_mentions=NO_PINGS,
        )

    @app_commands.command(name="set", description="Change scene settings for this channel")
    @app_commands.checks.has_permissions(manage_channels=True)
    async def set_(
        self, interaction: discord.Interaction,
        max_new_tokens: MaxNewTokens | None = None,
        repetition_penalty: RepetitionPenalty | None = None,
        temperature: Temperature | None = None,
        top_p: TopP | None = None,
        top_k: TopK | None = None,
    ) -> None:
        given = {k: v for k, v in {
            "max_new_tokens": max_new_tokens, "repetition_penalty": repetition_penalty,
            "temperature": temperature, "top_p": top_p, "top_k": top_k,
        }.items() if v is not None}
        if not given:
            await interaction.response.send_message(
                "Give at least one setting to change, e.g. `/settings set temperature:0.9`.",
                ephemeral=True,
            )
            return
        db = self.bot.core.db
        try:
            settings = (await db.get_settings(interaction.channel_id)).with_changes(**given)
        except ValueError as e:
            await interaction.response.send_message(f"⚠️ {e}", ephemeral=True)
            return
        await db.save_settings(
            interaction.guild_id, interaction.channel_id, interaction.user.id, settings
        )
        await interaction.response.send_message(
            describe(settings, "Saved. Scene settings for this channel"), allowed_mentions=NO_PINGS
        )

    @app_commands.command(name="reset", description="Go back to the default scene settings")
    @app_commands.checks.has_permissions(manage_channels=True)
    async def reset(self, interaction: discord.Interaction) -> None:
        await self.bot.core.db.reset_settings(interaction.channel_id)
        await interaction.response.send_message(
            describe(SceneSettings(), "Reset. Scene settings for this channel"),
            allowed_mentions=NO_PINGS,
        )


async def setup(bot) -> None:
    await bot.add_cog(Settings(bot))
