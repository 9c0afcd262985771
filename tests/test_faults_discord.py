"""Issue 19, Discord: lose nothing, post once.

discord.py's real CommandTree and models on real SQLite and the real engine (tiny models);
the network edge is the strict Recorder (tests/discord_payloads.py) or, for the whole
`python -m bot` process, the Discord stand-in on loopback (tests/discord_server.py).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import sqlite3
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import pytest_asyncio
from discord_payloads import (
    APP_ID,
    CHANNEL_ID,
    EPHEMERAL,
    MANAGE,
    USER_ID,
    command_payload,
    invoke,
    option,
    subcommand,
)
from discord_server import FakeDiscord
from helpers import make_config, scripted_loader, start_bot, teleprompter_model

from bot.core import Core
from bot.db import Database, LeaseHeld, Place
from bot.storage import open_database
from sitcom.engine import SceneEngine
from sitcom.settings import SceneSettings

ROOT = Path(__file__).resolve().parent.parent
MESSAGES = f"/channels/{CHANNEL_ID}/messages"
SCOPE = f"Discord application {APP_ID}"


async def started(tmp_path, tiny_model_dir, loader=None):
    bot, rec = await start_bot(make_config(tmp_path, tiny_model_dir), loader=loader)
    await invoke(
        bot,
        command_payload(
            "settings", [subcommand("set", option("max_new_tokens", 16))], permissions=MANAGE
        ),
    )
    rec.calls.clear()
    return bot, rec


@pytest_asyncio.fixture
async def running(tmp_path, tiny_model_dir):
    bot, rec = await started(tmp_path, tiny_model_dir)
    yield bot, rec
    await bot.close()


def contents(rec) -> list[str]:
    return [r["content"] for r in rec.replies() if r.get("content")]


def scene(prompt: str = "Jerry: Hello.", **extra) -> dict:
    return command_payload("scene", [option("prompt", prompt)], **extra)


# -- 2. a post whose answer was lost is not posted again --------------------------------


@pytest.mark.asyncio
async def test_a_post_whose_answer_was_lost_is_not_posted_twice(running):
    bot, rec = running
    rec.drop_answer("POST", MESSAGES, aiohttp.ServerDisconnectedError())
    await invoke(bot, scene())
    assert "Scene 1 is ready" in contents(rec)[-1]
    tries = rec.find("POST", MESSAGES)
    assert len(tries) == 2  # the retry went out ...
    assert tries[0].json["nonce"] == tries[1].json["nonce"] and tries[1].json["enforce_nonce"]
    (created,) = rec.created  # ... and Discord answered it with the message made before
    stored = await bot.core.db.get_scene(1)
    assert {line.message_id for line in stored.lines} == {created["id"]}
    reactions = rec.find("PUT", "/reactions/")
    assert reactions and all(f"/messages/{created['id']}/" in r.path for r in reactions)


# -- 3. two `/scene #ID` at once post it once ---------------------------------------------


@pytest.mark.asyncio
async def test_two_reposts_at_once_post_the_scene_once(running):
    bot, rec = running
    for _ in range(3):  # the first posting fails: scene 1 is stored, not posted
        rec.fail("POST", MESSAGES, aiohttp.ServerDisconnectedError())
    await invoke(bot, scene())
    assert "/scene #1" in contents(rec)[-1] and not rec.created

    await asyncio.gather(invoke(bot, scene("#1")), invoke(bot, scene("#1", user_id=USER_ID + 1)))
    assert len(rec.created) == 1
    texts = contents(rec)
    assert sum("Scene 1 is ready" in t for t in texts) == 1
    busy = [r for r in rec.replies() if "being posted right now" in (r.get("content") or "")]
    assert len(busy) == 1 and busy[0]["flags"] & EPHEMERAL
    assert (await bot.core.db.get_scene(1)).posted
    await invoke(bot, scene("#1"))
    assert "posted already" in contents(rec)[-1]


# -- 4. a scene with nothing beyond the prompt -------------------------------------------


def writes_nothing_at_first(generations: int):
    """The scripted model, except that its first `generations` scenes end at once."""
    from sitcom.model.catalog import load_model

    def load(name: str):
        _, tokenizer = load_model(name)
        model = teleprompter_model(tokenizer, "GEORGE: What is it?\nKRAMER: Giddyup!\n")

        def hook(module, args, kwargs, output):
            ids = kwargs.get("input_ids")  # None: guidance's unconditional pass
            if ids is not None and ids.shape[1] > 1:  # a prefill: a new generation
                load.generations += 1
            if load.generations <= generations:
                output.logits[:, -1, tokenizer.eos_token_id] += 1000.0
            return output

        model.register_forward_hook(hook, with_kwargs=True)
        return model, tokenizer

    load.generations = 0
    return load


@pytest.mark.asyncio
async def test_a_prompt_only_scene_is_written_again_once(tmp_path, tiny_model_dir):
    loader = writes_nothing_at_first(1)
    bot, rec = await started(tmp_path, tiny_model_dir, loader=loader)
    try:
        await invoke(bot, scene("Elaine: Get out!"))
        assert "Scene 1 is ready" in contents(rec)[-1]
        assert loader.generations == 2
        stored = await bot.core.db.get_scene(1)
        assert [line.from_prompt for line in stored.lines][:2] == [True, False]
    finally:
        await bot.close()


@pytest.mark.asyncio
async def test_a_prompt_only_scene_twice_is_not_announced_as_ready(tmp_path, tiny_model_dir):
    loader = writes_nothing_at_first(5)
    bot, rec = await started(tmp_path, tiny_model_dir, loader=loader)
    try:
        await invoke(bot, scene("Elaine: Get out!"))
        final = contents(rec)[-1]
        assert "wrote nothing beyond your lines" in final and "ready" not in final
        assert loader.generations == 2  # one retry, no more
        assert not rec.created and await bot.core.db.get_scene(1) is None
    finally:
        await bot.close()


# -- 5. a dropped connection on the final acknowledgement edit ---------------------------


@pytest.mark.asyncio
@pytest.mark.parametrize("drops", [1, 3])
async def test_a_dropped_final_edit_is_retried_and_never_an_error(running, caplog, drops):
    bot, rec = running
    for _ in range(drops):  # 3: every attempt of the retry policy
        rec.fail(
            "PATCH",
            "/messages/@original",
            aiohttp.ServerDisconnectedError(),
            content="Scene 1 is ready",
        )
    with caplog.at_level(logging.INFO):
        await invoke(bot, scene())
    assert not rec.faults and (await bot.core.db.get_scene(1)).posted
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    texts = contents(rec)
    assert not any("went wrong" in t for t in texts)  # no false failure
    if drops == 1:
        assert "Scene 1 is ready" in texts[-1]
    else:
        (line,) = [r for r in caplog.records if "could not edit" in r.getMessage()]
        assert line.levelno == logging.WARNING


# -- 6. a late acknowledgement ------------------------------------------------------------


@pytest.mark.asyncio
async def test_scene_is_acknowledged_before_a_busy_database_is_read(running):
    """Created 2.5 s ago and the database busy for a second: the acknowledgement must not
    wait for it, or Discord answers 10062 at 3 s and the scene is lost."""
    bot, rec = running
    async with bot.core.db._lock:  # another command's transaction holds the database
        command = asyncio.ensure_future(invoke(bot, scene(age_s=2.5)))
        await asyncio.sleep(1.0)
    await command
    assert "Scene 1 is ready" in contents(rec)[-1]
    assert (await bot.core.db.get_scene(1)).posted and len(rec.created) == 1


@pytest.mark.asyncio
async def test_an_interaction_answered_after_3_s_runs_no_job(running, caplog, monkeypatch):
    bot, rec = running
    submitted = []
    real = bot.core.engine.submit

    async def spy(*args, **kwargs):
        submitted.append(args)
        return await real(*args, **kwargs)

    monkeypatch.setattr(bot.core.engine, "submit", spy)
    with caplog.at_level(logging.INFO):
        await invoke(bot, scene(age_s=3.5))  # delivered late: Discord says 10062
        await asyncio.sleep(0.5)
    assert submitted == [] and bot.core.engine.queued == bot.core.engine.running == 0
    assert not rec.created and await bot.core.db.get_scene(1) is None
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert any("could not acknowledge" in r.getMessage() for r in caplog.records)


# -- 7. the wait estimate, against the engine --------------------------------------------


@pytest.mark.asyncio
async def test_wait_estimate_matches_the_engine(tiny_model_dir):
    """Scenes end long before their 400-token budget (as real ones do), at a steady
    ~50 ms a token: each job's estimate at submission is within 2x of its real wait."""
    from sitcom.model.catalog import load_model

    def load(name: str):
        _, tokenizer = load_model(name)
        model = teleprompter_model(tokenizer, "GEORGE: What?\nKRAMER: Hi!<|endoftext|>")
        model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
        return model, tokenizer

    engine = SceneEngine(
        model=str(tiny_model_dir), loader=load, max_batch=2, timeout_s=600, per_user_limit=10
    )
    await engine.start()
    budget = SceneSettings(max_new_tokens=400)
    try:
        warm = await engine.submit("JERRY: Hello.", budget, "u")
        scene = await warm.result()
        assert scene.new_tokens < 40  # the scene ended by itself, far below its budget

        async def waited(job) -> float:
            await job.result()
            return time.monotonic()

        jobs, waits = [], []
        for _ in range(5):
            start = time.monotonic()
            job = await engine.submit("JERRY: Hello.", budget, "u")
            jobs.append((job, start, asyncio.ensure_future(waited(job))))
        for job, start, done in jobs:
            waits.append((job.eta_s, await done - start))
    finally:
        await engine.close()
    for eta, real in waits:
        assert eta is not None and real / 2 <= eta <= real * 2, waits


