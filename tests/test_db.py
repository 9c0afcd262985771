"""bot.db on real SQLite files and bot.pg on a real PostgreSQL server (tests/pg_server.py):
migrations, constraints, persistence; SQLite's locked/deleted files. Tests taking
`db_target` run once per backend."""

from __future__ import annotations

import asyncio
import os
import sqlite3

import pytest

from bot.db import Database, DatabaseError, Place, migrations
from bot.storage import open_database
from sitcom.settings import SceneSettings

HERE = Place("discord", "1", "2")


async def add_scene(db: Database, lines=("JERRY: Hi.", "NEWMAN: Hello, Jerry."), place=HERE):
    return await db.add_scene(
        place=place,
        user_id="3",
        prompt="JERRY: Hi.",
        model_name="tiny",
        lines=list(lines),
        prompt_lines=0,
        new_tokens=9,
        seconds=0.5,
    )


@pytest.mark.asyncio
async def test_schema_is_migrated_once_with_foreign_keys(db_target):
    db = await open_database(db_target)
    latest = migrations()[-1][0]
    assert await db.schema_version() == latest
    await db.close()
    db = await open_database(db_target)  # reopening applies nothing twice
    assert await db.schema_version() == latest
    if isinstance(db_target, os.PathLike):
        assert (await db._fetch("PRAGMA journal_mode"))[0][0] == "wal"
        assert (await db._fetch("PRAGMA foreign_keys"))[0][0] == 1
    else:
        assert [r[0] for r in await db._fetch("SELECT version FROM schema_migrations")] == [
            v for v, _, _ in migrations("postgresql")
        ]
    with pytest.raises(DatabaseError):  # a vote for a line that does not exist
        await db.add_vote("5", 999)
    await db.close()


@pytest.mark.asyncio
async def test_everything_survives_a_restart(db_target):
    db = await open_database(db_target)
    await db.save_settings(HERE, "3", SceneSettings(temperature=1.25, top_k=7))
    scene = await add_scene(db)
    await db.place_lines("555", [(line_id, slot) for slot, line_id in enumerate(scene.line_ids, 1)])
    assert await db.add_vote("9", scene.line_ids[1])
    await db.set_state("active_checkpoint", "ft-1")
    await db.close()

    db = await open_database(db_target)
    settings = await db.get_settings("discord", "2")
    assert (settings.temperature, settings.top_k) == (1.25, 7)
    assert await db.get_settings("slack", "2") == SceneSettings()  # keyed per platform
    assert await db.get_settings("discord", "99") == SceneSettings()
    assert await db.line_at("discord", "555", 2) == scene.line_ids[1]
    assert await db.line_at("slack", "555", 2) is None
    assert await db.line_at("discord", "555", 3) is None
    assert await db.line_at("discord", "556", 1) is None
    best = await db.best("discord", "1")
    assert [(r.text, r.votes) for r in best] == [("NEWMAN: Hello, Jerry.", 1)]
    assert await db.get_state("active_checkpoint") == "ft-1"
    assert await db.reset_settings("discord", "2")
    assert await db.get_settings("discord", "2") == SceneSettings()
    await db.close()


@pytest.mark.asyncio
async def test_one_vote_per_user_per_line(db_target):
    db = await open_database(db_target)
    scene = await add_scene(db)
    line = scene.line_ids[0]
    assert await db.add_vote("9", line) is True
    assert await db.add_vote("9", line) is False
    assert await db.add_vote("10", line) is True
    assert [r.votes for r in await db.best("discord", "1")] == [2]
    assert await db.remove_vote("9", line) is True and await db.remove_vote("9", line) is False
    assert [r.votes for r in await db.best("discord", "1", channel_id="2")] == [1]
    assert await db.best("discord", "1", channel_id="3") == []
    assert await db.best("discord", "4") == [] and await db.best("slack", "1") == []
    await db.close()


@pytest.mark.asyncio
async def test_a_redelivered_event_changes_nothing(db_target):
    db = await open_database(db_target)
    line = (await add_scene(db, place=Place("slack", "T1", "C1"))).line_ids[1]
    assert await db.add_vote("U1", line, event=("slack", "Ev1"))
    assert await db.remove_vote("U1", line, event=("slack", "Ev2"))
    # Ev1 again (Socket Mode redelivers after a reconnect): the removed vote stays removed.
    assert not await db.add_vote("U1", line, event=("slack", "Ev1"))
    assert await db.best("slack", "T1") == []
    assert await db.add_vote("U1", line, event=("discord", "Ev1"))  # ids are per platform
    await db.close()


