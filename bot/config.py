"""Settings from the environment (and a `.env` file in the working directory); see .env.example."""

from __future__ import annotations

import ipaddress
import math
import os
import re
import unicodedata
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from urllib.parse import urlsplit

from dotenv import load_dotenv

from sitcom.decoding.threads import parse_setting as parse_threads
from sitcom.model.catalog import DEFAULT_MODEL

# (lowest, highest) for every numeric setting, inclusive; .env.example documents them.
# Past the maximum a limit is effectively switched off (GENERATION_TIMEOUT_S=1e308 never
# stops a stuck scene, SHUTDOWN_TIMEOUT_S=1e308 never lets the process exit).
LIMITS: dict[str, tuple[float, float]] = {
    "SLACK_PORT": (1, 65535),
    "QUEUE_SIZE": (1, 1000),
    "PER_USER_LIMIT": (1, 100),
    "GENERATION_TIMEOUT_S": (1, 3600),  # an hour: a scene takes seconds to a few minutes
    "SHUTDOWN_TIMEOUT_S": (0, 600),  # systemd gives 90 s, Procfile platforms ~30 s
    "DB_TIMEOUT_S": (0, 60),  # a command waiting longer on a locked file is stuck anyway
    "SHARD_COUNT": (1, 100_000),  # Discord: one shard per ~1,000 servers
    "SHARD_ID": (0, 99_999),
    "QUEUE_CLAIM_TIMEOUT_S": (1, 3600),  # a silent worker's jobs go to another after this
}
_INT_RE = re.compile(r"[+-]?[0-9]+")
_FLOAT_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]{1,4})?")
# A plain hostname or an IPv4/IPv6 address (checked with ipaddress below).
_HOST_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
    r"(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class ConfigError(ValueError):
    """A bad environment variable; the message names it."""


def check_database_url(raw: str, name: str = "DATABASE_URL") -> str:
    """A PostgreSQL URL (postgresql://user:password@host:5432/dbname) as asyncpg reads
    it; ConfigError naming `name` otherwise. The value itself is never echoed: it holds
    a password."""
    example = "postgresql://user:password@host:5432/dbname"
    if any(c.isspace() or unicodedata.category(c).startswith("C") for c in raw):
        raise ConfigError(f"{name} contains spaces or control characters (expected {example})")
    try:
        parts = urlsplit(raw)
        parts.port  # noqa: B018  (raises ValueError for a port that is not 0-65535)
    except ValueError:
        raise ConfigError(f"{name} is not a valid URL (expected {example})") from None
    if parts.scheme not in ("postgresql", "postgres"):
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no postgresql:// scheme"
        raise ConfigError(f"{name} must be a PostgreSQL URL such as {example} (got {got})")
    if not (parts.hostname or "host=" in parts.query):
        raise ConfigError(f"{name} names no host (expected {example})")
    return raw


def _load_dotenv(path: Path) -> None:
    """./.env into os.environ (real variables win), its faults as one ConfigError."""
    try:
        load_dotenv(path, override=False)
    except UnicodeDecodeError as e:
        raise ConfigError(
            f"{path} is not UTF-8 text (byte 0x{e.object[e.start]:02x} at offset {e.start}); "
            "save it as UTF-8"
        ) from None
    except OSError as e:
        raise ConfigError(f"cannot read {path}: {e.strerror or e}") from None


