"""Settings from the environment (and a `.env` file beside the process); see .env.example."""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv import load_dotenv


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


@dataclass(frozen=True)
class Config:
    token: str | None = field(default=None, repr=False)  # never printed or logged
    db_path: Path = Path("sitcom.db")
    checkpoints_dir: Path = Path("checkpoints")
    default_checkpoint: str = "smollm2"
    admin_user_ids: frozenset[int] = frozenset()
    dev_guild_id: int | None = None
    max_queue: int = 32
    per_user_limit: int = 2
    timeout_s: float = 120.0
    shutdown_timeout_s: float = 25.0
    db_timeout_s: float = 5.0
    log_level: str = "INFO"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: bool = True) -> Config:
        if env is None:
            if dotenv:
                load_dotenv(override=False)  # real environment variables win over .env
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
            if value < low:
                raise ConfigError(f"{name} must be at least {low} (got {raw!r})")
            return value

        def snowflake(name: str, raw: str) -> int:
            if not raw.isdigit():
                raise ConfigError(f"{name} must hold Discord ids (digits), got {raw!r}")
            return int(raw)

        admins = get("ADMIN_USER_IDS") or ""
        guild = get("DEV_GUILD_ID")
        level = (get("LOG_LEVEL") or "INFO").upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {level!r})")
        return cls(
            token=get("DISCORD_TOKEN"),
            db_path=Path(get("BOT_DB") or "sitcom.db").expanduser(),
            checkpoints_dir=Path(get("CHECKPOINTS_DIR") or "checkpoints").expanduser(),
            default_checkpoint=get("DEFAULT_CHECKPOINT") or "smollm2",
            admin_user_ids=frozenset(
                snowflake("ADMIN_USER_IDS", part.strip())
                for part in admins.replace(",", " ").split()
            ),
            dev_guild_id=snowflake("DEV_GUILD_ID", guild) if guild else None,
            max_queue=int(number("QUEUE_SIZE", int, 32, 1)),
            per_user_limit=int(number("PER_USER_LIMIT", int, 2, 1)),
            timeout_s=float(number("GENERATION_TIMEOUT_S", float, 120.0, 1.0)),
            shutdown_timeout_s=float(number("SHUTDOWN_TIMEOUT_S", float, 25.0, 0.0)),
            db_timeout_s=float(number("DB_TIMEOUT_S", float, 5.0, 0.0)),
            log_level=level,
        )