# -- 8. one process per application and shards --------------------------------------------


def test_shards_come_from_the_environment_checked():
    from bot.config import Config, ConfigError

    config = Config.from_env({"SHARD_ID": "1", "SHARD_COUNT": "2"}, dotenv=False)
    assert (config.shard_ids, config.shard_count) == ((1,), 2)
    assert Config.from_env({}, dotenv=False).shard_count is None
    for bad in (
        {"SHARD_ID": "0"},
        {"SHARD_ID": "2", "SHARD_COUNT": "2"},
        {"SHARD_ID": "-1", "SHARD_COUNT": "2"},
        {"SHARD_ID": "x", "SHARD_COUNT": "2"},
    ):
        with pytest.raises(ConfigError, match="SHARD"):
            Config.from_env(bad, dotenv=False)


@pytest.mark.asyncio
async def test_a_lease_is_renewed_while_running_and_released(tmp_path, tiny_model_dir):
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    core.lease_ttl_s = 0.6
    await core.hold_lease(SCOPE, (0, 1))
    first = time.time()
    await asyncio.sleep(1.2)  # two TTLs: alive only if renewed
    db = sqlite3.connect(tmp_path / "bot.db")
    ((host, pid, expires),) = db.execute("SELECT host, pid, expires_at FROM leases").fetchall()
    assert (host, pid) == (socket.gethostname(), os.getpid()) and expires > first + 0.6
    await core.close()
    assert db.execute("SELECT COUNT(*) FROM leases").fetchone() == (0,)


