"""/settings show|set|reset: per-channel decoding settings, ranges from sitcom.settings.RANGES."""

from __future__ import annotations

import discord
from discord import app_commands
from discord.ext import commands

from sitcom.settings import RANGES

from ..utils.checks import may_change_settings
from .scenes import place_of

NO_PINGS = discord.AllowedMentions.none()
# What each setting does, for the option descriptions the Discord client shows.
DESCRIPTIONS = {
    "max_new_tokens": "Longest scene, in tokens",
    "max_lines": "Longest scene, in lines after the opening",
    "repetition_penalty": "Higher repeats less",
    "temperature": "Higher is wilder",
    "top_p": "Sample from this much probability mass",
    "top_k": "Sample from the k likeliest tokens (0 = all)",
    "min_p": "Drop tokens below this share of the likeliest (0 = off)",
    "best_of": "Write this many scenes at once and post the best",
    "premise": "Keep to the opening's own words: higher stays closer (0 = off)",
    "pick_lines": "Compare the best_of scenes after every line, not at the end (1 = on)",
    "cast_turns": "Only the scene's cast speak, taking turns (1 = on)",
    "guidance": "Keep to the opening by guidance: higher stays closer (1 = off)",
    "contrast": "More of what the fine-tune adds over its base: higher, more (0 = off)",
    "voice": "Each line more like its own speaker than anyone's: higher, more (0 = off)",
    "longer_lines": "Lines run on longer before they end: higher, longer (0 = off)",
}


def _range(kind: type, name: str):
    low, high = RANGES[name]
    return app_commands.Range[kind, kind(low), kind(high)]


# Discord enforces these in its client; SceneSettings.validated() checks again on our side,
# because a payload can come from an outdated command registration.
MaxNewTokens = _range(int, "max_new_tokens")
MaxLines = _range(int, "max_lines")
RepetitionPenalty = _range(float, "repetition_penalty")
Temperature = _range(float, "temperature")
TopP = _range(float, "top_p")
TopK = _range(int, "top_k")
MinP = _range(float, "min_p")
BestOf = _range(int, "best_of")
Premise = _range(float, "premise")
PickLines = _range(int, "pick_lines")
CastTurns = _range(int, "cast_turns")
Guidance = _range(float, "guidance")
Contrast = _range(float, "contrast")
Voice = _range(float, "voice")
LongerLines = _range(float, "longer_lines")


@app_commands.guild_only()
class Settings(
    commands.GroupCog, group_name="settings", group_description="Scene settings for this channel"
):
    def __init__(self, bot) -> None:
        self.bot = bot

    @app_commands.command(name="show", description="Show this channel's scene settings")
    async def show(self, interaction: discord.Interaction) -> None:
        text = await self.bot.core.show_settings(place_of(interaction))
        await interaction.response.send_message(text, ephemeral=True, allowed_mentions=NO_PINGS)

    @app_commands.command(name="set", description="Change scene settings for this channel")
    @app_commands.describe(
        **{
            name: f"{DESCRIPTIONS[name]} ({RANGES[name][0]:g}–{RANGES[name][1]:g})"
            for name in RANGES
        }
    )
    @may_change_settings()
    async def set_(
        self,
        interaction: discord.Interaction,
        max_new_tokens: MaxNewTokens | None = None,
        max_lines: MaxLines | None = None,
        repetition_penalty: RepetitionPenalty | None = None,
        temperature: Temperature | None = None,
        top_p: TopP | None = None,
        top_k: TopK | None = None,
        min_p: MinP | None = None,
        best_of: BestOf | None = None,
        premise: Premise | None = None,
        pick_lines: PickLines | None = None,
        cast_turns: CastTurns | None = None,
        guidance: Guidance | None = None,
        contrast: Contrast | None = None,
        voice: Voice | None = None,
        longer_lines: LongerLines | None = None,
    ) -> None:
        given = {
            k: v
            for k, v in {
                "max_new_tokens": max_new_tokens,
                "max_lines": max_lines,
                "repetition_penalty": repetition_penalty,
                "temperature": temperature,
                "top_p": top_p,
                "top_k": top_k,
                "min_p": min_p,
                "best_of": best_of,
                "premise": premise,
                "pick_lines": pick_lines,
                "cast_turns": cast_turns,
                "guidance": guidance,
                "contrast": contrast,
                "voice": voice,
                "longer_lines": longer_lines,
            }.items()
            if v is not None
        }
        if not given:
            await interaction.response.send_message(
                "Give at least one setting to change, e.g. `/settings set temperature:0.9`.",
                ephemeral=True,
            )
            return
        text = await self.bot.core.change_settings(
            place_of(interaction), str(interaction.user.id), given
        )  # UsageError: out of range
        await interaction.response.send_message(text, allowed_mentions=NO_PINGS)

    @app_commands.command(name="reset", description="Go back to the default scene settings")
    @may_change_settings()
    async def reset(self, interaction: discord.Interaction) -> None:
        text = await self.bot.core.reset_settings(place_of(interaction))
        await interaction.response.send_message(text, allowed_mentions=NO_PINGS)


async def setup(bot) -> None:
    await bot.add_cog(Settings(bot))
