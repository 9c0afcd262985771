"""SQLite storage (aiosqlite): channel settings, scenes and their lines, votes, bot state.

Every row is keyed by platform ("discord", "slack", "console") with string ids.

One connection per process, WAL mode, foreign keys on. Every write runs in its own
`BEGIN IMMEDIATE` transaction; the schema comes from bot/migrations/NNNN_name.sql, applied in
order and tracked with PRAGMA user_version. Any SQLite failure surfaces as DatabaseError,
whose message is fit to show a user.

The same API runs on PostgreSQL (bot/pg.py, DATABASE_URL); bot.storage.open_database picks
the backend.
The queries here are written once for both (`?` placeholders, datetime('now'), ON CONFLICT).
"""

from __future__ import annotations

import asyncio
import errno
import logging
import os
import random
import re
import sqlite3
import time
from collections.abc import AsyncIterator, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, fields
from importlib import resources
from pathlib import Path

import aiosqlite

from sitcom.settings import SceneSettings

log = logging.getLogger(__name__)
SETUP_TIMEOUT_S = 60.0  # how long opening waits for other processes' setup (locks)

_SETTING_COLUMNS = tuple(f.name for f in fields(SceneSettings))


_SCENE_COLUMNS = "platform, guild_id, channel_id, note, posted_at"
_LINES_OF_SCENE = (
    "SELECT id, line_no, text, from_prompt, message_id FROM lines WHERE scene_id = ? "
    "ORDER BY line_no"
)


def _stored_scene(scene_id: int, scene_row, line_rows) -> StoredScene:
    """A StoredScene from a row of _SCENE_COLUMNS and rows of _LINES_OF_SCENE."""
    platform, guild_id, channel_id, note, posted_at = scene_row
    return StoredScene(
        scene_id,
        Place(platform, guild_id, channel_id),
        [StoredLine(i, no, text, bool(own), mid) for i, no, text, own, mid in line_rows],
        note,
        posted=posted_at is not None,
    )


class DatabaseError(RuntimeError):
    """The database cannot be used right now; str(e) is a polite one-liner."""


class LeaseHeld(DatabaseError):
    """Another live process holds the lease (see Database.acquire_lease)."""

    def __init__(self, scope: str, shard: tuple[int, int], host: str, pid: int) -> None:
        self.scope, self.shard, self.host, self.pid = scope, shard, host, pid
        super().__init__(
            f"another process already runs this bot ({scope}, shard {shard[0]} of {shard[1]}): "
            f"pid {pid} on host {host}; stop it first, or give each process its own shards "
            "(SHARD_IDS, SHARD_COUNT)"
        )


CLAIM_STALE = "-10 minutes"  # a posting claim older than this belongs to a dead process


@dataclass(frozen=True)
class Place:
    """Where a scene or setting lives: ids are strings on every platform."""

    platform: str  # "discord", "slack", "console"
    guild_id: str  # Discord server / Slack workspace (team)
    channel_id: str


@dataclass(frozen=True)
class StoredLine:
    id: int
    line_no: int
    text: str
    from_prompt: bool  # the user's own opening line: shown, not votable
    message_id: str | None  # None until posted
    slot: int | None = None  # the keycap that votes for it on message_id (scene_line only)


@dataclass(frozen=True)
class StoredScene:
    id: int
    place: Place
    lines: list[StoredLine]
    note: str | None = None  # e.g. why it is partial
    posted: bool = False

    @property
    def line_ids(self) -> list[int]:
        return [line.id for line in self.lines]


@dataclass(frozen=True)
class RankedLine:
    scene_id: int
    line_no: int
    text: str
    votes: int
    channel_id: str


DIALECTS = ("sqlite", "postgresql")
_DIALECT_MARK = re.compile(r"-- dialect: (sqlite|postgresql|all)[ \t]*")


