"""PostgreSQL beside SQLite: the migrations' dialect sections, concurrency across
connections and processes (both backends), DATABASE_URL, and `python -m bot migrate-db`
on a real PostgreSQL server (tests/pg_server.py)."""

from __future__ import annotations

import asyncio
import hashlib
import os
import socket
import sqlite3
import subprocess
import sys
from importlib import resources
from pathlib import Path

import pytest
from helpers import make_config, scripted_loader

from bot.__main__ import main
from bot.config import Config, ConfigError
from bot.db import Database, LeaseHeld, Place, for_dialect, migrations
from bot.storage import open_database
from sitcom.settings import SceneSettings

ROOT = Path(__file__).resolve().parent.parent
HERE = Place("discord", "1", "2")

# sha256 of the SQLite text of every migration as existing bots ran it (before the
# PostgreSQL sections were added): an existing SQLite bot must upgrade exactly as before.
SQLITE_TEXT = {
    1: "47e25d6e846ccb7a45347617253914d953831aaa60dc2428e25af3891abe9036",
    2: "b7f0277826bec85062e2a1581a24f5f3be0d2c4067bf0cae0c04c0314b5366bd",
    3: "37f7107e3804d1125be47998ed82bb636cb9f484d5259b947c6e82e2b2e08cd0",
    4: "b7b8820a29cf497a8f1d5a9f0d6b9dbe1fb39bd988b99e693dc1f2af748866bf",
    5: "d7bb7d24b281caf11daf4bc9d2bf393e49e42008ff8df2c7a0ab87e9519613fb",
}


async def add_scene(db: Database, place: Place = HERE, claimed: bool = False):
    return await db.add_scene(
        place=place,
        user_id="3",
        prompt="JERRY: Hi.",
        model_name="tiny",
        lines=["JERRY: Hi.", "NEWMAN: Hello, Jerry.", "KRAMER: Giddyup!"],
        prompt_lines=1,
        new_tokens=9,
        seconds=0.5,
        claimed=claimed,
    )


# -- one set of migrations ----------------------------------------------------------------


def test_sqlite_migrations_are_byte_for_byte_what_existing_bots_ran():
    for version, _, sql in migrations("sqlite"):
        if version in SQLITE_TEXT:
            assert hashlib.sha256(sql.encode()).hexdigest() == SQLITE_TEXT[version], version


def test_every_migration_has_text_for_both_dialects():
    files = sorted(
        entry.name
        for entry in resources.files("bot").joinpath("migrations").iterdir()
        if entry.name.endswith(".sql")
    )
    assert [v for v, _, _ in migrations("sqlite")] == [v for v, _, _ in migrations("postgresql")]
    assert len(files) == len(migrations("postgresql"))
    for _, name, sql in migrations("postgresql"):
        assert "-- dialect:" not in sql
        code = "\n".join(line for line in sql.splitlines() if not line.lstrip().startswith("--"))
        assert "INTEGER PRIMARY KEY" not in code and " REAL" not in code, name
    text = "A;\n-- dialect: sqlite\nB;\n-- dialect: postgresql\nC;\n-- dialect: all\nD;\n"
    assert for_dialect(text, "sqlite") == "A;\nB;\nD;\n"
    assert for_dialect(text, "postgresql") == "A;\nC;\nD;\n"
    with pytest.raises(ValueError):
        for_dialect(text, "mysql")


@pytest.mark.asyncio
async def test_processes_starting_at_once_migrate_once(pg_url):
    dbs = await asyncio.gather(*(open_database(pg_url) for _ in range(4)))
    try:
        rows = await dbs[0]._fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r[0] for r in rows] == [v for v, _, _ in migrations("postgresql")]
    finally:
        for db in dbs:
            await db.close()


@pytest.mark.asyncio
async def test_a_newer_postgresql_schema_is_refused_in_one_line(pg_url):
    from bot.db import DatabaseError

    db = await open_database(pg_url)
    async with db._write() as conn:
        await conn.execute("INSERT INTO schema_migrations (version, name) VALUES (99, 'future')")
    await db.close()
    with pytest.raises(DatabaseError, match="schema version 99, newer than this bot's"):
        await open_database(pg_url)


