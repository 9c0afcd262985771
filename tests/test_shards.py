"""Issue 21, chat platforms: Discord shard clusters (AutoShardedBot, SHARD_IDS of
SHARD_COUNT, one database lease per shard) and several Slack processes on one database.

Real discord.py (AutoShardedBot, its gateway client), real slack-bolt, real SQLite and the
real engine on the tiny models; the network edge is the Discord stand-in
(tests/discord_server.py), the Recorder (tests/discord_payloads.py) or the Slack fake
(tests/slack_fake.py)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import discord.gateway
import pytest
import yarl
from discord.ext import commands
from discord.http import Route
from discord_payloads import APP_ID, GUILD_ID, Recorder, command_payload
from discord_server import FakeDiscord
from helpers import command, make_config, refs, scripted_loader, sign, start_bot, start_slack
from slack_fake import (
    ADMIN,
    APP_TOKEN,
    BOT_TOKEN,
    TEAM,
    USER,
    FakeSlack,
    reaction_event,
    slash_command,
)

from bot.__main__ import run
from bot.config import Config, ConfigError
from bot.core import Core
from bot.db import Database, LeaseHeld
from bot.slack.app import SlackFrontend, socket_mode_scope
from bot.slack.surface import make_client

SCOPE = f"Discord application {APP_ID}"
ROOT = Path(__file__).resolve().parent.parent


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


# -- a cluster: gateway processes on the Discord stand-in --------------------------------


def bot_env(tmp_path, tiny_model_dir, **extra: str) -> dict[str, str]:
    # on BOT_DB (the leases are read from it), in-process writing: no DATABASE_URL/REDIS_URL
    skip = ("SLACK_", "SHARD_", "DATABASE_URL", "REDIS_URL")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(
        DISCORD_TOKEN="x.y.z",
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        BOT_DB=str(tmp_path / "bot.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


async def gateway_process(server: FakeDiscord, tmp_path, env: dict[str, str]):
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        server.launcher(),
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_gateway_processes_split_the_shards_and_overlaps_are_refused(
    tmp_path, tiny_model_dir
):
    """`python -m bot` twice on one token and database, SHARD_IDS=0,1 and 2,3 of
    SHARD_COUNT=4: both start, each IDENTIFYs only its own shards, only shard 0's process
    syncs the commands, an interaction reaches the process of its guild's shard; a third
    with SHARD_IDS=1,2 exits 1 with one line naming the holder's host and pid."""
    server = FakeDiscord(shards=4, required_shards=4)
    await server.start()
    running = []
    try:
        first = await gateway_process(
            server, tmp_path, bot_env(tmp_path, tiny_model_dir, SHARD_IDS="0,1", SHARD_COUNT="4")
        )
        running.append(first)
        assert sorted(await server.wait_identified(2)) == [(0, 4), (1, 4)]
        second = await gateway_process(
            server, tmp_path, bot_env(tmp_path, tiny_model_dir, SHARD_IDS="2, 3", SHARD_COUNT="4")
        )
        running.append(second)
        assert sorted((await server.wait_identified(4))[2:]) == [(2, 4), (3, 4)]
        host = socket.gethostname()
        assert leases(tmp_path) == [
            (0, 4, host, first.pid),
            (1, 4, host, first.pid),
            (2, 4, host, second.pid),
            (3, 4, host, second.pid),
        ]
        assert len(server.find("PUT", "/commands")) == 1

        # GUILD_ID is on shard 2: Discord sends its interactions to the second process
        assert (GUILD_ID >> 22) % 4 == 2
        await server.dispatch("INTERACTION_CREATE", command_payload("best"))
        await server.wait_for("POST", "/callback")

        third = await gateway_process(
            server, tmp_path, bot_env(tmp_path, tiny_model_dir, SHARD_IDS="1,2", SHARD_COUNT="4")
        )
        running.append(third)
        _, err = await asyncio.wait_for(third.communicate(), 180)
        err = err.decode()
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert third.returncode == 1 and len(errors) == 1 and "Traceback" not in err, err
        assert f"pid {first.pid} on host {host}" in errors[0] and "shard 1 of 4" in errors[0]
        assert len(server.identifies) == 4  # it connected nothing

        for process in (first, second):
            process.send_signal(signal.SIGTERM)
        for process in (first, second):
            _, err = await asyncio.wait_for(process.communicate(), 90)
            assert process.returncode == 0 and "Traceback" not in err.decode(), err.decode()
        assert leases(tmp_path) == []
    finally:
        for process in running:
            if process.returncode is None:
                process.kill()
                await process.wait()
        await server.close()


