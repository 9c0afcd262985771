"""SQLite storage (aiosqlite): channel settings, scenes and their lines, votes, bot state.

One connection per process, WAL mode, foreign keys on. Every write runs in its own
`BEGIN IMMEDIATE` transaction; the schema comes from bot/migrations/NNNN_name.sql, applied in
order and tracked with PRAGMA user_version. Any SQLite failure surfaces as DatabaseError,
whose message is fit to show a user.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import aiosqlite

from sitcom.settings import SceneSettings

log = logging.getLogger(__name__)

_SETTING_COLUMNS = tuple(f.name for f in fields(SceneSettings))


class DatabaseError(RuntimeError):
    """The database cannot be used right now; str(e) is a polite one-liner."""


@dataclass(frozen=True)
class StoredScene:
    id: int
    line_ids: list[int]


@dataclass(frozen=True)
class RankedLine:
    scene_id: int
    line_no: int
    text: str
    votes: int
    channel_id: int


def migrations() -> list[tuple[int, str, str]]:
    """(version, name, sql) for every bundled migration, in order."""
    found = []
    for entry in resources.files("bot").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            found.append((int(m.group(1)), m.group(2), entry.read_text(encoding="utf-8")))
    return sorted(found)


class Database:
    def __init__(self, path: Path, conn: aiosqlite.Connection) -> None:
        self.path = path
        self._conn = conn
        # One shared connection: transactions from concurrent commands must not interleave.
        self._lock = asyncio.Lock()

    @classmethod
    async def open(cls, path: str | Path, timeout: float = 5.0) -> Database:
        path = Path(path)
        if path.is_dir():
            raise DatabaseError(f"cannot open the database {path}: it is a directory")
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            conn = await aiosqlite.connect(path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            # aiosqlite stops its worker thread without awaiting it; give it a moment so
            # it doesn't report to an event loop that is already gone.
            await asyncio.sleep(0.1)
            raise DatabaseError(f"cannot open the database {path}: {e}") from e
        db = cls(path, conn)
        try:
            await conn.execute("PRAGMA foreign_keys = ON")
            await db._refuse_newer()  # before anything writes, even the journal mode
            await conn.execute("PRAGMA journal_mode = WAL")
            await db._migrate()
        except (sqlite3.Error, DatabaseError) as e:
            await conn.close()
            raise DatabaseError(f"cannot prepare the database {path}: {e}") from e
        return db

    async def close(self) -> None:
        async with self._lock:
            await self._conn.close()

    async def schema_version(self) -> int:
        async with self._conn.execute("PRAGMA user_version") as cur:
            return (await cur.fetchone())[0]

    async def _refuse_newer(self) -> None:
        current = await self.schema_version()
        known = max((version for version, _, _ in migrations()), default=0)
        if current > known:
            raise DatabaseError(
                f"it is at schema version {current}, newer than this bot's {known} (written by "
                "a newer version); run that version or point BOT_DB at another file"
            )

    async def _migrate(self) -> None:
        current = await self.schema_version()
        for version, name, sql in migrations():
            if version <= current:
                continue
            log.info("applying migration %04d_%s", version, name)
            # executescript commits any open transaction first, so the script carries its own.
            try:
                await self._conn.executescript(
                    f"BEGIN IMMEDIATE;\n{sql}\nPRAGMA user_version = {version};\nCOMMIT;"
                )
            except sqlite3.Error:
                if self._conn.in_transaction:
                    await self._conn.execute("ROLLBACK")
                raise

    # -- plumbing ------------------------------------------------------------------------

    def _check_file(self) -> None:
        # SQLite keeps writing to an unlinked file without complaint; everything would be lost.
        if not self.path.exists():
            raise DatabaseError(
                "The bot's database file has gone missing; an admin needs to restore it "
                "or restart the bot."
            )

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except sqlite3.OperationalError as e:
            log.warning("database error: %s", e)
            if "locked" in str(e) or "busy" in str(e):
                raise DatabaseError(
                    "The database is busy right now; please try again in a moment."
                ) from e
            raise DatabaseError("The bot's database is unavailable right now; sorry!") from e
        except sqlite3.Error as e:
            log.exception("database error")
            raise DatabaseError("The bot's database is unavailable right now; sorry!") from e

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[aiosqlite.Connection]:
        async with self._lock, self._guard():
            self._check_file()
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                yield self._conn
            except BaseException:
                await self._conn.execute("ROLLBACK")
                raise
            await self._conn.execute("COMMIT")

    async def _fetch(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        async with self._lock, self._guard():
            self._check_file()
            async with self._conn.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())

    # -- settings ------------------------------------------------------------------------

    async def get_settings(self, channel_id: int) -> SceneSettings:
        rows = await self._fetch(
            f"SELECT {', '.join(_SETTING_COLUMNS)} FROM channel_settings WHERE channel_id = ?",
            (channel_id,),
        )
        if not rows:
            return SceneSettings()
        return SceneSettings(**dict(zip(_SETTING_COLUMNS, rows[0], strict=True)))

    async def save_settings(
        self, guild_id: int, channel_id: int, user_id: int, settings: SceneSettings
    ) -> None:
        values = settings.validated().as_dict()
        cols = ", ".join(_SETTING_COLUMNS)
        marks = ", ".join("?" for _ in _SETTING_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _SETTING_COLUMNS)
        async with self._write() as conn:
            await conn.execute(
                f"INSERT INTO channel_settings (channel_id, guild_id, updated_by, {cols}) "
                f"VALUES (?, ?, ?, {marks}) ON CONFLICT(channel_id) DO UPDATE SET {updates}, "
                "updated_by = excluded.updated_by, updated_at = datetime('now')",
                (channel_id, guild_id, user_id, *(values[c] for c in _SETTING_COLUMNS)),
            )

    async def reset_settings(self, channel_id: int) -> bool:
        async with self._write() as conn:
            cur = await conn.execute(
                "DELETE FROM channel_settings WHERE channel_id = ?", (channel_id,)
            )
            return cur.rowcount > 0

    # -- scenes and lines ----------------------------------------------------------------

    async def add_scene(
        self, *, guild_id: int, channel_id: int, user_id: int, prompt: str, model_name: str,
        lines: list[str], new_tokens: int, seconds: float,
    ) -> StoredScene:
        async with self._write() as conn:
            cur = await conn.execute(
                "INSERT INTO scenes (guild_id, channel_id, user_id, prompt, model_name, "
                "new_tokens, seconds) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (guild_id, channel_id, user_id, prompt, model_name, new_tokens, seconds),
            )
            scene_id = cur.lastrowid
            line_ids = []
            for no, text in enumerate(lines, start=1):
                cur = await conn.execute(
                    "INSERT INTO lines (scene_id, line_no, text) VALUES (?, ?, ?)",
                    (scene_id, no, text),
                )
                line_ids.append(cur.lastrowid)
        return StoredScene(scene_id, line_ids)

    async def place_lines(self, message_id: int, line_ids: list[int]) -> None:
        """Record that message_id shows these lines, keycap 1 for the first."""
        async with self._write() as conn:
            await conn.executemany(
                "UPDATE lines SET message_id = ?, slot = ? WHERE id = ?",
                [(message_id, slot, line_id) for slot, line_id in enumerate(line_ids, start=1)],
            )

    async def line_at(self, message_id: int, slot: int) -> int | None:
        rows = await self._fetch(
            "SELECT id FROM lines WHERE message_id = ? AND slot = ?", (message_id, slot)
        )
        return rows[0][0] if rows else None

    async def scene_line(self, scene_id: int, line_no: int) -> int | None:
        rows = await self._fetch(
            "SELECT id FROM lines WHERE scene_id = ? AND line_no = ?", (scene_id, line_no)
        )
        return rows[0][0] if rows else None

    # -- votes ---------------------------------------------------------------------------

    async def add_vote(self, user_id: int, line_id: int) -> bool:
        """False when this user already voted for this line."""
        async with self._write() as conn:
            cur = await conn.execute(
                "INSERT INTO votes (line_id, user_id) VALUES (?, ?) "
                "ON CONFLICT(user_id, line_id) DO NOTHING",
                (line_id, user_id),
            )
            return cur.rowcount > 0

    async def remove_vote(self, user_id: int, line_id: int) -> bool:
        async with self._write() as conn:
            cur = await conn.execute(
                "DELETE FROM votes WHERE line_id = ? AND user_id = ?", (line_id, user_id)
            )
            return cur.rowcount > 0

    async def best(
        self, guild_id: int, channel_id: int | None = None, limit: int = 10
    ) -> list[RankedLine]:
        where, params = "s.guild_id = ?", [guild_id]
        if channel_id is not None:
            where += " AND s.channel_id = ?"
            params.append(channel_id)
        rows = await self._fetch(
            "SELECT s.id, l.line_no, l.text, COUNT(v.id) AS n, s.channel_id "
            "FROM votes v JOIN lines l ON l.id = v.line_id JOIN scenes s ON s.id = l.scene_id "
            f"WHERE {where} GROUP BY l.id ORDER BY n DESC, MIN(v.id) LIMIT ?",
            (*params, limit),
        )
        return [RankedLine(*row) for row in rows]

    # -- bot state -----------------------------------------------------------------------

    async def get_state(self, key: str) -> str | None:
        rows = await self._fetch("SELECT value FROM bot_state WHERE key = ?", (key,))
        return rows[0][0] if rows else None

    async def set_state(self, key: str, value: str) -> None:
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO bot_state (key, value) VALUES (?, ?) "
                "ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                (key, value),
            )