# -- concurrency ----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_concurrent_votes_by_one_user_on_one_line_count_once(db_target):
    """40 votes by the same user on the same line at once, from 4 connections (4 pools on
    PostgreSQL, 4 SQLite connections): exactly one is counted."""
    dbs = [await open_database(db_target) for _ in range(4)]
    try:
        line = (await add_scene(dbs[0])).line_ids[1]
        results = await asyncio.gather(*(dbs[i % 4].add_vote("9", line) for i in range(40)))
        assert results.count(True) == 1
        assert [r.votes for r in await dbs[1].best("discord", "1")] == [1]
        # and the same for removals: one of them removes it
        results = await asyncio.gather(*(dbs[i % 4].remove_vote("9", line) for i in range(40)))
        assert results.count(True) == 1 and await dbs[2].best("discord", "1") == []
    finally:
        for db in dbs:
            await db.close()


@pytest.mark.asyncio
async def test_concurrent_claims_and_leases_have_one_winner(db_target):
    dbs = [await open_database(db_target) for _ in range(4)]
    try:
        scene = await add_scene(dbs[0])
        claims = await asyncio.gather(*(dbs[i % 4].claim_posting(scene.id) for i in range(20)))
        assert claims.count("claimed") == 1 and claims.count("busy") == 19
        # 12 hosts race for overlapping leases on one scope (same shard, other splits):
        # one wins, every other is told who holds it.
        shards = [(0, 1), (0, 2), (1, 2), (0, 3)] * 3

        async def take(i: int):
            try:
                await dbs[i % 4].acquire_lease(
                    "Discord application 5", shards[i], host=f"web-{i}", pid=1, ttl_s=60
                )
                return "won"
            except LeaseHeld as e:
                return e

        won = await asyncio.gather(*(take(i) for i in range(12)))
        winners = [i for i, r in enumerate(won) if r == "won"]
        # (0, 2) and (1, 2) may both win: they are different shards of one split
        assert winners, won
        assert all(isinstance(r, LeaseHeld) for r in won if r != "won")
        assert len({shards[i][1] for i in winners}) == 1
        assert len({shards[i] for i in winners}) == len(winners)
    finally:
        for db in dbs:
            await db.close()


@pytest.mark.asyncio
async def test_one_job_stored_by_workers_at_once_is_one_row(db_target):
    """8 stores of one queued job's scene at once from 4 connections (workers racing
    past the queue's STORE after a crash): one row, and every caller gets that scene."""
    dbs = [await open_database(db_target) for _ in range(4)]
    try:

        async def store(i: int):
            return await dbs[i % 4].add_scene(
                place=HERE,
                user_id="3",
                prompt="JERRY: Hi.",
                model_name="tiny",
                lines=["JERRY: Hi.", f"NEWMAN: Take {i}."],
                prompt_lines=1,
                new_tokens=9,
                seconds=0.5,
                job_id="job-7",
            )

        stored = await asyncio.gather(*(store(i) for i in range(8)))
        assert len({s.id for s in stored}) == 1
        assert all(s == stored[0] for s in stored)
        assert stored[0] == await dbs[1].get_scene(stored[0].id)
        assert (await dbs[2]._fetch("SELECT COUNT(*) FROM scenes"))[0][0] == 1
        assert (await dbs[3]._fetch("SELECT COUNT(*) FROM lines"))[0][0] == 2
    finally:
        for db in dbs:
            await db.close()


VOTER = """
import asyncio, sys
sys.path.insert(0, {root!r})
from bot.storage import open_database

async def main():
    db = await open_database(sys.argv[1])
    try:
        won = await asyncio.gather(*(db.add_vote("9", int(sys.argv[2])) for _ in range(10)))
        print(sum(won))
    finally:
        await db.close()

asyncio.run(main())
"""


@pytest.mark.asyncio
async def test_votes_from_several_processes_count_once(db_target):
    db = await open_database(db_target)
    try:
        line = (await add_scene(db)).line_ids[2]
        script = VOTER.format(root=str(ROOT))
        procs = [
            await asyncio.create_subprocess_exec(
                sys.executable,
                "-c",
                script,
                str(db_target),
                str(line),
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
            )  # fmt: skip
            for _ in range(3)
        ]
        outs = [await p.communicate() for p in procs]
        assert all(p.returncode == 0 for p in procs), [err.decode()[-500:] for _, err in outs]
        assert sum(int(out) for out, _ in outs) == 1
        assert [r.votes for r in await db.best("discord", "1")] == [1]
    finally:
        await db.close()


# -- DATABASE_URL ---------------------------------------------------------------------------