@pytest.mark.asyncio
async def test_a_process_whose_lease_was_taken_over_is_told_to_stop(tmp_path, tiny_model_dir):
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    core.lease_ttl_s = 0.3
    lost: list[str] = []
    try:
        await core.hold_lease(SCOPE, (0, 1), on_lost=lost.append)
        with sqlite3.connect(tmp_path / "bot.db") as db:  # it stalled; another took over
            db.execute(
                "UPDATE leases SET host = 'web-9', pid = 99, expires_at = ?", (time.time() + 60,)
            )
        for _ in range(100):
            if lost:
                break
            await asyncio.sleep(0.05)
    finally:
        await core.close()
    assert len(lost) == 1 and "web-9" in lost[0] and "99" in lost[0]
    rows = sqlite3.connect(tmp_path / "bot.db").execute("SELECT host FROM leases").fetchall()
    assert rows == [("web-9",)]  # the new holder's lease is left alone


@pytest.mark.asyncio
async def test_processes_on_other_shards_follow_a_checkpoint_switch(
    tmp_path, tiny_model_dir, db_target
):
    import shutil

    shutil.copytree(tiny_model_dir, tmp_path / "checkpoints" / "ft-1")
    # on SQLite (db_target is then make_config's own file) or a PostgreSQL database
    url = db_target if isinstance(db_target, str) else None
    config = make_config(tmp_path, tiny_model_dir, database_url=url)
    first, second = [await Core.start(config) for _ in range(2)]
    try:
        for core, shard in ((first, (0, 2)), (second, (1, 2))):
            core.lease_ttl_s = 0.3
            await core.hold_lease(SCOPE, shard)
        await first.use_checkpoint("ft-1")
        for _ in range(100):
            if second.checkpoint == "ft-1":
                break
            await asyncio.sleep(0.05)
        assert second.checkpoint == "ft-1"
        assert Path(second.engine.model_name).name == "ft-1"
    finally:
        await first.close()
        await second.close()


