"""Issue 21, chat platforms: Discord shard clusters (AutoShardedBot, SHARD_IDS of
SHARD_COUNT, one database lease per shard) and several Slack processes on one database.

Real discord.py (AutoShardedBot, its gateway client), real slack-bolt, real SQLite and the
real engine on the tiny models; the network edge is the Discord stand-in
(tests/discord_server.py), the Recorder (tests/discord_payloads.py) or the Slack fake
(tests/slack_fake.py)."""

from __future__ import annotations

import os
import socket
import sqlite3

import pytest
from discord.ext import commands
from discord_payloads import APP_ID, Recorder
from helpers import make_config, scripted_loader, start_bot

from bot.config import Config, ConfigError
from bot.core import Core
from bot.db import Database, LeaseHeld

SCOPE = f"Discord application {APP_ID}"


def shards(**env: str) -> tuple[tuple[int, ...] | None, int | None]:
    config = Config.from_env(env, dotenv=False)
    return config.shard_ids, config.shard_count


# -- SHARD_IDS / SHARD_COUNT ------------------------------------------------------------


def test_shard_ids_of_a_shard_count_come_from_the_environment():
    assert shards() == (None, None)  # one process, Discord's recommended count
    assert shards(SHARD_IDS="0,1", SHARD_COUNT="4") == ((0, 1), 4)
    assert shards(SHARD_IDS=" 3, 2 ", SHARD_COUNT="4") == ((3, 2), 4)
    assert shards(SHARD_IDS="5", SHARD_COUNT="6") == ((5,), 6)
    assert shards(SHARD_COUNT="3") == (None, 3)  # every shard of 3 in this process
    assert shards(SHARD_ID="1", SHARD_COUNT="2") == ((1,), 2)  # the one-shard alias


@pytest.mark.parametrize(
    ("env", "said"),
    [
        ({"SHARD_IDS": "0,1"}, "SHARD_IDS needs SHARD_COUNT"),
        ({"SHARD_ID": "0"}, "SHARD_ID needs SHARD_COUNT"),
        ({"SHARD_IDS": "0,4", "SHARD_COUNT": "4"}, "SHARD_IDS: shard 4 is not below SHARD_COUNT"),
        ({"SHARD_IDS": "1,1", "SHARD_COUNT": "4"}, "SHARD_IDS names shard 1 twice"),
        ({"SHARD_IDS": "0,,1", "SHARD_COUNT": "4"}, "SHARD_IDS must be shard numbers"),
        ({"SHARD_IDS": "0-2", "SHARD_COUNT": "4"}, "SHARD_IDS must be shard numbers"),
        ({"SHARD_IDS": "-1", "SHARD_COUNT": "4"}, "SHARD_IDS must be shard numbers"),
        ({"SHARD_IDS": "٣", "SHARD_COUNT": "4"}, "SHARD_IDS must be shard numbers"),
        ({"SHARD_IDS": "0", "SHARD_ID": "0", "SHARD_COUNT": "4"}, "not both"),
        ({"SHARD_ID": "2", "SHARD_COUNT": "2"}, "SHARD_ID must be below SHARD_COUNT (2)"),
        ({"SHARD_IDS": "0", "SHARD_COUNT": "0"}, "SHARD_COUNT must be from 1"),
    ],
)
def test_bad_shard_settings_are_one_line_errors(env, said):
    with pytest.raises(ConfigError) as error:
        Config.from_env(env, dotenv=False)
    assert said in str(error.value) and "\n" not in str(error.value)


# -- one process: AutoShardedBot over its shards, a lease for each -----------------------

HERE = (socket.gethostname(), os.getpid())


def leases(tmp_path) -> list[tuple]:
    with sqlite3.connect(tmp_path / "bot.db") as db:
        return db.execute(
            "SELECT shard_id, shard_count, host, pid FROM leases ORDER BY shard_id"
        ).fetchall()


@pytest.mark.asyncio
async def test_the_bot_runs_its_shards_with_a_lease_for_each(tmp_path, tiny_model_dir):
    config = make_config(tmp_path, tiny_model_dir, shard_ids=(1, 2), shard_count=4)
    bot, rec = await start_bot(config, sync=True)
    try:
        assert isinstance(bot, commands.AutoShardedBot)
        assert (list(bot.shard_ids), bot.shard_count) == ([1, 2], 4)
        assert leases(tmp_path) == [(1, 4, *HERE), (2, 4, *HERE)]
        assert not rec.find("GET", "/gateway/bot")  # the count is set: nothing to ask
        assert not rec.find("PUT", "/commands")  # the process running shard 0 syncs them
    finally:
        await bot.close()
    assert leases(tmp_path) == []


@pytest.mark.asyncio
async def test_unsharded_the_bot_runs_every_shard_discord_recommends(
    tmp_path, tiny_model_dir, monkeypatch
):
    monkeypatch.setattr(Recorder, "shards", 3)
    bot, rec = await start_bot(make_config(tmp_path, tiny_model_dir), sync=True)
    try:
        assert len(rec.find("GET", "/gateway/bot")) == 1
        assert (bot.shard_ids, bot.shard_count) == (None, 3)
        assert leases(tmp_path) == [(0, 3, *HERE), (1, 3, *HERE), (2, 3, *HERE)]
        assert len(rec.find("PUT", "/commands")) == 1
    finally:
        await bot.close()


@pytest.mark.asyncio
async def test_one_held_shard_refuses_them_all_and_keeps_none(tmp_path, tiny_model_dir):
    db = await Database.open(tmp_path / "bot.db")
    await db.acquire_lease(SCOPE, (2, 4), host="web-2", pid=4242, ttl_s=60)
    await db.close()
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    try:
        with pytest.raises(LeaseHeld) as held:
            await core.hold_leases(SCOPE, [(1, 4), (2, 4), (3, 4)])
    finally:
        await core.close()
    said = str(held.value)
    assert "web-2" in said and "4242" in said and "shard 2 of 4" in said and "SHARD_IDS" in said
    assert leases(tmp_path) == [(2, 4, "web-2", 4242)]  # its own first one given back
