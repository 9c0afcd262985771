"""PostgreSQL storage (asyncpg): the same `Database` API over a server many processes share.

`DATABASE_URL=postgresql://…` selects it (bot.storage.open_database); SQLite stays the default.
The queries are bot/db.py's own: each runs through a thin adapter that gives an asyncpg
connection the few aiosqlite calls Database uses (execute → cursor with fetchall/fetchone
and rowcount, executemany), with `?` placeholders numbered `$1, $2, …`. The schema is the
same numbered migrations (bot/migrations, PostgreSQL sections: see bot.db.for_dialect),
tracked in a `schema_migrations` table (SQLite: PRAGMA user_version) and applied under an
advisory lock, so two processes starting at once migrate once.

Concurrency across processes: every write is one transaction on a pooled connection; votes
rely on UNIQUE (user_id, line_id) with ON CONFLICT DO NOTHING (a concurrent duplicate waits
for the first and then does nothing); `claim_posting` is one conditional UPDATE (the row
lock makes a second claimer re-check the condition and find it claimed); `acquire_lease`
holds a transaction-scoped advisory lock on its scope while it reads and replaces the rows.
A lock wait longer than the timeout is "busy, try again", as on SQLite.

asyncpg rather than psycopg 3: it is already installed here, it is asyncio-native with a
built-in connection pool, and it has COPY (copy_records_to_table) for `migrate-db`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import sqlite3
import sys
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from .db import Database, DatabaseError, migrations

log = logging.getLogger(__name__)

MIGRATION_LOCK = "sitcom bot schema migrations"  # advisory lock key (hashed)


def redacted(url: str) -> str:
    """The URL without its password, fit for messages and logs."""
    try:
        parts = urlsplit(url)
        if parts.password is None:
            return url
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        netloc = f"{parts.username}:***@{host}" + (f":{parts.port}" if parts.port else "")
        return urlunsplit(parts._replace(netloc=netloc))
    except ValueError:
        return "the DATABASE_URL"


def _numbered(sql: str) -> str:
    """`?` placeholders (sqlite3's) as PostgreSQL's `$1, $2, …` (no query holds a literal ?)."""
    count = 0

    def number(_: re.Match) -> str:
        nonlocal count
        count += 1
        return f"${count}"

    return re.sub(r"\?", number, sql)


def _rowcount(status: str | None) -> int:
    """Rows a statement changed, from its command tag ("INSERT 0 1", "UPDATE 3")."""
    last = (status or "").rsplit(" ", 1)[-1]
    return int(last) if last.isdigit() else -1


class _Cursor:
    def __init__(self, rows: list[asyncpg.Record], rowcount: int) -> None:
        self._rows, self.rowcount = rows, rowcount

    async def fetchall(self) -> list[asyncpg.Record]:
        return self._rows

    async def fetchone(self) -> asyncpg.Record | None:
        return self._rows[0] if self._rows else None

    async def __aenter__(self) -> _Cursor:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None


class _Execution:
    """Awaitable and `async with`-able, like aiosqlite's conn.execute(...)."""

    def __init__(self, running: Any) -> None:
        self._running = running

    def __await__(self):
        return self._running.__await__()

    async def __aenter__(self) -> _Cursor:
        return await self._running

    async def __aexit__(self, *exc: object) -> None:
        return None


class PgConnection:
    """The aiosqlite calls Database's queries use, on one asyncpg connection."""

    def __init__(self, conn: asyncpg.Connection) -> None:
        self.raw = conn

    def execute(self, sql: str, params: Sequence = ()) -> _Execution:
        return _Execution(self._run(sql, tuple(params)))

    async def _run(self, sql: str, params: tuple) -> _Cursor:
        statement = await self.raw.prepare(_numbered(sql))
        rows = await statement.fetch(*params)
        return _Cursor(rows, _rowcount(statement.get_statusmsg()))

    async def executemany(self, sql: str, params: Iterable[Sequence]) -> None:
        await self.raw.executemany(_numbered(sql), [tuple(p) for p in params])


def _reason(error: BaseException) -> str:
    """One line for a failed connection."""
    if isinstance(error, ConnectionRefusedError):
        return "connection refused (is PostgreSQL running there, on that port?)"
    if isinstance(error, TimeoutError):
        return "no answer in time (a firewall, or the wrong host?)"
    if isinstance(error, OSError) and error.strerror:
        return error.strerror
    text = " ".join(str(error).split()) or type(error).__name__
    return text[:200]


class PostgresDatabase(Database):
    """bot.db.Database on PostgreSQL; the same methods and the same results."""

    def __init__(self, url: str, pool: asyncpg.Pool, timeout: float) -> None:
        self.url = url
        self.path = None  # no file: _check_file has nothing to check
        self._pool = pool
        self._timeout = timeout
        self._lock = asyncio.Lock()  # unused: the pool gives each transaction a connection

    @classmethod
    async def open(cls, url: str | Path, timeout: float = 5.0) -> PostgresDatabase:
        url = str(url)
        where = redacted(url)
        # lock_timeout: a row or table locked longer than DB_TIMEOUT_S is "busy" (SQLite's
        # busy timeout); 0 would mean "wait forever" to PostgreSQL.
        settings = {"lock_timeout": f"{max(int(timeout * 1000), 1)}ms"}
        try:
            pool = await asyncpg.create_pool(
                url,
                min_size=1,
                max_size=10,
                timeout=max(timeout, 1.0),
                server_settings=settings,
            )
        except (OSError, TimeoutError, asyncpg.PostgresError) as e:
            raise DatabaseError(f"cannot open the database {where}: {_reason(e)}") from e
        except (asyncpg.InterfaceError, ValueError) as e:  # e.g. a malformed URL
            raise DatabaseError(f"cannot open the database {where}: {_reason(e)}") from e
        db = cls(url, pool, timeout)
        try:
            await db._migrate()
        except (DatabaseError, asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            await pool.close()
            raise DatabaseError(f"cannot prepare the database {where}: {_reason(e)}") from e
        return db

    async def close(self) -> None:
        try:
            await asyncio.wait_for(self._pool.close(), max(self._timeout, 1.0))
        except TimeoutError:
            self._pool.terminate()

    async def schema_version(self) -> int:
        async with self._guard():
            return await self._pool.fetchval(
                "SELECT COALESCE(MAX(version), 0) FROM schema_migrations"
            )

    async def _migrate(self) -> None:
        known = migrations("postgresql")
        newest = max((version for version, _, _ in known), default=0)
        async with self._pool.acquire() as conn, conn.transaction():
            # One process migrates; another starting at the same time waits, then finds
            # nothing left to do.
            await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", MIGRATION_LOCK)
            await conn.execute(
                "CREATE TABLE IF NOT EXISTS schema_migrations ("
                "version INTEGER PRIMARY KEY, name TEXT NOT NULL, "
                "applied_at TIMESTAMPTZ NOT NULL DEFAULT now())"
            )
            current = await conn.fetchval("SELECT COALESCE(MAX(version), 0) FROM schema_migrations")
            if current > newest:
                raise DatabaseError(
                    f"it is at schema version {current}, newer than this bot's {newest} "
                    "(written by a newer version); run that version or point DATABASE_URL "
                    "at another database"
                )
            for version, name, sql in known:
                if version <= current:
                    continue
                log.info("applying migration %04d_%s", version, name)
                await conn.execute(sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )

    # -- plumbing ------------------------------------------------------------------------

    def _check_file(self) -> None:
        return None

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        try:
            yield
        except DatabaseError:
            raise
        except (
            asyncpg.LockNotAvailableError,
            asyncpg.DeadlockDetectedError,
            asyncpg.SerializationError,
            asyncpg.TooManyConnectionsError,
            TimeoutError,
        ) as e:
            log.warning("database busy: %s", e)
            raise DatabaseError(
                "The database is busy right now; please try again in a moment."
            ) from e
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            log.exception("database error")
            raise DatabaseError("The bot's database is unavailable right now; sorry!") from e

    @asynccontextmanager
    async def _write(self) -> AsyncIterator[PgConnection]:
        async with self._guard():
            async with self._pool.acquire(timeout=max(self._timeout, 1.0)) as conn:
                async with conn.transaction():
                    yield PgConnection(conn)

    async def _serialize(self, conn: PgConnection, key: str) -> None:
        """A transaction-scoped advisory lock on `key`: the next transaction asking for the
        same key (in any process) waits until this one ends."""
        await conn.raw.execute("SELECT pg_advisory_xact_lock(hashtext($1))", key)

    async def _fetch(self, sql: str, params: Iterable = ()) -> list[asyncpg.Record]:
        async with self._guard():
            return list(
                await self._pool.fetch(
                    _numbered(sql), *tuple(params), timeout=max(self._timeout, 1.0) * 6
                )
            )


# -- python -m bot migrate-db ---------------------------------------------------------------

# Parents before children (foreign keys); every table of the schema.
TABLES = (
    "bot_state",
    "channel_settings",
    "scenes",
    "lines",
    "votes",
    "vote_clock",
    "seen_events",
    "leases",
)
IDENTITY_TABLES = ("scenes", "lines", "votes")  # their `id` columns have sequences


def _convert(kind: str, value: Any) -> Any:
    """A SQLite value as the PostgreSQL column type wants it (asyncpg is strict)."""
    if value is None:
        return None
    if kind == "boolean":
        return bool(value)
    if kind in ("integer", "bigint", "smallint"):
        return int(value)
    if kind in ("double precision", "real"):
        return float(value)
    return str(value)


def _check_source(path: Path) -> None:
    """Refuse a missing file, a folder, or something that is not a sitcom bot's database,
    before anything opens it for writing."""
    if not path.exists():
        raise DatabaseError(f"{path} does not exist")
    if path.is_dir():
        raise DatabaseError(f"{path} is a directory, not the bot's SQLite file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            version = conn.execute("PRAGMA user_version").fetchone()[0]
            tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        finally:
            conn.close()
    except sqlite3.Error as e:
        raise DatabaseError(f"{path} is not a SQLite database ({e})") from e
    if version < 1 or not {"scenes", "lines", "votes", "bot_state"} <= tables:
        raise DatabaseError(
            f"{path} is not a sitcom bot database (no bot schema in it); give the file "
            "BOT_DB points at"
        )


async def copy_sqlite_to_postgres(
    sqlite_path: str | Path, url: str, timeout: float = 10.0
) -> tuple[str, list[tuple[str, int, int]]]:
    """Copy every row of a SQLite bot database into PostgreSQL in one transaction.

    Returns ("copied" or "unchanged", [(table, sqlite rows, postgresql rows)]). The
    target must be empty (then every row is copied, identity sequences are moved past
    the copied ids and the row counts are compared before committing) or already hold
    exactly the same rows (a second run: nothing is changed). Anything else raises
    DatabaseError with a one-line reason; nothing is written then. The SQLite file is
    brought to the current schema first, as the bot would at start-up."""
    path = Path(sqlite_path)
    _check_source(path)
    source = await Database.open(path, timeout=timeout)
    try:
        target = await PostgresDatabase.open(url, timeout=timeout)
        try:
            return await _copy(source, target)
        except asyncpg.LockNotAvailableError as e:
            raise DatabaseError(
                f"the target's tables stayed locked for {timeout:g} s (is a bot running on "
                "it?); nothing was copied"
            ) from e
        except (asyncpg.PostgresError, asyncpg.InterfaceError, OSError) as e:
            raise DatabaseError(f"the copy failed, nothing was copied: {_reason(e)}") from e
        finally:
            await target.close()
    finally:
        await source.close()


async def _copy(
    source: Database, target: PostgresDatabase
) -> tuple[str, list[tuple[str, int, int]]]:
    async with target._pool.acquire() as conn, conn.transaction():
        # No bot (or second migrate-db) writes while the copy runs.
        await conn.execute(f"LOCK TABLE {', '.join(TABLES)} IN ACCESS EXCLUSIVE MODE")
        columns: dict[str, list[tuple[str, str]]] = {}
        for table in TABLES:
            rows = await conn.fetch(
                "SELECT column_name, data_type FROM information_schema.columns "
                "WHERE table_schema = current_schema() AND table_name = $1 "
                "ORDER BY ordinal_position",
                table,
            )
            columns[table] = [(row[0], row[1]) for row in rows]
        # One read transaction on SQLite: a consistent snapshot (the bot should be stopped).
        wanted: dict[str, list[tuple]] = {}
        async with source._write() as sconn:
            for table in TABLES:
                names = ", ".join(name for name, _ in columns[table])
                async with sconn.execute(f"SELECT {names} FROM {table}") as cur:
                    wanted[table] = [
                        tuple(
                            _convert(kind, value)
                            for (_, kind), value in zip(columns[table], row, strict=True)
                        )
                        for row in await cur.fetchall()
                    ]
        present = {table: await conn.fetchval(f"SELECT COUNT(*) FROM {table}") for table in TABLES}
        if any(present.values()):
            for table in TABLES:
                names = ", ".join(name for name, _ in columns[table])
                have = [tuple(row) for row in await conn.fetch(f"SELECT {names} FROM {table}")]
                if sorted(have, key=repr) != sorted(wanted[table], key=repr):
                    raise DatabaseError(
                        f"the target database already holds other data ({present[table]} rows "
                        f"in {table}, the SQLite file has {len(wanted[table])}, not the same); "
                        "copy into an empty database"
                    )
            outcome = "unchanged"
        else:
            for table in TABLES:
                if wanted[table]:
                    await conn.copy_records_to_table(
                        table,
                        records=wanted[table],
                        columns=[name for name, _ in columns[table]],
                    )
            for table in IDENTITY_TABLES:  # the next scene/line/vote gets the next id
                await conn.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"COALESCE((SELECT MAX(id) FROM {table}), 0) + 1, false)"
                )
            outcome = "copied"
        counts = []
        for table in TABLES:
            copied = await conn.fetchval(f"SELECT COUNT(*) FROM {table}")
            counts.append((table, len(wanted[table]), copied))
        mismatched = [(t, a, b) for t, a, b in counts if a != b]
        if mismatched:  # rolls the whole copy back
            t, a, b = mismatched[0]
            raise DatabaseError(f"row counts differ after the copy: {t} has {a} in SQLite, {b}")
    return outcome, counts


async def migrate_db_main(sqlite_path: str, url: str) -> int:
    """`python -m bot migrate-db SQLITE_FILE postgresql://…`: prints the row counts; one
    line on stderr and 1 for any failure."""
    try:
        outcome, counts = await copy_sqlite_to_postgres(sqlite_path, url)
    except DatabaseError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    width = max(len(table) for table, _, _ in counts)
    print(f"{'table':<{width}}  {'sqlite':>8}  {'postgresql':>10}")
    for table, a, b in counts:
        print(f"{table:<{width}}  {a:>8}  {b:>10}")
    total = sum(a for _, a, _ in counts)
    if outcome == "copied":
        print(f"copied {total} rows from {sqlite_path} to {redacted(url)}; counts match")
    else:
        print(f"{redacted(url)} already holds these {total} rows; nothing changed")
    return 0
