"""`python -m bot`: every chat frontend whose credentials are set, on one engine and one
database — DISCORD_TOKEN → Discord; SLACK_BOT_TOKEN + SLACK_APP_TOKEN → Slack over Socket
Mode (or + SLACK_SIGNING_SECRET → Slack's HTTP mode on SLACK_PORT); both → both in this
process; none → the local console. With REDIS_URL set these are gateways (no model; scenes
queued in Redis) and `python -m bot worker` writes the scenes (`worker --status` lists the
workers).

`python -m bot migrate-db SQLITE_FILE postgresql://…` copies a SQLite bot's every row into
PostgreSQL (see bot.pg.copy_sqlite_to_postgres)."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord

from .config import Config, ConfigError

log = logging.getLogger("bot")


def _discord_failure(error: BaseException) -> str | None:
    """A one-line reason for a Discord start-up failure, None if it is not one."""
    from .db import DatabaseError

    if isinstance(error, DatabaseError):  # LeaseHeld: another process on these shards
        return str(error)
    if isinstance(error, discord.LoginFailure):
        return (
            "Discord rejected DISCORD_TOKEN; copy it again from the Developer Portal "
            "(Bot > Reset Token)"
        )
    if isinstance(error, discord.PrivilegedIntentsRequired):
        return "Discord refused the gateway intents"
    if isinstance(error, discord.ConnectionClosed) and error.code == 4011:
        return (
            "Discord closed the gateway: 4011 Sharding required (the bot is in too many "
            "servers for SHARD_COUNT shards); raise SHARD_COUNT, or unset it (and SHARD_IDS) "
            "to run Discord's recommended count"
        )
    if isinstance(error, discord.ConnectionClosed) and error.code == 4010:
        return (
            f"Discord closed the gateway: 4010 Invalid shard (shard {error.shard_id}); "
            "check SHARD_IDS and SHARD_COUNT"
        )
    if isinstance(error, discord.GatewayNotFound):  # GET /gateway/bot failed
        cause = error.__cause__
        why = f" ({cause.status} {cause.response.reason})" if cause is not None else ""
        return (
            f"Discord did not say how many shards to run (GET /gateway/bot{why}); "
            "try again later (https://discordstatus.com)"
        )
    if isinstance(error, discord.HTTPException):  # e.g. 5xx at login: Discord is in trouble
        return (
            f"Discord answered {error.status} {error.response.reason} during start-up; "
            "try again later (https://discordstatus.com)"
        )
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return f"cannot reach Discord ({type(error).__name__}: {error})"
    return None


def _slack_failure(error: BaseException) -> str | None:
    from slack_sdk.errors import SlackApiError

    from .db import DatabaseError

    if isinstance(error, DatabaseError):  # SocketModeTaken: another Socket Mode process
        return str(error)
    if isinstance(error, SlackApiError):
        code = error.response.get("error") if isinstance(error.response.data, dict) else None
        if code in ("invalid_auth", "not_authed", "account_inactive", "token_revoked"):
            return (
                "Slack rejected the token (SLACK_BOT_TOKEN, or SLACK_APP_TOKEN needing the "
                "connections:write scope); copy it again from api.slack.com/apps"
            )
        return f"Slack refused to connect ({code or error.response.status_code})"
    if isinstance(error, (aiohttp.ClientError, OSError)):
        return f"cannot reach Slack ({type(error).__name__}: {error})"
    return None


async def run(
    config: Config, *, loader=None, slack_client=None, stop: asyncio.Event | None = None
) -> int:
    """Start the core and the configured frontends; run until a signal (or `stop`), then
    stop taking scenes, let the running ones post, and close everything once."""
    from sitcom.engine import EngineError
    from sitcom.model.catalog import ModelLoadError

    from .core import Core
    from .db import DatabaseError

    try:
        core = await Core.start(config, loader=loader)
    except (ModelLoadError, DatabaseError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    slack = bot = None
    signals = 0
    hurry: asyncio.Future | None = None

    def on_signal() -> None:
        # The first signal stops taking scenes and lets the running ones finish; a second
        # cuts them where they are. Neither skips storing, posting or closing the database:
        # the handlers stay installed until all of that is done.
        nonlocal signals, hurry
        signals += 1
        stop.set()
        if signals == 2:
            log.info("shutting down now: running scenes are posted as they are")
            hurry = asyncio.ensure_future(core.close(posting=running(), now=True))

    def running() -> set[asyncio.Task]:
        return set(slack.tasks if slack else ()) | set(bot.scene_tasks if bot else ())

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal)
    discord_task: asyncio.Task | None = None
    status = 0
    try:
        if config.slack_bot_token:
            from .slack.app import SlackFrontend

            slack = SlackFrontend(config, core, client=slack_client)
            try:
                await slack.start()
            except Exception as e:
                reason = _slack_failure(e)
                if reason is None:
                    raise
                print(f"error: {reason}", file=sys.stderr)
                return 1
        if config.token:
            from .discord.bot import SitcomBot

            bot = SitcomBot(config, core)
            discord_task = asyncio.create_task(bot.start(config.token), name="discord")
        waiters = [asyncio.create_task(stop.wait())]
        if discord_task is not None:
            waiters.append(discord_task)
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for waiter in waiters:
            if waiter is not discord_task:
                waiter.cancel()
        if discord_task in done and discord_task.exception() is not None:
            error = discord_task.exception()
            reason = _discord_failure(error)
            if reason is None:
                raise error
            print(f"error: {reason}", file=sys.stderr)
            status = 1
    finally:
        try:
            log.info("shutting down: no new scenes, finishing the running ones")
            # idempotent; also what SitcomBot.close() calls
            await core.close(posting=running(), now=signals > 1)
            if bot is not None:
                await bot.close()
                if discord_task is not None:
                    await asyncio.gather(discord_task, return_exceptions=True)
            if slack is not None:
                await slack.close()
            if hurry is not None:
                await hurry
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
    return status


def migrate_db(argv: list[str]) -> int:
    """`migrate-db SQLITE_FILE URL`: 0 when copied (or already there), 1 on a bad input or
    a failed copy (one line), 2 on bad usage."""
    import argparse

    from .config import check_database_url

    parser = argparse.ArgumentParser(
        prog="python -m bot migrate-db",
        description="Copy every row of a SQLite bot database into an empty PostgreSQL "
        "database, in one transaction; a second run with the same data changes nothing.",
    )
    parser.add_argument("sqlite_file", help="the bot's SQLite file (BOT_DB)")
    parser.add_argument("url", help="postgresql://user:password@host:5432/dbname")
    args = parser.parse_args(argv)
    try:
        url = check_database_url(args.url, name="the target")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    from .pg import migrate_db_main

    return asyncio.run(migrate_db_main(args.sqlite_file, url))


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["migrate-db"]:
        logging.basicConfig(level="WARNING", format="%(levelname)s %(name)s: %(message)s")
        return migrate_db(argv[1:])
    if argv[:1] == ["worker"]:
        from .worker import main as worker_main

        return worker_main(argv[1:])
    try:
        config = Config.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.token or config.slack_bot_token:
        return asyncio.run(run(config))
    from .console import main as console_main

    try:
        return asyncio.run(console_main(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
