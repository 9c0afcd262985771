"""bot.db on real SQLite files: migrations, constraints, persistence, locked/deleted files."""

from __future__ import annotations

import os
import sqlite3

import pytest

from bot.db import Database, DatabaseError, migrations
from sitcom.settings import SceneSettings


async def add_scene(db: Database, lines=("JERRY: Hello.", "NEWMAN: Hello, Jerry.")):
    return await db.add_scene(guild_id=1, channel_id=2, user_id=3, prompt="JERRY: Hello.",
                              model_name="tiny", lines=list(lines), new_tokens=9, seconds=0.5)


@pytest.mark.asyncio
async def test_schema_is_migrated_once_with_wal_and_foreign_keys(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    latest = migrations()[-1][0]
    assert await db.schema_version() == latest
    await db.close()
    db = await Database.open(tmp_path / "a.db")  # reopening applies nothing twice
    assert await db.schema_version() == latest
    assert (await db._fetch("PRAGMA journal_mode"))[0][0] == "wal"
    assert (await db._fetch("PRAGMA foreign_keys"))[0][0] == 1
    with pytest.raises(DatabaseError):  # a vote for a line that does not exist
        await db.add_vote(5, 999)
    await db.close()


@pytest.mark.asyncio
async def test_everything_survives_a_restart(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    await db.save_settings(1, 2, 3, SceneSettings(temperature=1.25, top_k=7))
    scene = await add_scene(db)
    await db.place_lines(555, scene.line_ids)
    assert await db.add_vote(9, scene.line_ids[1])
    await db.set_state("active_checkpoint", "ft-1")
    await db.close()

    db = await Database.open(tmp_path / "a.db")
    settings = await db.get_settings(2)
    assert (settings.temperature, settings.top_k) == (1.25, 7)
    assert await db.get_settings(99) == SceneSettings()
    assert await db.line_at(555, 2) == scene.line_ids[1]
    assert await db.line_at(555, 3) is None and await db.line_at(556, 1) is None
    assert [(r.text, r.votes) for r in await db.best(1)] == [("NEWMAN: Hello, Jerry.", 1)]
    assert await db.get_state("active_checkpoint") == "ft-1"
    assert await db.reset_settings(2) and await db.get_settings(2) == SceneSettings()
    await db.close()


@pytest.mark.asyncio
async def test_one_vote_per_user_per_line(tmp_path):
    db = await Database.open(tmp_path / "a.db")
    scene = await add_scene(db)
    line = scene.line_ids[0]
    assert await db.add_vote(9, line) is True
    assert await db.add_vote(9, line) is False
    assert await db.add_vote(10, line) is True
    assert [r.votes for r in await db.best(1)] == [2]
    assert await db.remove_vote(9, line) is True and await db.remove_vote(9, line) is False
    assert [r.votes for r in await db.best(1, channel_id=2)] == [1]
    assert await db.best(1, channel_id=3) == [] and await db.best(4) == []
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