def test_database_url_is_validated_in_one_line_without_the_password():
    ok = Config.from_env({"DATABASE_URL": "postgresql://bot:s3cret@db.example:5432/sitcom"})
    assert ok.database_url.endswith("/sitcom") and "s3cret" not in repr(ok)
    assert Config.from_env({}).database_url is None
    for bad, why in [
        ("mysql://bot:s3cret@h/db", "must be a PostgreSQL URL"),
        ("sitcom.db", "must be a PostgreSQL URL"),
        ("postgresql://bot:s3cret@h:99999/db", "not a valid URL"),
        ("postgresql:///db", "names no host"),
        ("postgresql://bot:s3 cret@h/db", "spaces"),
    ]:
        with pytest.raises(ConfigError, match=why) as error:
            Config.from_env({"DATABASE_URL": bad})
        assert "s3cret" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.asyncio
async def test_core_runs_on_postgresql_when_database_url_is_set(tmp_path, tiny_model_dir, pg_url):
    from bot.core import Core
    from bot.pg import PostgresDatabase

    config = make_config(tmp_path, tiny_model_dir, database_url=pg_url)
    core = await Core.start(config, loader=scripted_loader())
    try:
        assert isinstance(core.db, PostgresDatabase)
        await core.change_settings(HERE, "1", {"temperature": 1.3})
        assert (await core.db.get_settings("discord", "2")).temperature == 1.3
    finally:
        await core.close()
    assert not config.db_path.exists()  # nothing went to SQLite


@pytest.mark.asyncio
async def test_an_unreachable_server_is_one_line(tmp_path):
    from bot.db import DatabaseError

    with pytest.raises(DatabaseError, match="connection refused") as error:
        await open_database(f"postgresql://bot:s3cret@127.0.0.1:{_closed_port()}/x", timeout=2)
    assert "s3cret" not in str(error.value) and "\n" not in str(error.value)


@pytest.mark.asyncio
async def test_a_server_that_goes_away_is_a_polite_error_and_then_comes_back():
    """PostgreSQL restarted under a running bot (its own server here): the bot's calls say
    "unavailable" while it is down, and work again once it is back, without reopening."""
    from pg_server import pg_bin_dir, start_server, stop_server

    from bot.db import DatabaseError

    if pg_bin_dir() is None:
        pytest.skip("PostgreSQL server binaries (initdb, pg_ctl) not found")
    server = start_server()
    try:
        db = await open_database(server.url(), timeout=2)
        try:
            await db.set_state("k", "v")
            server.stop()
            for call in (db.get_state("k"), db.set_state("k", "w")):
                with pytest.raises(DatabaseError, match="unavailable|busy"):
                    await call
            server.start()
            assert await db.get_state("k") == "v"
            await db.set_state("k", "w")
            assert await db.get_state("k") == "w"
        finally:
            await db.close()
    finally:
        stop_server(server)


# -- python -m bot migrate-db ---------------------------------------------------------------


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def _fill(path: Path) -> None:
    """A bot's SQLite file with a row in every table."""
    db = await Database.open(path)
    try:
        await db.save_settings(HERE, "3", SceneSettings(temperature=1.25, top_k=7, min_p=0.07))
        await db.save_settings(Place("slack", "T1", "C1"), "U1", SceneSettings(best_of=3))
        first = await add_scene(db)
        await db.place_lines("555", [(i, slot) for slot, i in enumerate(first.line_ids, 1)])
        await db.mark_posted(first.id)
        second = await add_scene(db, Place("slack", "T1", "C1"), claimed=True)
        await db.place_lines("C1/1.2", [(second.line_ids[1], 1)])
        assert await db.add_vote("9", first.line_ids[1])
        assert await db.add_vote("10", first.line_ids[1])
        assert await db.add_vote("11", first.line_ids[2])
        assert await db.add_vote("U1", second.line_ids[1], ("slack", "Ev1"), 1_700_000_000_000_001)
        await db.set_state("active_checkpoint", "ft-1")
        await db.acquire_lease("Discord application 5", (0, 1), host="web-1", pid=9, ttl_s=60)
    finally:
        await db.close()


async def _view(target) -> tuple:
    """What the bot sees through the Database API."""
    db = await open_database(target)
    try:
        scenes = [await db.get_scene(i) for i in (1, 2)]
        return (
            await db.get_settings("discord", "2"),
            await db.get_settings("slack", "C1"),
            scenes,
            await db.best("discord", "1"),
            await db.best("slack", "T1"),
            await db.line_at("slack", "C1/1.2", 1),
            await db.get_state("active_checkpoint"),
            await db.claim_posting(1),
            await db.claim_posting(2),
        )
    finally:
        await db.close()


