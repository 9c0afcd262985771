"""The Discord frontend: a commands.Bot whose cogs talk to the shared Core."""

from __future__ import annotations

import asyncio
import logging

import discord
from discord import app_commands
from discord.ext import commands

from ..config import Config
from ..core import Core
from .utils.errors import reply_error

log = logging.getLogger(__name__)

EXTENSIONS = (
    "bot.discord.cogs.scenes",
    "bot.discord.cogs.votes",
    "bot.discord.cogs.settings",
    "bot.discord.cogs.checkpoints",
)


def intents() -> discord.Intents:
    # Slash commands and raw reaction events only: no message content, no members.
    wanted = discord.Intents.none()
    wanted.guilds = True
    wanted.guild_reactions = True
    return wanted


class SitcomTree(app_commands.CommandTree):
    async def on_error(
        self, interaction: discord.Interaction, error: app_commands.AppCommandError
    ) -> None:
        await reply_error(interaction, error)


class SitcomBot(commands.AutoShardedBot):
    """The shards `config.shard_ids` of `config.shard_count` in this process (None: every
    shard; no count: as many as Discord recommends); a cluster of processes on one token
    splits the shards between them (SHARD_IDS), each holding a database lease per shard."""

    def __init__(self, config: Config, core: Core | None = None) -> None:
        super().__init__(
            command_prefix=commands.when_mentioned,  # unused: every command is a slash command
            intents=intents(),
            allowed_mentions=discord.AllowedMentions.none(),
            tree_cls=SitcomTree,
            help_command=None,
            shard_ids=list(config.shard_ids) if config.shard_ids is not None else None,
            shard_count=config.shard_count,
        )
        self.config = config
        self.core = core
        self.sync_on_setup = True
        self._scene_tasks: set[asyncio.Task] = set()
        self._close_calls = 0
        self._stopping: asyncio.Task | None = None

    async def setup_hook(self) -> None:
        # Runs once per process (not on reconnects), so commands are synced once here.
        if self.core is None:
            self.core = await Core.start(self.config)
        if self.shard_count is None:
            # Discord's recommended count (GET /gateway/bot), asked here rather than when
            # the shards connect, so that the leases below are for the shards that will run.
            self.shard_count, _, _ = await self.http.get_bot_gateway()
        shards = list(self.shard_ids) if self.shard_ids is not None else range(self.shard_count)
        # One process per application and shard: a second one on the same shards would
        # answer every command twice (raises LeaseHeld, naming the other's host and pid).
        await self.core.hold_leases(
            f"Discord application {self.application_id}",
            [(shard, self.shard_count) for shard in shards],
            on_lost=self._lease_lost,
        )
        for extension in EXTENSIONS:
            await self.load_extension(extension)
        if self.sync_on_setup and 0 in shards:  # once per cluster: by shard 0's process
            await self.sync_commands()

    async def sync_commands(self) -> list[app_commands.AppCommand]:
        if self.config.dev_guild_id:
            guild = discord.Object(self.config.dev_guild_id)
            self.tree.copy_global_to(guild=guild)  # guild commands update instantly
            synced = await self.tree.sync(guild=guild)
        else:
            synced = await self.tree.sync()  # global commands may take up to an hour
        log.info(
            "synced %d commands %s",
            len(synced),
            f"to guild {self.config.dev_guild_id}" if self.config.dev_guild_id else "globally",
        )
        return synced

    @property
    def scene_tasks(self) -> set[asyncio.Task]:
        return set(self._scene_tasks)

    def track(self, task: asyncio.Task) -> None:
        """Remember a running /scene so shutdown can let it post before closing."""
        self._scene_tasks.add(task)
        task.add_done_callback(self._scene_tasks.discard)

    def _lease_lost(self, reason: str) -> None:
        log.error("stopping: %s", reason)
        self._stopping = asyncio.get_running_loop().create_task(self.close())

    async def on_ready(self) -> None:
        log.info("logged in as %s (%s) in %d servers", self.user, self.user.id, len(self.guilds))

    async def close(self) -> None:
        """Each SIGINT/SIGTERM calls this (and so does leaving `async with bot`). The first
        gives running scenes until the shutdown deadline; a second cuts them now. Every call
        waits until the scenes are stored and posted and the database is closed, so a
        second signal never skips that (Core.close)."""
        self._close_calls += 1
        if self.core is not None:
            if self._close_calls == 1:
                log.info("shutting down: no new scenes, finishing the running ones")
            elif self._close_calls == 2 and not self.is_closed():
                log.info("shutting down now: running scenes are posted as they are")
            await self.core.close(posting=set(self._scene_tasks), now=self._close_calls > 1)
        await super().close()