@pytest.mark.asyncio
async def test_too_few_shards_for_discord_is_one_line(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """Discord closes the gateway with 4011 Sharding required when the bot is in more
    servers than its shards may hold: `python -m bot` says to raise SHARD_COUNT."""
    server = FakeDiscord(shards=2, required_shards=2)
    await server.start()
    monkeypatch.setattr(Route, "BASE", server.base + "/api/v10")
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket,
        "DEFAULT_GATEWAY",
        yarl.URL(f"ws://127.0.0.1:{server.port}/gateway/"),
    )
    try:
        config = make_config(tmp_path, tiny_model_dir, token="x.y.z", shard_count=1)
        status = await asyncio.wait_for(run(config, loader=scripted_loader()), 120)
    finally:
        await server.close()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "Sharding required" in errors[0] and "SHARD_COUNT" in errors[0]
    assert leases(tmp_path) == []


# -- Slack: HTTP instances behind a load balancer; one Socket Mode connection ---------------


async def post_signed(http, app, body: str, kind: str, retry: str = "") -> str:
    headers = {"Content-Type": kind, **sign("s3cret", body)}
    if retry:  # how Slack marks a redelivery (same event_id)
        headers |= {"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": "http_timeout"}
    async with http.post(
        f"http://127.0.0.1:{app.port}/slack/events", data=body, headers=headers
    ) as r:
        assert r.status == 200
        return await r.text()


async def handled(app, goal: int) -> None:
    for _ in range(1000):
        if app.reactions_handled >= goal:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"{app.reactions_handled} reaction events handled, not {goal}")


@pytest.mark.asyncio
async def test_slack_http_instances_share_one_database(tmp_path, tiny_model_dir):
    """Two HTTP-mode instances (A and B, as behind a load balancer) on one database: a
    /scene on A, a vote on B, a vote on A whose retried delivery lands on B (counted once),
    /best and `/scene #1` on B know A's scene."""
    fake = await FakeSlack().start()
    http_mode = dict(slack_app_token=None, slack_signing_secret="s3cret", slack_port=0)
    a = await start_slack(tmp_path, tiny_model_dir, fake, **http_mode)
    b = await start_slack(tmp_path, tiny_model_dir, fake, **http_mode)
    form = "application/x-www-form-urlencoded"
    try:
        async with aiohttp.ClientSession() as http:
            opening = slash_command(fake, "/scene", "Elaine: Jerry! George!")
            await post_signed(http, a, urlencode(opening), form)
            await fake.wait_for(
                lambda: any("is ready" in r["text"] for r in fake.replies(opening["response_url"]))
            )
            ref = refs(fake)[0]

            async def vote(app, user: str, event_id: str | None = None, retry: str = "") -> str:
                body = reaction_event("reaction_added", "one", ref, user=user, event_id=event_id)
                goal = app.reactions_handled + 1
                await post_signed(http, app, json.dumps(body), "application/json", retry)
                await handled(app, goal)
                return body["event_id"]

            async def tally() -> list[tuple[int, int]]:
                return [(r.line_no, r.votes) for r in await b.core.db.best("slack", TEAM)]

            await vote(b, USER)
            assert await tally() == [(2, 1)]
            taken = await vote(a, ADMIN)  # A took it, Slack timed out waiting: a retry ...
            await vote(b, ADMIN, event_id=taken, retry="1")  # ... that the balancer sends to B
            assert await tally() == [(2, 2)]
            assert (a.reactions_handled, b.reactions_handled) == (1, 2)

            async def first_answer(app, name: str, text: str) -> str:
                payload = slash_command(fake, name, text)
                said = await post_signed(http, app, urlencode(payload), form)
                if said and json.loads(said).get("text"):
                    return json.loads(said)["text"]
                url = payload["response_url"]
                return (await fake.wait_for(lambda: fake.replies(url)))[0]["text"]

            assert "GEORGE: What is it?" in await first_answer(b, "/best", "channel")
            assert "Best lines in this workspace" in await first_answer(b, "/best", "")
            assert "posted already" in await first_answer(b, "/scene", "#1")
    finally:
        for app in (a, b):
            await app.core.close()
            await app.close()
        await fake.close()