def for_dialect(sql: str, dialect: str) -> str:
    """The text of one migration as `dialect` runs it.

    Both backends run the same numbered files, bot/migrations/NNNN_name.sql. Most
    statements are the same text for both; where the dialects differ (SQLite's INTEGER
    PRIMARY KEY rowids vs PostgreSQL identity columns, REAL meaning float4 on PostgreSQL,
    SQLite-only functions), the file holds both texts in marked sections: a line
    `-- dialect: sqlite` or `-- dialect: postgresql` starts a section only that backend
    runs, `-- dialect: all` goes back to text both run. Marker lines are comments
    between statements, so the SQLite schema (sqlite_master) is byte-for-byte what it
    was before the PostgreSQL sections were added."""
    if dialect not in DIALECTS:
        raise ValueError(f"unknown SQL dialect {dialect!r}")
    kept, current = [], "all"
    for line in sql.splitlines(keepends=True):
        mark = _DIALECT_MARK.fullmatch(line.rstrip("\r\n"))
        if mark:
            current = mark.group(1)
        elif current in ("all", dialect):
            kept.append(line)
    return "".join(kept)


def migrations(dialect: str = "sqlite") -> list[tuple[int, str, str]]:
    """(version, name, sql) for every bundled migration, in order, as `dialect` runs it
    (see for_dialect)."""
    found = []
    for entry in resources.files("bot").joinpath("migrations").iterdir():
        m = re.fullmatch(r"(\d{4})_(\w+)\.sql", entry.name)
        if m:
            text = for_dialect(entry.read_text(encoding="utf-8"), dialect)
            found.append((int(m.group(1)), m.group(2), text))
    return sorted(found)


def _statements(sql: str) -> list[str]:
    """A migration script's statements, one by one (sqlite3.complete_statement finds where
    each ends, so a ';' inside a string or a comment does not split it)."""
    found: list[str] = []
    pending = ""
    for line in sql.splitlines(keepends=True):
        pending += line
        if sqlite3.complete_statement(pending):
            found.append(pending.strip())
            pending = ""
    if pending.strip() and not all(
        part.strip().startswith("--") or not part.strip() for part in pending.splitlines()
    ):
        found.append(pending.strip())  # a last statement without its ';' (SQLite reports it)
    return found


def _read_only_fs(path: Path) -> bool:
    """True when the file (or, for a new one, its folder) is on a read-only mount."""
    try:
        return bool(os.statvfs(path if path.exists() else path.parent).f_flag & os.ST_RDONLY)
    except OSError:
        return False


def _busy(error: sqlite3.Error) -> bool:
    """SQLite's "database is locked" / "database is busy": another connection holds the lock."""
    return "locked" in str(error) or "busy" in str(error)


