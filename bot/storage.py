"""Which storage the bot runs on: SQLite (the embedded default, bot.db) or PostgreSQL
(DATABASE_URL, bot.pg), behind the same Database API. Its own module so that neither backend
imports the other's chooser (bot.pg builds on bot.db)."""

from __future__ import annotations

from pathlib import Path

from .db import Database
from .pg import PostgresDatabase


async def open_database(target: str | Path, timeout: float = 5.0) -> Database:
    """The bot's storage: a postgresql:// (or postgres://) URL opens PostgreSQL
    (bot.pg.PostgresDatabase), anything else is a SQLite file path (Database)."""
    if isinstance(target, str) and target.startswith(("postgresql://", "postgres://")):
        return await PostgresDatabase.open(target, timeout=timeout)
    return await Database.open(target, timeout=timeout)