def _counts(out: str) -> dict[str, tuple[int, int]]:
    """{table: (sqlite rows, postgresql rows)} from migrate-db's table."""
    return {
        line.split()[0]: tuple(map(int, line.split()[1:]))
        for line in out.splitlines()[1:]
        if len(line.split()) == 3
    }


def _one_error(capsys, rc: int, expected: str) -> None:
    captured = capsys.readouterr()
    errors = captured.err.strip().splitlines()
    assert rc == 1 and len(errors) == 1 and errors[0].startswith("error: "), captured
    assert expected in errors[0], errors[0]
    assert "Traceback" not in captured.err


def test_migrate_db_copies_every_row_once(tmp_path, pg_url, capsys):
    path = tmp_path / "bot.db"
    asyncio.run(_fill(path))
    before = asyncio.run(_view(path))

    assert main(["migrate-db", str(path), pg_url]) == 0
    out = capsys.readouterr().out
    counts = _counts(out)
    assert counts["scenes"] == (2, 2) and counts["lines"] == (6, 6) and counts["votes"] == (4, 4)
    assert counts["vote_clock"] == (1, 1) and counts["seen_events"] == (1, 1)
    assert counts["leases"] == (1, 1) and counts["bot_state"] == (1, 1)
    assert counts["channel_settings"] == (2, 2) and "counts match" in out
    assert asyncio.run(_view(pg_url)) == before  # the same answers, claims included

    # Twice: nothing changes.
    assert main(["migrate-db", str(path), pg_url]) == 0
    out = capsys.readouterr().out
    assert "nothing changed" in out and _counts(out) == counts

    async def after() -> tuple[int, int]:
        db = await open_database(pg_url)
        try:
            scene = await add_scene(db)  # the identity sequences moved past the copied ids
            rows = await db._fetch("SELECT COUNT(*) FROM votes")
            return scene.id, rows[0][0]
        finally:
            await db.close()

    assert asyncio.run(after()) == (3, 4)
    # The target now holds a scene the SQLite file has not: refused, nothing written.
    _one_error(capsys, main(["migrate-db", str(path), pg_url]), "already holds other data")


def test_migrate_db_bad_inputs_are_one_line(tmp_path, pg_url, capsys):
    good = tmp_path / "bot.db"
    asyncio.run(_fill(good))
    _one_error(capsys, main(["migrate-db", str(tmp_path / "nope.db"), pg_url]), "does not exist")
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"not a database" * 200)
    _one_error(capsys, main(["migrate-db", str(junk), pg_url]), "is not a SQLite database")
    other = tmp_path / "other.db"
    sqlite3.connect(other).execute("CREATE TABLE notes (x)").connection.close()
    _one_error(capsys, main(["migrate-db", str(other), pg_url]), "not a sitcom bot database")
    assert sqlite3.connect(other).execute("PRAGMA user_version").fetchone() == (0,)  # untouched
    _one_error(capsys, main(["migrate-db", str(tmp_path), pg_url]), "is a directory")
    closed = f"postgresql://bot:s3cret@127.0.0.1:{_closed_port()}/x"
    _one_error(capsys, main(["migrate-db", str(good), closed]), "connection refused")
    _one_error(capsys, main(["migrate-db", str(good), "mysql://h/x"]), "PostgreSQL URL")
    missing_db = pg_url.rsplit("/", 1)[0] + "/no_such_db"
    _one_error(capsys, main(["migrate-db", str(good), missing_db]), "does not exist")


@pytest.mark.e2e
def test_migrate_db_as_a_command(tmp_path, pg_url):
    path = tmp_path / "bot.db"
    asyncio.run(_fill(path))
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    cmd = [sys.executable, "-m", "bot", "migrate-db", str(path), pg_url]
    first = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert first.returncode == 0 and "counts match" in first.stdout, first.stderr
    again = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=120)
    assert again.returncode == 0 and "nothing changed" in again.stdout, again.stderr
    bad = subprocess.run(
        cmd[:4] + [str(tmp_path / "x.db"), pg_url], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 1 and bad.stderr.count("\n") == 1 and "does not exist" in bad.stderr
