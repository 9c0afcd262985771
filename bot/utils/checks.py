"""Run-time permission checks for app commands."""

from __future__ import annotations

import discord
from discord import app_commands


class NotAdmin(app_commands.CheckFailure):
    pass


def is_bot_admin():
    """ADMIN_USER_IDS or the application's owner (team members included).

    default_permissions only hides a command in the client and server admins can
    re-grant it, so the real decision is made here, on every call.
    """

    async def predicate(interaction: discord.Interaction) -> bool:
        bot = interaction.client
        if interaction.user.id in bot.config.admin_user_ids:
            return True
        if await bot.is_owner(interaction.user):
            return True
        raise NotAdmin("Only the bot's admins can switch checkpoints.")

    return app_commands.check(predicate)