@pytest.mark.asyncio
async def test_leases_overlap_by_shards_and_die_with_their_process(db_target):
    db = await open_database(db_target)
    here = socket.gethostname()
    try:
        await db.acquire_lease(SCOPE, (0, 2), host="web-2", pid=4242, ttl_s=30)
        await db.acquire_lease(SCOPE, (1, 2), host="web-3", pid=1, ttl_s=30)  # scale-out
        for shard in ((0, 2), (0, 1), (2, 3)):  # the same shard, or a different split
            with pytest.raises(LeaseHeld) as held:
                await db.acquire_lease(SCOPE, shard, host="web-4", pid=7, ttl_s=30)
            assert "web-2" in str(held.value) or "web-3" in str(held.value)
        await db.acquire_lease("Discord application 9", (0, 1), host="web-4", pid=7, ttl_s=30)
        # an expired lease, or one of a dead process on this host, is taken over
        await db.acquire_lease(SCOPE, (0, 1), host="web-4", pid=7, ttl_s=30, now=time.time() + 60)
        dead = await asyncio.create_subprocess_exec(sys.executable, "-c", "pass")
        await dead.wait()
        other = "Discord application 10"
        await db.acquire_lease(other, (0, 1), host=here, pid=dead.pid, ttl_s=30)
        await db.acquire_lease(other, (0, 1), host=here, pid=os.getpid(), ttl_s=30)
    finally:
        await db.close()


@pytest.mark.asyncio
async def test_a_second_process_on_the_same_shards_is_refused_in_one_line(
    tmp_path, tiny_model_dir, monkeypatch, capsys
):
    from discord.http import Route

    from bot.__main__ import run

    db = await Database.open(tmp_path / "bot.db")
    await db.acquire_lease(SCOPE, (0, 1), host="web-2", pid=4242, ttl_s=60)
    await db.close()
    server = FakeDiscord()
    await server.start()
    monkeypatch.setattr(Route, "BASE", server.base + "/api/v10")
    try:
        config = make_config(tmp_path, tiny_model_dir, token="x.y.z")
        assert await run(config, loader=scripted_loader()) == 1
    finally:
        await server.close()
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "Traceback" not in err, err
    assert "web-2" in errors[0] and "4242" in errors[0] and str(APP_ID) in errors[0]
    assert not server.find("PUT", "/commands")  # refused before it did anything


@pytest.mark.asyncio
async def test_processes_with_other_shards_run_side_by_side(tmp_path, tiny_model_dir, monkeypatch):
    import discord.gateway
    import yarl
    from discord.http import Route

    from bot.__main__ import run

    db = await Database.open(tmp_path / "bot.db")
    await db.acquire_lease(SCOPE, (0, 2), host="web-2", pid=4242, ttl_s=60)
    await db.close()
    server = FakeDiscord()
    await server.start()
    monkeypatch.setattr(Route, "BASE", server.base + "/api/v10")
    monkeypatch.setattr(
        discord.gateway.DiscordWebSocket,
        "DEFAULT_GATEWAY",
        yarl.URL(f"ws://127.0.0.1:{server.port}/gateway/"),
    )
    stop = asyncio.Event()
    try:
        config = make_config(tmp_path, tiny_model_dir, token="x.y.z", shard_ids=(1,), shard_count=2)
        bot = asyncio.ensure_future(run(config, loader=scripted_loader(), stop=stop))
        await asyncio.wait_for(server.identified.wait(), 60)
        stop.set()
        assert await bot == 0
    finally:
        await server.close()
    rows = (
        sqlite3.connect(tmp_path / "bot.db").execute("SELECT shard_id, host FROM leases").fetchall()
    )
    assert rows == [(0, "web-2")]  # its own is released, the other's untouched


# -- 1. a second signal on the Discord process --------------------------------------------

