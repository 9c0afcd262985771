"""Run-time permission checks for Discord app commands; the rules are bot.permissions."""

from __future__ import annotations

import discord
from discord import app_commands

from ...permissions import NotAllowed, check_checkpoint, check_settings


class NotAdmin(app_commands.CheckFailure):
    pass


def _refuse(error: NotAllowed) -> NotAdmin:
    return NotAdmin(str(error))


def is_bot_admin():
    """ADMIN_USER_IDS or the application's owner (team members included).

    default_permissions only hides a command in the client and server admins can
    re-grant it, so the real decision is made here, on every call.
    """

    async def predicate(interaction: discord.Interaction) -> bool:
        bot = interaction.client
        owner = str(interaction.user.id) not in bot.config.admin_user_ids and await bot.is_owner(
            interaction.user
        )
        try:
            check_checkpoint(interaction.user.id, owner=owner, config=bot.config)
        except NotAllowed as e:
            raise _refuse(e) from None
        return True

    return app_commands.check(predicate)


def may_change_settings():
    """Manage Channels in this channel, or ADMIN_USER_IDS."""

    async def predicate(interaction: discord.Interaction) -> bool:
        perms = interaction.permissions
        try:
            check_settings(
                interaction.user.id,
                platform_admin=perms.manage_channels,
                config=interaction.client.config,
                needs="the Manage Channels permission",
            )
        except NotAllowed as e:
            raise _refuse(e) from None
        return True

    return app_commands.check(predicate)