@pytest.mark.asyncio
async def test_a_second_socket_mode_process_is_refused_in_one_line(
    tmp_path, tiny_model_dir, capsys
):
    """Slack sends each event to one of an app's Socket Mode connections at random: a
    second process connecting with the same app is refused, naming the first."""
    fake = await FakeSlack().start()
    db = await Database.open(tmp_path / "bot.db")
    await db.acquire_lease(socket_mode_scope(APP_TOKEN), (0, 1), host="web-2", pid=4242, ttl_s=60)
    await db.close()
    config = make_config(
        tmp_path, tiny_model_dir, slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN
    )
    try:
        client = make_client(BOT_TOKEN, fake.base_url)
        assert await run(config, loader=scripted_loader(), slack_client=client) == 1
    finally:
        await fake.close()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "Socket Mode" in errors[0] and "pid 4242 on host web-2" in errors[0]
    assert "SHARD" not in errors[0]
    assert not fake.find("apps.connections.open")  # it connected nothing
    assert leases(tmp_path) == [(0, 1, "web-2", 4242)]


@pytest.mark.asyncio
async def test_a_socket_mode_process_holds_its_lease_until_it_stops(tmp_path, tiny_model_dir):
    fake = await FakeSlack().start()
    app = await start_slack(tmp_path, tiny_model_dir, fake)
    try:
        assert leases(tmp_path) == [(0, 1, *HERE)]
        ack = await command(fake, "/settings", "show")
        assert "Scene settings" in ack["text"]
    finally:
        await app.core.close()
        await app.close()
        await fake.close()
    assert leases(tmp_path) == []
    assert socket_mode_scope("xapp-1-A0123ABCD-1234-abcd") == "Slack app A0123ABCD, Socket Mode"


@pytest.mark.asyncio
async def test_no_recommended_shard_count_is_one_line(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    """GET /gateway/bot answered 503: `python -m bot` (no SHARD_COUNT) says so in one line."""
    server = FakeDiscord(gateway_bot_status=503)
    await server.start()
    monkeypatch.setattr(Route, "BASE", server.base + "/api/v10")
    try:
        config = make_config(tmp_path, tiny_model_dir, token="x.y.z")
        status = await asyncio.wait_for(run(config, loader=scripted_loader()), 120)
    finally:
        await server.close()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert status == 1 and len(errors) == 1 and "Traceback" not in err, err
    assert "GET /gateway/bot (503 Service Unavailable)" in errors[0]
    assert not server.identifies and leases(tmp_path) == []


@pytest.mark.asyncio
async def test_losing_one_shard_stops_the_process_and_gives_back_the_rest(tmp_path, tiny_model_dir):
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    core.lease_ttl_s = 0.3
    lost: list[str] = []
    try:
        await core.hold_leases(SCOPE, [(0, 4), (1, 4)], on_lost=lost.append)
        with sqlite3.connect(tmp_path / "bot.db") as db:  # it stalled; shard 1 was taken over
            db.execute(
                "UPDATE leases SET host = 'web-9', pid = 99, expires_at = ? WHERE shard_id = 1",
                (time.time() + 60,),
            )
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.05)
        assert len(lost) == 1 and "pid 99 on host web-9" in lost[0]
        assert leases(tmp_path) == [(1, 4, "web-9", 99)]  # shard 0 given back at once
    finally:
        await core.close()
    assert leases(tmp_path) == [(1, 4, "web-9", 99)]


@pytest.mark.asyncio
async def test_a_socket_mode_process_whose_lease_was_taken_over_disconnects(
    tmp_path, tiny_model_dir
):
    fake = await FakeSlack().start()
    config = make_config(
        tmp_path, tiny_model_dir, slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN
    )
    core = await Core.start(config, loader=scripted_loader())
    core.lease_ttl_s = 0.3
    app = SlackFrontend(config, core, client=make_client(BOT_TOKEN, fake.base_url))
    try:
        await app.start()
        assert app._socket is not None
        with sqlite3.connect(tmp_path / "bot.db") as db:
            db.execute(
                "UPDATE leases SET host = 'web-9', pid = 99, expires_at = ?", (time.time() + 60,)
            )
        for _ in range(100):
            if app._socket is None:
                break
            await asyncio.sleep(0.05)
        assert app._socket is None  # the other process serves the app now
    finally:
        await core.close()
        await app.close()
        await fake.close()