@pytest.mark.asyncio
async def test_prompt_lines_are_stored_but_never_votable_or_best(db_target):
    db = await open_database(db_target)
    scene = await db.add_scene(
        place=HERE,
        user_id="3",
        prompt="Elaine: Hi!",
        model_name="tiny",
        lines=["ELAINE: Hi!", "JERRY: Hello."],
        prompt_lines=1,
        new_tokens=4,
        seconds=0.1,
    )
    assert [line.from_prompt for line in scene.lines] == [True, False]
    await db.place_lines("77", [(scene.line_ids[0], None), (scene.line_ids[1], 1)])
    assert await db.line_at("discord", "77", 1) == scene.line_ids[1]
    for line_id in scene.line_ids:  # even a vote that got in some other way is not ranked
        await db.add_vote("9", line_id)
    assert [r.line_no for r in await db.best("discord", "1")] == [2]
    stored = await db.get_scene(scene.id)
    assert not stored.posted and [line.message_id for line in stored.lines] == ["77", "77"]
    await db.mark_posted(scene.id)
    assert (await db.get_scene(scene.id)).posted
    await db.close()


@pytest.mark.asyncio
async def test_a_job_id_stores_its_scene_once(db_target):
    """A queued job's scene stored a second time (a worker that took over the job of one
    killed right after storing it) gets the first one back, and nothing is written."""
    db = await open_database(db_target)
    try:
        first = await db.add_scene(
            place=HERE,
            user_id="3",
            prompt="JERRY: Hi.",
            model_name="tiny",
            lines=["JERRY: Hi.", "NEWMAN: Hello, Jerry."],
            prompt_lines=1,
            new_tokens=9,
            seconds=0.5,
            job_id="job-1",
        )
        again = await db.add_scene(
            place=HERE,
            user_id="3",
            prompt="JERRY: Hi.",
            model_name="tiny",
            lines=["JERRY: Hi.", "KRAMER: Giddyup!", "GEORGE: What?"],  # written again
            prompt_lines=1,
            new_tokens=12,
            seconds=0.7,
            claimed=True,
            job_id="job-1",
        )
        assert again == first == await db.get_scene(first.id)
        assert [line.text for line in again.lines] == ["JERRY: Hi.", "NEWMAN: Hello, Jerry."]
        assert [line.from_prompt for line in again.lines] == [True, False]
        assert await db.claim_posting(first.id) == "claimed"  # the second call claimed nothing
        assert (await db._fetch("SELECT COUNT(*) FROM scenes"))[0][0] == 1
        assert (await db._fetch("SELECT COUNT(*) FROM lines"))[0][0] == 2
        # Other jobs, and scenes without a job (no queue), each get their own row.
        other = await add_scene(db)
        assert (await db.add_scene(**_kwargs(job_id="job-2"))).id not in (first.id, other.id)
        assert (await add_scene(db)).id != other.id
        assert (await db._fetch("SELECT COUNT(*) FROM scenes"))[0][0] == 4
    finally:
        await db.close()


def _kwargs(**extra) -> dict:
    return dict(
        place=HERE,
        user_id="3",
        prompt="JERRY: Hi.",
        model_name="tiny",
        lines=["JERRY: Hi.", "ELAINE: Get out!"],
        prompt_lines=1,
        new_tokens=3,
        seconds=0.1,
        **extra,
    )