@dataclass(frozen=True)
class Config:
    token: str | None = field(default=None, repr=False)  # never printed or logged
    slack_bot_token: str | None = field(default=None, repr=False)
    slack_app_token: str | None = field(default=None, repr=False)  # Socket Mode
    slack_signing_secret: str | None = field(default=None, repr=False)  # HTTP mode
    slack_port: int = 3000
    slack_host: str = "127.0.0.1"  # HTTP mode listens here; loopback behind a reverse proxy
    db_path: Path = Path("sitcom.db")
    # DATABASE_URL: PostgreSQL instead of the SQLite file db_path (holds a password)
    database_url: str | None = field(default=None, repr=False)
    checkpoints_dir: Path = Path("checkpoints")
    default_checkpoint: str = DEFAULT_MODEL
    humour_model: str = "humour"  # ranks best-of-n candidates; "off": coherence checks only
    admin_user_ids: frozenset[str] = frozenset()  # Discord ids (digits) and Slack ids (U…)
    dev_guild_id: int | None = None
    # Discord shards this process runs (SHARD_IDS of SHARD_COUNT; a cluster of processes on
    # one token splits them). None: every shard; a None count: Discord's recommended one.
    shard_ids: tuple[int, ...] | None = None
    shard_count: int | None = None
    max_queue: int = 32
    per_user_limit: int = 2
    timeout_s: float = 120.0
    shutdown_timeout_s: float = 25.0
    db_timeout_s: float = 5.0
    log_level: str = "INFO"
    # REDIS_URL: gateways queue scenes there for `python -m bot worker` (bot.queue); may
    # hold a password, so never printed.
    redis_url: str | None = field(default=None, repr=False)
    claim_timeout_s: float = 30.0  # QUEUE_CLAIM_TIMEOUT_S

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None, dotenv: bool = True) -> Config:
        if env is None:
            if dotenv:
                # Only ./.env: python-dotenv's default search walks up from this file's
                # folder, so a .env planted above a copy of the app would configure it.
                _load_dotenv(Path.cwd() / ".env")
            env = os.environ

        def get(name: str) -> str | None:
            value = env.get(name, "").strip()
            return value or None

        # Every default is the dataclass field's, written once above.
        default = {f.name: f.default for f in fields(cls)}

        def number(name: str, kind: type, default: float) -> float:
            raw = get(name)
            if raw is None:
                return default
            low, high = LIMITS[name]
            # ASCII only: int() and float() also read "٣٠٠" (Arabic-Indic digits) and
            # "1_0"; nan/inf would silently switch a limit off.
            pattern = _INT_RE if kind is int else _FLOAT_RE
            what = "a whole number" if kind is int else "a number"
            if not pattern.fullmatch(raw):
                raise ConfigError(
                    f"{name} must be {what} from {low:g} to {high:g} (got {raw[:40]!r})"
                )
            value = kind(raw)
            if not (math.isfinite(value) and low <= value <= high):
                raise ConfigError(f"{name} must be from {low:g} to {high:g} (got {raw[:40]!r})")
            return value

        def shards(
            ids: str | None, one: str | None, count: str | None
        ) -> tuple[tuple[int, ...] | None, int | None]:
            # SHARD_IDS=0,1 of SHARD_COUNT=4; SHARD_ID=1 is the one-shard form of SHARD_IDS;
            # SHARD_COUNT alone: every shard in this process.
            if ids is not None and one is not None:
                raise ConfigError("set SHARD_IDS or SHARD_ID, not both (SHARD_IDS=0,1)")
            name, raw = ("SHARD_ID", one) if one is not None else ("SHARD_IDS", ids)
            if raw is not None and count is None:
                raise ConfigError(
                    f"{name} needs SHARD_COUNT beside it (e.g. SHARD_IDS=0,1 SHARD_COUNT=4)"
                )
            if count is None:
                return None, None
            total = int(number("SHARD_COUNT", int, 1))
            if raw is None:
                return None, total
            if name == "SHARD_ID":
                shard = int(number("SHARD_ID", int, 0))
                if shard >= total:
                    raise ConfigError(f"SHARD_ID must be below SHARD_COUNT ({total})")
                return (shard,), total
            parts = [part.strip() for part in raw.split(",")]
            if not all(re.fullmatch(r"[0-9]{1,6}", part) for part in parts):
                raise ConfigError(
                    f"SHARD_IDS must be shard numbers separated by commas, such as 0,1 "
                    f"(got {raw[:40]!r})"
                )
            found: list[int] = []
            for shard in map(int, parts):
                if shard >= total:
                    raise ConfigError(
                        f"SHARD_IDS: shard {shard} is not below SHARD_COUNT ({total}); "
                        f"shards are numbered 0 to {total - 1}"
                    )
                if shard in found:
                    raise ConfigError(f"SHARD_IDS names shard {shard} twice")
                found.append(shard)
            return tuple(found), total

        def snowflake(name: str, raw: str) -> int:
            # ASCII digits: str.isdigit() also accepts "²", which int() then refuses.
            if not re.fullmatch(r"[0-9]{1,20}", raw):
                raise ConfigError(f"{name} must hold Discord ids (digits), got {raw[:40]!r}")
            return int(raw)

        def host(name: str, default: str) -> str:
            raw = get(name)
            if raw is None:
                return default
            try:
                return str(ipaddress.ip_address(raw.strip("[]")))
            except ValueError:
                pass
            if len(raw) > 253 or not _HOST_RE.fullmatch(raw):
                raise ConfigError(
                    f"{name} must be an IP address or a host name such as "
                    f"127.0.0.1, 0.0.0.0 or localhost (got {raw[:40]!r})"
                )
            return raw

        def user_id(name: str, raw: str) -> str:
            # Discord: a snowflake; Slack: a member id such as U0123ABCD or W0123ABCD.
            if not re.fullmatch(r"[0-9]{1,20}|[UW][A-Z0-9]{2,20}", raw):
                raise ConfigError(
                    f"{name} must hold Discord user ids (digits) or Slack member ids "
                    f"(U0123ABCD), got {raw!r}"
                )
            return raw

        def secret(name: str, prefix: str) -> str | None:
            value = get(name)
            # Never echo the value: it may be some other secret pasted by mistake.
            if value is not None and prefix and not value.startswith(prefix):
                raise ConfigError(f"{name} must start with {prefix} (see .env.example)")
            if value and any(c.isspace() or unicodedata.category(c).startswith("C") for c in value):
                raise ConfigError(
                    f"{name} contains spaces or control characters; copy it "
                    "again from api.slack.com/apps"
                )
            return value

        token = get("DISCORD_TOKEN")
        if token and any(c.isspace() or unicodedata.category(c).startswith("C") for c in token):
            # aiohttp would refuse it as a header deep inside login, with a traceback.
            raise ConfigError(
                "DISCORD_TOKEN contains spaces or control characters; copy it "
                "again from the Developer Portal (Bot > Reset Token)"
            )
        admins = get("ADMIN_USER_IDS") or ""
        guild = get("DEV_GUILD_ID")
        level = (get("LOG_LEVEL") or default["log_level"]).upper()
        if level not in ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"):
            raise ConfigError(f"LOG_LEVEL must be DEBUG, INFO, WARNING or ERROR (got {level!r})")
        slack_bot = secret("SLACK_BOT_TOKEN", "xoxb-")
        slack_app = secret("SLACK_APP_TOKEN", "xapp-")
        signing = secret("SLACK_SIGNING_SECRET", "")
        if slack_bot and not (slack_app or signing):
            raise ConfigError(
                "SLACK_BOT_TOKEN needs SLACK_APP_TOKEN (Socket Mode) or SLACK_SIGNING_SECRET "
                "(HTTP mode) beside it"
            )
        shard_ids, shard_count = shards(get("SHARD_IDS"), get("SHARD_ID"), get("SHARD_COUNT"))
        if (slack_app or signing) and not slack_bot:
            raise ConfigError("SLACK_APP_TOKEN / SLACK_SIGNING_SECRET need SLACK_BOT_TOKEN")
        redis_url = get("REDIS_URL")
        if redis_url is not None:
            check_redis_url(redis_url)
        try:  # read by the engine from os.environ; checked here so the bot stops at once
            parse_threads(get("SITCOM_THREADS"))
        except ValueError as e:
            raise ConfigError(str(e)) from None
        return cls(
            slack_bot_token=slack_bot,
            slack_app_token=slack_app,
            slack_signing_secret=signing,
            slack_port=int(number("SLACK_PORT", int, default["slack_port"])),
            slack_host=host("SLACK_HOST", default["slack_host"]),
            token=token,
            db_path=Path(get("BOT_DB") or default["db_path"]).expanduser(),
            database_url=check_database_url(url) if (url := get("DATABASE_URL")) else None,
            checkpoints_dir=Path(get("CHECKPOINTS_DIR") or default["checkpoints_dir"]).expanduser(),
            default_checkpoint=get("DEFAULT_CHECKPOINT") or default["default_checkpoint"],
            humour_model=get("HUMOUR_MODEL") or default["humour_model"],
            admin_user_ids=frozenset(
                user_id("ADMIN_USER_IDS", part.strip()) for part in admins.replace(",", " ").split()
            ),
            dev_guild_id=snowflake("DEV_GUILD_ID", guild) if guild else None,
            shard_ids=shard_ids,
            shard_count=shard_count,
            max_queue=int(number("QUEUE_SIZE", int, default["max_queue"])),
            per_user_limit=int(number("PER_USER_LIMIT", int, default["per_user_limit"])),
            timeout_s=float(number("GENERATION_TIMEOUT_S", float, default["timeout_s"])),
            shutdown_timeout_s=float(
                number("SHUTDOWN_TIMEOUT_S", float, default["shutdown_timeout_s"])
            ),
            db_timeout_s=float(number("DB_TIMEOUT_S", float, default["db_timeout_s"])),
            log_level=level,
            redis_url=redis_url,
            claim_timeout_s=float(
                number("QUEUE_CLAIM_TIMEOUT_S", float, default["claim_timeout_s"])
            ),
        )


def check_redis_url(url: str) -> None:
    """ConfigError (one line, never echoing a password) unless `url` is a Redis URL
    redis-py reads: redis://[user:password@]host[:port][/db], rediss://… (TLS) or
    unix:///path/to/redis.sock."""
    from urllib.parse import urlsplit

    hint = "REDIS_URL must look like redis://HOST:6379/0, rediss://… or unix:///path/redis.sock"
    try:
        parts = urlsplit(url)
        port = parts.port  # ValueError when it is not a number in 0-65535
    except ValueError:
        raise ConfigError(f"{hint} (its port is not a number from 1 to 65535)") from None
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ConfigError(f"{hint} (got scheme {parts.scheme or 'none'!r})")
    if parts.scheme == "unix":
        if not parts.path:
            raise ConfigError(f"{hint} (the unix socket path is missing)")
        return
    if not parts.hostname:
        raise ConfigError(f"{hint} (the host is missing)")
    if port == 0:
        raise ConfigError(f"{hint} (its port is not a number from 1 to 65535)")
    db = parts.path.strip("/")
    if db and not re.fullmatch(r"[0-9]{1,5}", db):
        raise ConfigError(f"{hint} (the database after the / must be a number)")
