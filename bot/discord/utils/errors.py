"""One place that turns any command failure into a polite, ephemeral one-line reply."""

from __future__ import annotations

import logging

import discord
from discord import app_commands

from sitcom.engine import EngineError
from sitcom.model.catalog import ModelLoadError

from ...checkpoints import CheckpointError
from ...commands import UsageError
from ...db import DatabaseError
from ...permissions import NotAllowed

log = logging.getLogger(__name__)

# Errors whose message is written for users already.
USER_FACING = (EngineError, ModelLoadError, CheckpointError, DatabaseError, NotAllowed, UsageError)


def user_message(error: BaseException) -> str:
    """A polite one-liner for a failure; unexpected ones get a generic apology (and a log)."""
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    if isinstance(error, USER_FACING):
        return str(error)
    if isinstance(error, app_commands.MissingPermissions):
        needed = ", ".join(p.replace("_", " ").title() for p in error.missing_permissions)
        return f"You need the {needed} permission for that."
    if isinstance(error, app_commands.NoPrivateMessage):
        return "That command only works in a server channel."
    if isinstance(error, app_commands.CheckFailure):
        return str(error) or "You're not allowed to use that command."
    if isinstance(error, app_commands.TransformerError):
        return f"`{error.value}` isn't a valid value there."
    if isinstance(error, app_commands.CommandNotFound | app_commands.CommandSignatureMismatch):
        return "I don't know that command any more; Discord may still be updating the list."
    return "Sorry, something went wrong on my side. It has been logged."


def is_expected(error: BaseException) -> bool:
    if isinstance(error, app_commands.CommandInvokeError):
        error = error.original
    return isinstance(error, (*USER_FACING, app_commands.CheckFailure))


async def reply_error(interaction: discord.Interaction, error: BaseException) -> None:
    command = interaction.command.qualified_name if interaction.command else "?"
    if is_expected(error):
        log.info("/%s by %s refused: %s", command, interaction.user.id, user_message(error))
    else:
        log.error("/%s by %s failed", command, interaction.user.id, exc_info=error)
    text = "⚠️ " + user_message(error)
    none = discord.AllowedMentions.none()
    try:
        if interaction.response.is_done():
            await interaction.followup.send(text, ephemeral=True, allowed_mentions=none)
        else:
            await interaction.response.send_message(text, ephemeral=True, allowed_mentions=none)
    except discord.HTTPException:  # the interaction token expired or Discord is down
        log.warning("could not tell %s about the failure of /%s", interaction.user.id, command)
