"""Settings from the environment (and a `.env` file in the working directory); see .env.example."""

from __future__ import annotations

import math
import os
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import load_dotenv

from sitcom.models import DEFAULT_MODEL


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


@dataclass(frozen=True)
class Config:
    token: str | None = field(default=None, repr=False)  # never printed or logged
    db_path: Path = Path("sitcom.db")
    checkpoints_dir: Path = Path("checkpoints")
    default_checkpoint: str = DEFAULT_MODEL
    admin_user_ids: frozenset[int] = frozenset()
    dev_guild_id: int | None = None
    max_queue: int = 32
    per_user_limit: int = 2
    timeout_s: float = 120.0
    db_timeout_s: float = 5.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: bool = True) -> Config:
        if env is None:
            if dotenv:
                # Only ./.env: python-dotenv's default search walks up from this file's
                # folder, so a .env planted above a copy of the app would configure it.
                load_dotenv(Path.cwd() / ".env", override=False)  # real variables win
            env = os.environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        def number(name: str, kind: type, default: float, low: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            try:
                value = kind(raw)
            except ValueError:
                raise ConfigError(f"{name} must be a number (got {raw!r})") from None
            if not math.isfinite(value):  # nan would silently switch the limit off
                raise ConfigError(f"{name} must be a finite number (got {raw!r})")
            if value < low:
                raise ConfigError(f"{name} must be at least {low} (got {raw!r})")
            return value

        def snowflake(name: str, raw: str) -> int:
            if not raw.isdigit():
                raise ConfigError(f"{name} must hold Discord ids (digits), got {raw!r}")
            return int(raw)

        token = get("DISCORD_TOKEN")
        if token and any(c.isspace() or unicodedata.category(c).startswith("C") for c in token):
            # aiohttp would refuse it as a header deep inside login, with a traceback.
            raise ConfigError("DISCORD_TOKEN contains spaces or control characters; copy it "
                              "again from the Developer Portal (Bot > Reset Token)")
        admins = get("ADMIN_USER_IDS") or ""
        guild = get("DEV_GUILD_ID")
        level = (get("LOG_LEVEL") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {level!r})")
        return cls(
            token=token,
            db_path=Path(get("BOT_DB") or "sitcom.db").expanduser(),
            checkpoints_dir=Path(get("CHECKPOINTS_DIR") or "checkpoints").expanduser(),
            default_checkpoint=get("DEFAULT_CHECKPOINT") or DEFAULT_MODEL,
            admin_user_ids=frozenset(
                snowflake("ADMIN_USER_IDS", part.strip())
                for part in admins.replace(",", " ").split()
            ),
            dev_guild_id=snowflake("DEV_GUILD_ID", guild) if guild else None,
            max_queue=int(number("QUEUE_SIZE", int, 32, 1)),
            per_user_limit=int(number("PER_USER_LIMIT", int, 2, 1)),
            timeout_s=float(number("GENERATION_TIMEOUT_S", float, 120.0, 1.0)),
            db_timeout_s=float(number("DB_TIMEOUT_S", float, 5.0, 0.0)),
            log_level=level,
        )
