"""Issue 21 end to end, on this machine: the many-machine layout as real processes.

PostgreSQL and Redis (the suite's own servers, tests/pg_server.py and tests/redis_server.py),
two Discord gateway processes (`python -m bot`, SHARD_COUNT=2, SHARD_IDS=0 and 1, against the
Discord stand-in tests/discord_server.py) and two `python -m bot worker` processes on the tiny
test model, one thread each. 100 `/scene` interactions from 30 users in guilds of both shards:
after the first 50, one worker is killed with SIGKILL while it is writing and a new one is
started; once it is up, the other 50 (so it takes part); then votes (keycap reactions) from
several users on lines posted by both gateways, some delivered twice. Every scene is stored
once and posted exactly once, every distinct vote counts once, and no process logs a
traceback.
"""

from __future__ import annotations

import asyncio
import collections
import os
import re
import signal
import sys
import time
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from discord_payloads import CHANNEL_ID, GUILD_ID, USER_ID, command_payload, option
from discord_server import FakeDiscord

from bot import queue as q
from bot.db import Place
from bot.discord.utils.formatting import KEYCAPS
from bot.storage import open_database
from sitcom.settings import SceneSettings

pytest_plugins = ["redis_server"]  # its redis_server and redis_url fixtures

ROOT = Path(__file__).resolve().parent.parent
SCENES = 100
USERS = 30
PER_USER = -(-SCENES // USERS)  # 4: every user's scenes may be in the queue at once
TOKENS = 64  # per scene: long enough that the restarted worker takes part
CLAIM_S = 10.0  # QUEUE_CLAIM_TIMEOUT_S: a dead worker's jobs move on after this
# Four guilds, two on each shard ((guild_id >> 22) % 2, as Discord routes events), two
# channels in each.
GUILDS = [GUILD_ID + (k << 22) for k in range(4)]
CHANNELS = {guild: [CHANNEL_ID + 10 * k + c for c in range(2)] for k, guild in enumerate(GUILDS)}
OPENINGS = [
    "JERRY: Hello, Newman.",
    "ELAINE: Jerry! George! You guys, listen!",
    "GEORGE: Serenity now!",
    "KRAMER: Giddyup!",
    "NEWMAN: Hello, Jerry.",
]
HEADER = re.compile(r"^🎬 \*\*Scene (\d+)\*\*( \(part \d+\))? — react")
READY = re.compile(r"🎬 Scene (\d+) is (ready|posted)")

# `python -m bot worker` whose model is the tiny test model writing a fixed script (a random
# tiny model may write nothing beyond the opening, which the bot reports instead of a scene).
WORKER = """
import sys
sys.path.insert(0, {tests!r})
import sitcom.model.serving
from helpers import scripted_loader
sitcom.model.serving.load_hf_model = scripted_loader()
from bot.worker import main
sys.exit(main(sys.argv[1:]))
"""


def shard_of(guild: int) -> int:
    return (guild >> 22) % 2


def scene_payload(i: int) -> tuple[dict, int, int]:
    """The i-th /scene: (INTERACTION_CREATE payload, user id, channel id)."""
    user = USER_ID + i % USERS
    guild = GUILDS[i % len(GUILDS)]
    channel = CHANNELS[guild][(i // len(GUILDS)) % 2]
    payload = command_payload(
        "scene", [option("prompt", OPENINGS[i % len(OPENINGS)])], user_id=user, channel_id=channel
    )
    payload["guild_id"] = payload["channel"]["guild_id"] = str(guild)
    return payload, user, channel


def reaction_payload(message: dict, guild: int, slot: int, user: int) -> dict:
    """MESSAGE_REACTION_ADD as Discord's gateway sends it (a keycap on a scene message)."""
    return {
        "user_id": str(user),
        "channel_id": message["channel_id"],
        "message_id": message["id"],
        "guild_id": str(guild),
        "member": {
            "user": {"id": str(user), "username": f"u{user}", "discriminator": "0", "avatar": None},
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
        },
        "emoji": {"id": None, "name": KEYCAPS[slot - 1]},
        "message_author_id": message["author"]["id"],
        "burst": False,
        "burst_colors": [],
        "type": 0,
    }


def process_env(tiny_model_dir: Path, tmp_path: Path, pg_url: str, redis_url: str, **extra):
    skip = ("SLACK_", "SHARD_", "DATABASE_URL", "REDIS_URL", "DISCORD_TOKEN", "BOT_DB")
    env = {k: v for k, v in os.environ.items() if not k.startswith(skip)}
    env.update(
        PYTHONPATH=str(ROOT),
        DATABASE_URL=pg_url,
        REDIS_URL=redis_url,
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        HUMOUR_MODEL="off",
        QUEUE_SIZE=str(SCENES),
        PER_USER_LIMIT=str(PER_USER),
        QUEUE_CLAIM_TIMEOUT_S=str(CLAIM_S),
        GENERATION_TIMEOUT_S="600",
        SITCOM_THREADS="1",
        OMP_NUM_THREADS="1",
        SITCOM_BACKEND="torch",
        **extra,
    )
    return env


class Processes:
    """The test's subprocesses, each logging to its own file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.running: dict[str, asyncio.subprocess.Process] = {}

    async def start(self, name: str, code: str, env: dict[str, str]) -> asyncio.subprocess.Process:
        log = open(self.tmp_path / f"{name}.log", "wb")  # noqa: SIM115 - the child's for its life
        try:
            proc = await asyncio.create_subprocess_exec(
                sys.executable, "-c", code, cwd=self.tmp_path, env=env,
                stdin=asyncio.subprocess.DEVNULL, stdout=log, stderr=log,
            )  # fmt: skip
        finally:
            log.close()
        self.running[name] = proc
        return proc

    def log(self, name: str) -> str:
        return (self.tmp_path / f"{name}.log").read_text(errors="replace")

    async def stop(self, name: str, timeout: float = 90) -> int:
        proc = self.running[name]
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
        return await asyncio.wait_for(proc.wait(), timeout)

    async def kill_all(self) -> None:
        for proc in self.running.values():
            if proc.returncode is None:
                proc.kill()
                await proc.wait()


async def until(check, what: str, timeout: float) -> object:
    end = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > end:
            raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}")
        await asyncio.sleep(0.2)


def posted_scenes(server: FakeDiscord) -> collections.Counter:
    """How many times each scene id's first message was created in a channel."""
    found = collections.Counter()
    for created in server.created:
        match = HEADER.match(created["content"])
        if match and match.group(2) is None:
            found[int(match.group(1))] += 1
    return found


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_two_gateways_two_workers_100_scenes_one_worker_killed(
    tmp_path, tiny_model_dir, pg_url, redis_url
):
    started = time.monotonic()
    # Short scenes, one candidate each, in every channel: the test is about the plumbing.
    db = await open_database(pg_url)
    try:
        for guild, channels in CHANNELS.items():
            for channel in channels:
                await db.save_settings(
                    Place("discord", str(guild), str(channel)),
                    str(USER_ID),
                    SceneSettings(max_new_tokens=TOKENS, best_of=1),
                )
    finally:
        await db.close()

    server = FakeDiscord(shards=2, required_shards=2)
    await server.start()
    procs = Processes(tmp_path)
    redis = aioredis.from_url(redis_url, decode_responses=True)
    pg = await asyncpg.connect(pg_url)
    env = process_env(tiny_model_dir, tmp_path, pg_url, redis_url)
    worker_code = WORKER.format(tests=str(ROOT / "tests"))
    try:
        for shard in (0, 1):
            gateway_env = dict(
                env, DISCORD_TOKEN="x.y.z", SHARD_COUNT="2", SHARD_IDS=str(shard),
                LOG_LEVEL="WARNING",
            )  # fmt: skip
            await procs.start(f"gateway-{shard}", server.launcher(), gateway_env)
        for n in (1, 2):
            await procs.start(f"worker-{n}", worker_code, dict(env, LOG_LEVEL="INFO"))
        assert sorted(await server.wait_identified(2)) == [(0, 2), (1, 2)]

        async def workers_live() -> bool:
            return len(await q.live_workers(redis)) == 2

        await until(workers_live, "both workers' heartbeats", 180)
        ready_s = time.monotonic() - started

        # -- 100 /scene interactions, a few at a time (each must be answered in 3 s) ----------
        asked: dict[str, tuple[int, int]] = {}  # interaction token -> (user, channel)
        ids: list[str] = []

        async def ask(first: int, last: int) -> None:
            for i in range(first, last):
                payload, user, channel = scene_payload(i)
                asked[payload["token"]] = (user, channel)
                ids.append(payload["id"])
                await server.dispatch("INTERACTION_CREATE", payload)
                if i % 10 == 9 or i == last - 1:

                    async def deferred(upto=i) -> bool:
                        done = {r.path.split("/")[2] for r in server.find("POST", "/callback")}
                        return all(ids[k] in done for k in range(upto + 1))

                    await until(deferred, f"the first {i + 1} interactions' acknowledgements", 30)

        run_start = time.monotonic()
        await ask(0, SCENES // 2)

        # -- kill -9 a worker while it is writing, then start a new one -----------------------
        first = procs.running["worker-1"]

        async def held() -> list:
            return await redis.xpending_range(
                q.JOBS, q.GROUP, min="-", max="+", count=100, consumername=first_id
            )

        async def writing() -> bool:
            nonlocal first_id
            if sum(posted_scenes(server).values()) < 10:
                return False
            mine = [w["id"] for w in await q.live_workers(redis) if w["pid"] == str(first.pid)]
            first_id = mine[0] if mine else ""
            return bool(first_id and await held())

        first_id = ""
        await until(writing, "worker 1 writing, 10 scenes posted", 120)
        first.send_signal(signal.SIGKILL)
        await first.wait()
        in_hand = []  # the jobs it held when it died
        for entry in await held():
            (_, fields), *_ = await redis.xrange(q.JOBS, entry["message_id"], entry["message_id"])
            in_hand.append(fields["job"])
        assert in_hand
        killed_at = sum(posted_scenes(server).values())
        third = await procs.start("worker-3", worker_code, dict(env, LOG_LEVEL="INFO"))

        async def third_live() -> bool:
            return any(w["pid"] == str(third.pid) for w in await q.live_workers(redis))

        await until(third_live, "the new worker's heartbeat", 180)
        await ask(SCENES // 2, SCENES)  # the rest, with the new worker taking part

        async def all_posted() -> bool:
            return (
                sum(posted_scenes(server).values()) >= SCENES
                and len(server.find("PATCH", "/messages/@original")) >= 2 * SCENES
            )  # the position, then the outcome

        try:
            await until(all_posted, "all 100 scenes posted", 240)
        except AssertionError as e:  # say how far it got, and what the gateways logged
            logs = "".join(procs.log(f"gateway-{n}")[-1500:] for n in (0, 1))
            raise AssertionError(f"{e}: {dict(posted_scenes(server))}\n{logs}") from None
        run_s = time.monotonic() - run_start
        await asyncio.sleep(2.0)  # anything posted twice would show now

        # -- every scene posted exactly once, stored once, in its own channel -----------------
        posted = posted_scenes(server)
        rows = await pg.fetch("SELECT id, channel_id, user_id, posted_at FROM scenes ORDER BY id")
        assert len(rows) == SCENES, f"{len(rows)} scenes stored"
        assert all(r["posted_at"] is not None for r in rows)
        assert sorted(posted) == [r["id"] for r in rows]
        twice = {scene: n for scene, n in posted.items() if n != 1}
        assert not twice, f"posted more than once: {twice}"
        outcome: dict[str, int] = {}
        for edit in server.find("PATCH", "/messages/@original"):
            match = READY.search(edit.json.get("content") or "")
            if match:
                outcome[edit.path.split("/")[3]] = int(match.group(1))
        assert sorted(outcome) == sorted(asked), "every /scene is told where its scene is"
        assert sorted(outcome.values()) == [r["id"] for r in rows]  # one scene each
        by_id = {r["id"]: r for r in rows}
        for token, scene_id in outcome.items():
            user, channel = asked[token]
            assert (by_id[scene_id]["user_id"], by_id[scene_id]["channel_id"]) == (
                str(user),
                str(channel),
            )
        messages = {
            int(HEADER.match(m["content"]).group(1)): m
            for m in server.created
            if HEADER.match(m["content"])
        }
        assert all(messages[s]["channel_id"] == by_id[s]["channel_id"] for s in by_id)

        jobs = [k async for k in redis.scan_iter(q.job_key("*")) if not k.endswith(":adopted")]
        attempts = [int(await redis.hget(k, "attempts") or 0) for k in jobs]
        redelivered = sum(a > 1 for a in attempts)
        assert len(jobs) == SCENES and min(attempts) >= 1
        for job in in_hand:  # the killed worker's jobs were taken over and finished (one
            # it had read but not yet started counts its first attempt on the new worker)
            assert await redis.hget(q.job_key(job), "result")
            assert int(await redis.hget(q.job_key(job), "attempts")) >= 1
        assert await redis.zcard(q.OPEN) == 0 and await redis.zcard(q.UNPOSTED) == 0

        # -- votes from several users, on both gateways, some delivered twice -----------------
        expected: set[tuple[str, str, int]] = set()  # (user, message id, slot)
        events = []
        guild_of = {str(c): g for g, cs in CHANNELS.items() for c in cs}
        chosen = [messages[s] for s in sorted(messages)[:: SCENES // 10]]  # 10 scenes
        for k, message in enumerate(chosen):
            guild = guild_of[message["channel_id"]]
            slots = [
                KEYCAPS.index(line.split(" ", 1)[0]) + 1
                for line in message["content"].splitlines()
                if line.split(" ", 1)[0] in KEYCAPS
            ]
            assert slots, message["content"]
            for v in range(3):
                user = USER_ID + (k + v) % USERS
                slot = slots[v % len(slots)]
                expected.add((str(user), message["id"], slot))
                events.append(reaction_payload(message, guild, slot, user))
        assert {shard_of(guild_of[m["channel_id"]]) for m in chosen} == {0, 1}
        events += events[::3]  # redelivered: the same vote again
        for event in events:
            await server.dispatch("MESSAGE_REACTION_ADD", event)

        async def counted() -> bool:
            return await pg.fetchval("SELECT count(*) FROM votes") >= len(expected)

        await until(counted, f"{len(expected)} votes", 60)
        await asyncio.sleep(2.0)  # the repeated deliveries are handled by now
        votes = await pg.fetch(
            "SELECT v.user_id, l.message_id, l.slot FROM votes v JOIN lines l ON l.id = v.line_id"
        )
        assert sorted((v["user_id"], v["message_id"], v["slot"]) for v in votes) == sorted(expected)

        # -- a clean stop, and no traceback anywhere ------------------------------------------
        name_of = {str(p.pid): name for name, p in procs.running.items()}
        done = {name_of[w["pid"]]: int(w["done"]) for w in await q.live_workers(redis)}
        done.pop("worker-1", None)  # its last heartbeat may not have expired yet
        assert sorted(done) == ["worker-2", "worker-3"] and done["worker-3"] >= 1, done
        for name in ("gateway-0", "gateway-1", "worker-2", "worker-3"):
            assert await procs.stop(name) == 0, procs.log(name)[-2000:]
        for name in procs.running:
            assert "Traceback" not in procs.log(name), f"{name}:\n{procs.log(name)[-3000:]}"
        took_over = sum(procs.log(n).count("took over") for n in ("worker-2", "worker-3"))
        print(
            f"\nscale e2e: {SCENES} scenes from {USERS} users on 2 gateways (shards 0, 1) and "
            f"2 workers (1 thread each); worker 1 killed holding {len(in_hand)} job(s) after "
            f"{killed_at} posts, worker 3 started; {redelivered} job(s) redelivered "
            f"({took_over} takeover(s)); scenes written by the live workers: {done}; 0 lost, "
            f"0 posted twice; {len(expected)} distinct votes of {len(events)} reaction events "
            f"counted once; processes ready in {ready_s:.0f} s, "
            f"100 scenes in {run_s:.0f} s, {time.monotonic() - started:.0f} s in all"
        )
    finally:
        await procs.kill_all()
        await pg.close()
        await redis.aclose()
        await server.close()