@pytest.mark.asyncio
async def test_upgrade_a_database_made_by_the_first_schema(tmp_path):
    """A file written by migration 0001 (today's bot) keeps every row after 0002."""
    path = tmp_path / "old.db"
    version, _, first = migrations()[0]
    old = sqlite3.connect(path)
    old.executescript(f"{first}\nPRAGMA user_version = {version};")
    big = 900000000000000001  # Discord snowflakes are beyond 32 bits
    old.executescript(f"""
        INSERT INTO channel_settings VALUES ({big}, 7, 300, 1.2, 0.9, 0.9, 40, 5, '2025-01-01');
        INSERT INTO channel_settings VALUES (0, 0, 50, 1.1, 0.7, 0.9, 40, 0, '2025-01-01');
        INSERT INTO scenes (id, guild_id, channel_id, user_id, prompt, model_name, new_tokens,
            seconds) VALUES (1, 7, {big}, 5, 'Elaine: Jerry!\nJerry: What?', 'm', 20, 1.5),
                            (2, 0, 0, 0, 'Jerry: Hi.', 'm', 10, 1.0),
                            (3, 7, {big}, 5, 'George: Hey.', 'm', 10, 1.0);
        INSERT INTO lines (id, scene_id, line_no, text, message_id, slot) VALUES
            (1, 1, 1, 'ELAINE: Jerry!', {big + 1}, 1), (2, 1, 2, 'JERRY: What?', {big + 1}, 2),
            (3, 1, 3, 'GEORGE: Nothing.', {big + 1}, 3), (4, 2, 1, 'JERRY: Hi.', NULL, NULL),
            (5, 2, 2, 'KRAMER: Hey!', NULL, NULL), (6, 3, 1, 'GEORGE: Hey.', NULL, NULL),
            (7, 3, 2, 'JERRY: Yo.', NULL, NULL);
        INSERT INTO votes (line_id, user_id) VALUES (1, 5), (1, 6), (3, {big + 9}), (5, 0);
        INSERT INTO bot_state VALUES ('active_checkpoint', 'ft-1');
    """)
    old.close()

    db = await Database.open(path)
    assert await db.schema_version() == migrations()[-1][0]
    settings = await db.get_settings("discord", str(big))
    assert (settings.max_new_tokens, settings.top_k) == (300, 40)
    assert (await db.get_settings("console", "0")).max_new_tokens == 50
    assert await db.get_settings("discord", "0") == SceneSettings()
    assert await db.get_state("active_checkpoint") == "ft-1"
    # Every vote survives, but the user's own opening line no longer ranks.
    assert (await db._fetch("SELECT COUNT(*) FROM votes"))[0][0] == 4
    best = await db.best("discord", "7")
    assert [(r.text, r.votes, r.channel_id) for r in best] == [("GEORGE: Nothing.", 1, str(big))]
    assert [r.text for r in await db.best("console", "0")] == ["KRAMER: Hey!"]
    assert await db.line_at("discord", str(big + 1), 3) == 3
    assert await db.line_at("discord", str(big + 1), 1) is None  # a prompt line
    scene1, scene3 = await db.get_scene(1), await db.get_scene(3)
    assert [line.from_prompt for line in scene1.lines] == [True, True, False]
    assert scene1.posted and scene1.place == Place("discord", "7", str(big))
    assert not scene3.posted  # stored but never shown: `/scene #3` posts it
    assert (await db.get_scene(2)).place.platform == "console"
    # Foreign keys still hold on the renamed tables, and deleting cascades.
    assert (await db._fetch("PRAGMA foreign_key_check")) == []
    with pytest.raises(DatabaseError):
        await db.add_vote("5", 999)
    async with db._write() as conn:
        await conn.execute("DELETE FROM scenes WHERE id = 1")
    assert (await db._fetch("SELECT COUNT(*) FROM votes"))[0][0] == 1  # only line 5
    await db.close()


@pytest.mark.asyncio
async def test_locked_and_deleted_files_raise_polite_errors(tmp_path):
    path = tmp_path / "a.db"
    db = await Database.open(path, timeout=0.05)
    other = sqlite3.connect(path)
    other.execute("BEGIN EXCLUSIVE")
    with pytest.raises(DatabaseError, match="busy"):
        await db.set_state("k", "v")
    other.rollback()
    other.close()
    await db.set_state("k", "v")  # works again once the lock is gone
    os.unlink(path)
    with pytest.raises(DatabaseError, match="gone missing"):
        await db.get_state("k")
    await db.close()


@pytest.mark.asyncio
async def test_unopenable_path_is_a_database_error(tmp_path):
    (tmp_path / "dir.db").mkdir()
    with pytest.raises(DatabaseError, match="cannot"):
        await Database.open(tmp_path / "dir.db")


@pytest.mark.asyncio
async def test_unreadable_file_is_a_database_error(tmp_path):
    (tmp_path / "junk.db").write_bytes(b"this is not a database" * 100)
    with pytest.raises(DatabaseError, match="cannot"):
        await Database.open(tmp_path / "junk.db")


@pytest.mark.asyncio
async def test_opening_a_new_file_waits_for_a_writer_holding_it(tmp_path):
    """Another process holds the write lock on a new (rollback-journal) file while this one
    switches it to WAL: SQLite refuses that switch at once, without its busy timeout (the
    race that made 1 in ~200 simultaneous starts fail), so opening retries until the lock
    is released."""
    path = tmp_path / "a.db"
    other = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    other.execute("CREATE TABLE other_process(a)")
    other.execute("BEGIN IMMEDIATE")
    asyncio.get_running_loop().call_later(0.5, other.execute, "COMMIT")
    db = await Database.open(path)
    try:
        assert await db.schema_version() == migrations()[-1][0]
    finally:
        await db.close()
        other.close()


@pytest.mark.asyncio
async def test_processes_starting_at_once_on_a_new_store_migrate_once(db_target):
    """A gateway and workers started together on a new BOT_DB (or database): one applies
    the migrations, the others wait and find nothing left to do; none fails."""
    opened = await asyncio.gather(
        *(open_database(db_target) for _ in range(4)), return_exceptions=True
    )
    dbs = [db for db in opened if not isinstance(db, BaseException)]
    try:
        assert len(dbs) == 4, [str(e) for e in opened if isinstance(e, BaseException)]
        latest = migrations()[-1][0]
        assert [await db.schema_version() for db in dbs] == [latest] * 4
        scene = await add_scene(dbs[1])
        assert (await dbs[2].get_scene(scene.id)).id == scene.id
    finally:
        for db in dbs:
            await db.close()