def _why(path: Path, error: BaseException) -> str:
    """The reason for a failed open, with read-only files and folders said plainly."""
    if isinstance(error, DatabaseError):
        return str(error)
    if (isinstance(error, OSError) and error.errno == errno.EROFS) or _read_only_fs(path):
        return "it is on a read-only filesystem; point BOT_DB at a writable place"
    text = str(error)
    if isinstance(error, sqlite3.Error) and ("readonly" in text or "unable to open" in text):
        for place in (path, path.parent):  # WAL needs to create files beside it, too
            if place.exists() and not os.access(place, os.W_OK):
                return (
                    f"{place} is read-only for this user (permissions); make it "
                    "writable or point BOT_DB at a writable place"
                )
    return text


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
        except OSError as e:
            raise DatabaseError(f"cannot open the database {path}: {_why(path, e)}") from e
        if _read_only_fs(path):
            # SQLite would open it read-only without a word and fail at the first write
            # (or say "unable to open database file" for a new one).
            raise DatabaseError(
                f"cannot open the database {path}: it is on a read-only "
                "filesystem; point BOT_DB at a writable place"
            )
        try:
            conn = await aiosqlite.connect(path, timeout=timeout, isolation_level=None)
        except (OSError, sqlite3.Error) as e:
            # aiosqlite stops its worker thread without awaiting it; give it a moment so
            # it doesn't report to an event loop that is already gone.
            await asyncio.sleep(0.1)
            raise DatabaseError(f"cannot open the database {path}: {_why(path, e)}") from e
        db = cls(path, conn)
        try:
            # Processes starting at once on a new file wait for each other's migrations and
            # journal-mode switch: on a busy machine that can take longer than a command may
            # wait later, so the setup waits up to SETUP_TIMEOUT_S.
            await conn.execute(f"PRAGMA busy_timeout = {int(max(timeout, SETUP_TIMEOUT_S) * 1000)}")
            await conn.execute("PRAGMA foreign_keys = ON")
            await db._refuse_newer()  # before anything writes, even the journal mode
            await db._refuse_damaged()
            await db._switch_to_wal(asyncio.get_running_loop().time() + SETUP_TIMEOUT_S)
            await db._migrate()
            await conn.execute(f"PRAGMA busy_timeout = {int(timeout * 1000)}")
        except (sqlite3.Error, DatabaseError) as e:
            await conn.close()
            raise DatabaseError(f"cannot prepare the database {path}: {_why(path, e)}") from e
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

    async def _refuse_damaged(self) -> None:
        """PRAGMA quick_check: a damaged file (a page overwritten, a torn copy) would keep
        taking scenes and lose them, or fail at random later."""
        try:
            async with self._conn.execute("PRAGMA quick_check(3)") as cur:
                problems = [row[0] for row in await cur.fetchall()]
        except sqlite3.DatabaseError as e:  # "file is not a database", "malformed"
            problems = [str(e)]
        if problems != ["ok"]:
            first = " ".join(str(problems[0]).split())[:120] if problems else "no answer"
            raise DatabaseError(
                f"it is damaged (SQLite's quick_check: {first}); restore it from a backup "
                "or point BOT_DB at a new file"
            )

    async def _switch_to_wal(self, deadline: float) -> None:
        """PRAGMA journal_mode = WAL, again while another process holds the lock. Two
        processes switching a new file at once both read its header and then both ask for the
        write lock; SQLite answers one of them "database is locked" at once, without waiting
        on busy_timeout (waiting there could deadlock), so the wait is here."""
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self._conn.execute("PRAGMA journal_mode = WAL")
                return
            except sqlite3.OperationalError as e:
                if not _busy(e) or loop.time() > deadline:
                    raise
            await asyncio.sleep(random.uniform(0.01, 0.1))

    async def _migrate(self) -> None:
        for version, name, sql in migrations():
            if version <= await self.schema_version():
                continue
            # The version is read again under the write lock: processes starting at once on
            # a new file (a gateway and its workers) wait for each other, and the one that
            # comes second finds the migration applied. Statement by statement, because
            # executescript would commit the open transaction (and drop the lock) first.
            await self._conn.execute("BEGIN IMMEDIATE")
            try:
                if version > await self.schema_version():
                    log.info("applying migration %04d_%s", version, name)
                    for statement in _statements(sql):
                        await self._conn.execute(statement)
                    await self._conn.execute(f"PRAGMA user_version = {version}")
                await self._conn.execute("COMMIT")
            except BaseException:
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
            if _busy(e):
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

    async def _serialize(self, conn: aiosqlite.Connection, key: str) -> None:
        """Make transactions on `key` run one after another across processes. SQLite:
        nothing to do, BEGIN IMMEDIATE already admits one writer at a time."""

    async def _fetch(self, sql: str, params: Iterable = ()) -> list[sqlite3.Row]:
        async with self._lock, self._guard():
            self._check_file()
            async with self._conn.execute(sql, tuple(params)) as cur:
                return list(await cur.fetchall())

    # -- settings ------------------------------------------------------------------------

    async def get_settings(self, platform: str, channel_id: str) -> SceneSettings:
        rows = await self._fetch(
            f"SELECT {', '.join(_SETTING_COLUMNS)} FROM channel_settings "
            "WHERE platform = ? AND channel_id = ?",
            (platform, str(channel_id)),
        )
        if not rows:
            return SceneSettings()
        stored = dict(zip(_SETTING_COLUMNS, rows[0], strict=True))
        # NULL: a column added after the row was saved; it follows the current default.
        return SceneSettings(**{k: v for k, v in stored.items() if v is not None})

    async def save_settings(self, place: Place, user_id: str, settings: SceneSettings) -> None:
        values = settings.validated().as_dict()
        cols = ", ".join(_SETTING_COLUMNS)
        marks = ", ".join("?" for _ in _SETTING_COLUMNS)
        updates = ", ".join(f"{c} = excluded.{c}" for c in _SETTING_COLUMNS)
        async with self._write() as conn:
            await conn.execute(
                "INSERT INTO channel_settings (platform, channel_id, guild_id, updated_by, "
                f"{cols}) VALUES (?, ?, ?, ?, {marks}) "
                f"ON CONFLICT(platform, channel_id) DO UPDATE SET {updates}, "
                "updated_by = excluded.updated_by, updated_at = datetime('now')",
                (
                    place.platform,
                    place.channel_id,
                    place.guild_id,
                    str(user_id),
                    *(values[c] for c in _SETTING_COLUMNS),
                ),
            )

    async def reset_settings(self, platform: str, channel_id: str) -> bool:
        async with self._write() as conn:
            cur = await conn.execute(
                "DELETE FROM channel_settings WHERE platform = ? AND channel_id = ?",
                (platform, str(channel_id)),
            )
            return cur.rowcount > 0

    # -- scenes and lines ----------------------------------------------------------------

    async def add_scene(
        self,
        *,
        place: Place,
        user_id: str,
        prompt: str,
        model_name: str,
        lines: list[str],
        prompt_lines: int,
        new_tokens: int,
        seconds: float,
        note: str | None = None,
        claimed: bool = False,
        job_id: str | None = None,
    ) -> StoredScene:
        """Store a finished scene before anything is posted; the first `prompt_lines`
        lines are the user's own and never votable. `claimed`: stored already claimed for
        its posting (see claim_posting), until release_posting or mark_posted.

        `job_id`: the queue job (bot.queue) the scene was written for. A job whose scene
        is stored already gets that StoredScene back (its id and lines, as stored) and
        nothing is written or claimed: a worker that took over the job of one killed right
        after storing it does not store it twice. The unique index on scenes.job_id decides
        (ON CONFLICT DO NOTHING), so workers storing one job at once leave one row."""
        async with self._write() as conn:
            cur = await conn.execute(
                "INSERT INTO scenes (platform, guild_id, channel_id, user_id, prompt, model_name, "
                "new_tokens, seconds, note, claimed_at, job_id) "
                "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, CASE WHEN ? THEN datetime('now') END, ?) "
                "ON CONFLICT (job_id) WHERE job_id IS NOT NULL DO NOTHING "
                "RETURNING id",
                (
                    place.platform,
                    place.guild_id,
                    place.channel_id,
                    str(user_id),
                    prompt,
                    model_name,
                    new_tokens,
                    seconds,
                    note,
                    claimed,
                    job_id,
                ),
            )
            inserted = await cur.fetchall()
            if not inserted:  # this job's scene is stored already (job_id is unique)
                return await self._job_scene(conn, str(job_id))
            scene_id = inserted[0][0]
            stored = []
            for no, text in enumerate(lines, start=1):
                own = no <= prompt_lines
                cur = await conn.execute(
                    "INSERT INTO lines (scene_id, line_no, text, from_prompt) VALUES (?, ?, ?, ?) "
                    "RETURNING id",
                    (scene_id, no, text, own),
                )
                stored.append(StoredLine((await cur.fetchall())[0][0], no, text, own, None))
        return StoredScene(scene_id, place, stored, note, posted=False)

    async def _job_scene(self, conn: aiosqlite.Connection, job_id: str) -> StoredScene:
        """The scene stored for queue job `job_id`, read inside the caller's transaction."""
        async with conn.execute(
            f"SELECT id, {_SCENE_COLUMNS} FROM scenes WHERE job_id = ?", (job_id,)
        ) as cur:
            scene_id, *row = await cur.fetchone()
        async with conn.execute(_LINES_OF_SCENE, (scene_id,)) as cur:
            return _stored_scene(scene_id, row, await cur.fetchall())

    async def get_scene(self, scene_id: int) -> StoredScene | None:
        rows = await self._fetch(f"SELECT {_SCENE_COLUMNS} FROM scenes WHERE id = ?", (scene_id,))
        if not rows:
            return None
        return _stored_scene(scene_id, rows[0], await self._fetch(_LINES_OF_SCENE, (scene_id,)))

    async def place_lines(self, message_id: str, placed: list[tuple[int, int | None]]) -> None:
        """Record that message_id shows these (line id, keycap slot or None) pairs."""
        async with self._write() as conn:
            await conn.executemany(
                "UPDATE lines SET message_id = ?, slot = ? WHERE id = ?",
                [(str(message_id), slot, line_id) for line_id, slot in placed],
            )

    async def mark_posted(self, scene_id: int) -> None:
        async with self._write() as conn:
            await conn.execute(
                "UPDATE scenes SET posted_at = datetime('now'), claimed_at = NULL WHERE id = ?",
                (scene_id,),
            )

    async def claim_posting(self, scene_id: int) -> str:
        """Claim a stored scene for posting, in one transaction: "claimed" (post it, then
        release_posting), "posted" (every message is out), "busy" (someone is posting it
        now) or "missing". A claim older than CLAIM_STALE (a process died) is taken over."""
        async with self._write() as conn:
            cur = await conn.execute(
                "UPDATE scenes SET claimed_at = datetime('now') WHERE id = ? "
                "AND posted_at IS NULL AND (claimed_at IS NULL OR claimed_at < datetime('now', ?))",
                (scene_id, CLAIM_STALE),
            )
            if cur.rowcount:
                return "claimed"
            async with conn.execute(
                "SELECT posted_at FROM scenes WHERE id = ?", (scene_id,)
            ) as rows:
                row = await rows.fetchone()
        if row is None:
            return "missing"
        return "posted" if row[0] is not None else "busy"

    async def release_posting(self, scene_id: int) -> None:
        async with self._write() as conn:
            await conn.execute("UPDATE scenes SET claimed_at = NULL WHERE id = ?", (scene_id,))

    async def line_at(self, platform: str, message_id: str, slot: int) -> int | None:
        """The votable line a keycap on that message stands for, if any."""
        rows = await self._fetch(
            "SELECT l.id FROM lines l JOIN scenes s ON s.id = l.scene_id "
            "WHERE l.message_id = ? AND l.slot = ? AND s.platform = ? AND NOT l.from_prompt",
            (str(message_id), slot, platform),
        )
        return rows[0][0] if rows else None

    async def scene_line(self, platform: str, scene_id: int, line_no: int) -> StoredLine | None:
        rows = await self._fetch(
            "SELECT l.id, l.line_no, l.text, l.from_prompt, l.message_id, l.slot "
            "FROM lines l JOIN scenes s ON s.id = l.scene_id "
            "WHERE l.scene_id = ? AND l.line_no = ? AND s.platform = ?",
            (scene_id, line_no, platform),
        )
        if not rows:
            return None
        i, no, text, own, mid, slot = rows[0]
        return StoredLine(i, no, text, bool(own), mid, slot)

    # -- votes ---------------------------------------------------------------------------

    async def add_vote(
        self,
        user_id: str,
        line_id: int,
        event: tuple[str, str] | None = None,
        at: int | None = None,
    ) -> bool:
        """False when this user already voted for this line, `event` (platform, event id)
        was applied before (a redelivery), or `at` (when it happened, integer microseconds)
        is older than the latest event applied for this user and line (out of order)."""
        return await self._vote(
            "INSERT INTO votes (line_id, user_id) VALUES (?, ?) "
            "ON CONFLICT(user_id, line_id) DO NOTHING",
            line_id,
            user_id,
            event,
            at,
        )

    async def remove_vote(
        self,
        user_id: str,
        line_id: int,
        event: tuple[str, str] | None = None,
        at: int | None = None,
    ) -> bool:
        return await self._vote(
            "DELETE FROM votes WHERE line_id = ? AND user_id = ?", line_id, user_id, event, at
        )

    async def _vote(
        self,
        sql: str,
        line_id: int,
        user_id: str,
        event: tuple[str, str] | None,
        at: int | None,
    ) -> bool:
        # The event id and the vote change commit together: a redelivered event finds its id
        # and changes nothing; a failed one left no id behind and is applied when redelivered.
        async with self._write() as conn:
            if event is not None:
                cur = await conn.execute(
                    "INSERT INTO seen_events (platform, event_id) VALUES (?, ?) "
                    "ON CONFLICT DO NOTHING",
                    event,
                )
                if cur.rowcount == 0:
                    return False
                await conn.execute(
                    "DELETE FROM seen_events WHERE seen_at < datetime('now', '-1 day')"
                )
            if at is not None:
                # Only the newest event per user and line stands; an older one arriving late
                # (redelivered after a newer one was applied) changes nothing.
                cur = await conn.execute(
                    "INSERT INTO vote_clock (line_id, user_id, event_us) VALUES (?, ?, ?) "
                    "ON CONFLICT(user_id, line_id) DO UPDATE SET event_us = excluded.event_us "
                    "WHERE excluded.event_us >= vote_clock.event_us",
                    (line_id, str(user_id), at),
                )
                if cur.rowcount == 0:
                    return False
            cur = await conn.execute(sql, (line_id, str(user_id)))
            return cur.rowcount > 0

    async def best(
        self, platform: str, guild_id: str, channel_id: str | None = None, limit: int = 10
    ) -> list[RankedLine]:
        """Most-voted lines the model wrote, within one platform's server/workspace or channel."""
        where, params = "s.platform = ? AND s.guild_id = ?", [platform, str(guild_id)]
        if channel_id is not None:
            where += " AND s.channel_id = ?"
            params.append(str(channel_id))
        rows = await self._fetch(
            "SELECT s.id, l.line_no, l.text, COUNT(v.id) AS n, s.channel_id "
            "FROM votes v JOIN lines l ON l.id = v.line_id JOIN scenes s ON s.id = l.scene_id "
            f"WHERE {where} AND NOT l.from_prompt "
            "GROUP BY l.id, s.id ORDER BY n DESC, MIN(v.id) LIMIT ?",
            (*params, limit),
        )
        return [RankedLine(*row) for row in rows]

    # -- leases --------------------------------------------------------------------------

    async def acquire_lease(
        self,
        scope: str,
        shard: tuple[int, int],
        *,
        host: str,
        pid: int,
        ttl_s: float,
        now: float | None = None,
    ) -> None:
        """Take (or renew) the lease on `scope` (e.g. "discord application 123") for
        `shard` (id, count), valid `ttl_s` seconds; LeaseHeld when a live other process
        holds an overlapping one: the same shard, or the same scope sharded differently.
        A row past its expiry, or from a dead pid on this host, is taken over."""
        now = time.time() if now is None else now
        shard_id, count = shard
        async with self._write() as conn:
            await self._serialize(conn, f"lease {scope}")
            async with conn.execute(
                "SELECT shard_id, shard_count, host, pid, expires_at FROM leases WHERE scope = ?",
                (scope,),
            ) as cur:
                rows = await cur.fetchall()
            for other_id, other_count, other_host, other_pid, expires in rows:
                mine = (other_host, other_pid) == (host, pid)
                dead = expires < now or (other_host == host and not _alive(other_pid))
                if mine or dead:
                    continue
                if other_count != count or other_id == shard_id:
                    raise LeaseHeld(scope, (other_id, other_count), other_host, other_pid)
            await conn.execute(
                "DELETE FROM leases WHERE scope = ? AND shard_id = ? AND shard_count = ?",
                (scope, shard_id, count),
            )
            await conn.execute(
                "DELETE FROM leases WHERE scope = ? AND expires_at < ?", (scope, now)
            )
            await conn.execute(
                "INSERT INTO leases (scope, shard_id, shard_count, host, pid, expires_at) "
                "VALUES (?, ?, ?, ?, ?, ?)",
                (scope, shard_id, count, host, pid, now + ttl_s),
            )

    async def release_lease(
        self, scope: str, shard: tuple[int, int], *, host: str, pid: int
    ) -> None:
        async with self._write() as conn:
            await conn.execute(
                "DELETE FROM leases WHERE scope = ? AND shard_id = ? AND shard_count = ? "
                "AND host = ? AND pid = ?",
                (scope, *shard, host, pid),
            )

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


def _alive(pid: int) -> bool:
    """Whether a process with this pid runs on this host (for leases of dead processes)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # e.g. EPERM: it exists, under another user
        return True
    return True
