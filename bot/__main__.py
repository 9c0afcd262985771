"""`python -m bot`: the Discord bot when DISCORD_TOKEN is set, otherwise the local console."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys

import aiohttp
import discord

from .config import Config, ConfigError

log = logging.getLogger("bot")


async def run_discord(config: Config) -> int:
    from sitcom.engine import EngineError
    from sitcom.models import ModelLoadError

    from .bot import SitcomBot
    from .db import DatabaseError

    bot = SitcomBot(config)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, lambda: asyncio.ensure_future(bot.close()))
    async with bot:  # closes the bot, engine and database however start() ends
        try:
            await bot.start(config.token)
        except discord.LoginFailure:
            print("error: Discord rejected DISCORD_TOKEN; copy it again from the "
                  "Developer Portal (Bot > Reset Token)", file=sys.stderr)
            return 1
        except discord.PrivilegedIntentsRequired:
            print("error: Discord refused the gateway intents", file=sys.stderr)
            return 1
        except discord.HTTPException as e:  # e.g. 5xx at login: Discord is having trouble
            print(f"error: Discord answered {e.status} {e.response.reason} during start-up; "
                  "try again later (https://discordstatus.com)", file=sys.stderr)
            return 1
        except (ModelLoadError, DatabaseError, EngineError) as e:
            print(f"error: {e}", file=sys.stderr)
            return 1
        except (aiohttp.ClientError, OSError) as e:
            print(f"error: cannot reach Discord ({type(e).__name__}: {e})", file=sys.stderr)
            return 1
    return 0


def main() -> int:
    try:
        config = Config.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    if config.token:
        return asyncio.run(run_discord(config))
    from .console import main as console_main

    try:
        return asyncio.run(console_main(config))
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