SLOW_MODEL = """
import time
sys.path.insert(0, {tests!r})
import sitcom.model.serving
from helpers import teleprompter_model

real = sitcom.model.serving.load_hf_model

def slow(name):
    _, tokenizer = real(name)
    model = teleprompter_model(tokenizer, "ELAINE: Get out!\\nGEORGE: What?\\n")
    model.register_forward_pre_hook(lambda module, args: time.sleep(0.05))
    return model, tokenizer

sitcom.model.serving.load_hf_model = slow
"""


@pytest.mark.e2e
@pytest.mark.asyncio
@pytest.mark.parametrize(
    "signals", [("SIGTERM", "SIGTERM"), ("SIGINT", "SIGINT")], ids=["sigterm-twice", "ctrl-c-twice"]
)
async def test_a_second_signal_on_the_discord_process_keeps_the_running_scene(
    tmp_path, tiny_model_dir, signals
):
    """The real `python -m bot` on Discord: a scene running, then two signals 1 s apart
    (with a 600 s deadline, so only the second can cut it): the scene is cut, stored and
    posted with its note, the acknowledgement says so, the database is closed (no -wal or
    -shm) and the exit status is 0."""
    db = await Database.open(tmp_path / "bot.db")
    await db.save_settings(
        Place("discord", "1", str(CHANNEL_ID)), "1", SceneSettings(max_new_tokens=400)
    )
    await db.close()
    server = FakeDiscord()
    await server.start()
    env = {k: v for k, v in os.environ.items() if k not in ("SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")}
    env.update(
        DISCORD_TOKEN="x.y.z",
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        BOT_DB=str(tmp_path / "bot.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        SHUTDOWN_TIMEOUT_S="600",
        GENERATION_TIMEOUT_S="600",
    )
    code = server.launcher(SLOW_MODEL.format(tests=str(ROOT / "tests")))
    bot = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        code,
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        await asyncio.wait_for(server.identified.wait(), 180)
        await server.dispatch("INTERACTION_CREATE", scene("Jerry: Hello, Newman."))
        await server.wait_for(None, "/", "in the queue")  # acknowledged: it is running
        await asyncio.sleep(2.0)  # ~30 of its 400 tokens: a line or two written
        for name in signals:
            bot.send_signal(getattr(signal, name))
            await asyncio.sleep(1.0)
        _, err = await asyncio.wait_for(bot.communicate(), 90)
    finally:
        if bot.returncode is None:
            bot.kill()
        await server.close()
    err = err.decode()
    assert bot.returncode == 0, err
    assert "Traceback" not in err, err
    (posted,) = server.created
    assert "The bot was shutting down, so the scene stops here." in posted["content"]
    assert "ELAINE: Get out!" in posted["content"]
    edits = [r.json["content"] for r in server.find("PATCH", "/messages/@original")]
    assert "Scene 1 is ready" in edits[-1]
    assert not (tmp_path / "bot.db-wal").exists() and not (tmp_path / "bot.db-shm").exists()
    (tokens,) = (
        sqlite3.connect(tmp_path / "bot.db").execute("SELECT new_tokens FROM scenes").fetchone()
    )
    assert 0 < tokens < 400


# -- 9. a speaker after emoji; who may re-post ---------------------------------------------


@pytest.mark.asyncio
async def test_a_speaker_after_emoji_opens_the_scene_as_that_speaker(running):
    bot, rec = running
    await invoke(bot, scene("🎉Kramer: hi"))
    first, *written = (await bot.core.db.get_scene(1)).lines
    assert (first.text, first.from_prompt) == ("KRAMER: hi", True)
    assert written and not any(line.from_prompt for line in written)


@pytest.mark.asyncio
async def test_anyone_in_the_channel_may_finish_posting_a_saved_scene(running):
    """The decision: `/scene #ID` posts what of a stored scene is not out yet, for anyone
    who may use /scene in that scene's own channel (it only finishes what its author asked
    for there); never in another channel, never a second copy."""
    bot, rec = running
    for _ in range(3):
        rec.fail("POST", MESSAGES, aiohttp.ServerDisconnectedError())
    await invoke(bot, scene())
    await invoke(bot, scene("#1", channel_id=CHANNEL_ID + 1, user_id=USER_ID + 2))
    assert "There is no scene 1 in this channel" in contents(rec)[-1] and not rec.created
    await invoke(bot, scene("#1", user_id=USER_ID + 2))
    assert "Scene 1 is ready" in contents(rec)[-1] and len(rec.created) == 1
