"""REDIS_URL: gateways queue scenes in a real redis-server, `python -m bot worker` processes
write them with the real engine on the tiny test model, and each is posted exactly once."""

from __future__ import annotations

import asyncio
import inspect
import io
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import PROMPT, make_config, scripted_loader

from bot import queue as q
from bot.config import Config, ConfigError
from bot.console import LOCAL, Console, ConsoleSurface
from bot.core import Core
from bot.worker import Worker
from sitcom.jobs import TooManyPending

pytest_plugins = ["redis_server"]  # its redis_server and redis_url fixtures

ROOT = Path(__file__).resolve().parent.parent
CLAIM_S = 2.0  # QUEUE_CLAIM_TIMEOUT_S in these tests

# A worker subprocess whose model takes `delay` seconds per token: killed mid-scene.
SLOW_WORKER = """
import sys, time
sys.path.insert(0, {tests!r})
import sitcom.model.serving
from helpers import SCRIPT, teleprompter_model
from sitcom.model.catalog import load_model

def load(name):
    _, tokenizer = load_model(name)
    model = teleprompter_model(tokenizer, SCRIPT)
    model.register_forward_hook(lambda *a: time.sleep({delay}))
    return model, tokenizer

sitcom.model.serving.load_hf_model = load
from bot.worker import main
sys.exit(main(sys.argv[1:]))
"""


def config_for(tmp_path: Path, model: Path, url: str, **extra) -> Config:
    extra.setdefault("humour_model", "off")
    return make_config(tmp_path, model, redis_url=url, claim_timeout_s=CLAIM_S, **extra)


class Chat:
    """One /scene's acknowledgement and updates, and what went out on the console surface."""

    def __init__(self) -> None:
        self.said: list[str] = []
        self.acks: list[str] = []
        self.updates: list[str] = []
        self.surface = ConsoleSurface(self.said.append)

    async def ack(self, text: str) -> None:
        self.acks.append(text)

    async def update(self, text: str) -> None:
        self.updates.append(text)

    def headers(self) -> list[str]:
        return [s.splitlines()[0] for s in self.said]


async def scene(core: Core, chat: Chat, user: str = "1", prompt: str = PROMPT) -> None:
    await core.scene_command(
        place=LOCAL,
        user_id=user,
        prompt=prompt,
        surface=chat.surface,
        acknowledge=chat.ack,
        update=chat.update,
    )


async def start_worker(config: Config, loader=None, slots: int | None = None):
    worker = await Worker.start(config, loader=loader or scripted_loader())
    if slots is not None:
        worker.slots = slots
    stop = asyncio.Event()
    task = asyncio.create_task(worker.run(stop))
    return worker, stop, task


async def stop_worker(stop: asyncio.Event, task: asyncio.Task) -> None:
    stop.set()
    await asyncio.wait_for(task, 60)


async def until(check, timeout: float = 60.0, step: float = 0.1):
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while True:
        value = check()
        if inspect.isawaitable(value):
            value = await value
        if value:
            return value
        if loop.time() > end:
            raise AssertionError("timed out waiting")
        await asyncio.sleep(step)


async def scene_rows(core: Core) -> list[tuple]:
    return await core.db._fetch("SELECT id, posted_at FROM scenes ORDER BY id")


@pytest.mark.asyncio
async def test_a_queued_scene_is_written_by_a_worker_and_posted_once(
    tmp_path, tiny_model_dir, redis_url
):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    gateway = await Core.start(config)
    assert gateway.queue is not None and gateway.engine is gateway.queue  # no model here
    worker, stop, task = await start_worker(config)
    try:
        chat = Chat()
        await asyncio.wait_for(scene(gateway, chat), 120)
        assert chat.acks == ["🎬 Writing your scene — #1 in the queue…"]
        assert len(chat.updates) == 1 and chat.updates[0].startswith("🎬 Scene 1 is ready")
        assert chat.headers() == ["Scene 1 — vote with /vote 1 LINE_NO"]  # posted once
        rows = await scene_rows(gateway)
        assert len(rows) == 1 and rows[0][1] is not None  # stored by the worker, posted
        stored = await gateway.db.get_scene(1)
        assert stored.lines[0].text == PROMPT and len(stored.lines) > 1
        assert worker.done == 1
        assert await gateway.queue.client.zcard(q.UNPOSTED) == 0
        assert await gateway.queue.client.zcard(q.OPEN) == 0
    finally:
        await stop_worker(stop, task)
        await gateway.close()


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_a_worker_killed_mid_scene_loses_nothing_and_it_is_posted_once(
    tmp_path, tiny_model_dir, redis_url
):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    gateway = await Core.start(config)
    client = gateway.queue.client
    env = {
        **os.environ,
        "PYTHONPATH": str(ROOT),
        "REDIS_URL": redis_url,
        "BOT_DB": str(config.db_path),
        "CHECKPOINTS_DIR": str(config.checkpoints_dir),
        "DEFAULT_CHECKPOINT": str(tiny_model_dir),
        "HUMOUR_MODEL": "off",
        "QUEUE_CLAIM_TIMEOUT_S": str(CLAIM_S),
        "LOG_LEVEL": "INFO",
    }
    script = SLOW_WORKER.format(tests=str(ROOT / "tests"), delay=0.2)
    slow = subprocess.Popen(
        [
            sys.executable,
            "-c",
            script,
        ],
        env=env,
        cwd=tmp_path,
        stderr=subprocess.PIPE,
    )
    chat = Chat()
    asking = asyncio.create_task(scene(gateway, chat))
    try:

        async def taken() -> bool:
            return (await client.hget(q.job_key(await only_job(client)), "attempts")) == "1"

        await until(taken, timeout=180)
        await asyncio.sleep(1.0)  # writing: each token takes 0.2 s
        assert not asking.done() and slow.poll() is None
        slow.send_signal(signal.SIGKILL)
        slow.wait(10)
        assert await scene_rows(gateway) == []  # it stored nothing
        worker, stop, task = await start_worker(config)  # takes it over after CLAIM_S
        try:
            await asyncio.wait_for(asking, 120)
        finally:
            await stop_worker(stop, task)
        assert chat.headers() == ["Scene 1 — vote with /vote 1 LINE_NO"]  # exactly once
        assert chat.updates[0].startswith("🎬 Scene 1 is ready")
        rows = await scene_rows(gateway)
        assert len(rows) == 1 and rows[0][1] is not None
        job = await client.hgetall(q.job_key(await only_job(client)))
        assert job["attempts"] == "2" and job["scene"] == "1"
        assert await client.xpending(q.JOBS, q.GROUP) == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
    finally:
        if slow.poll() is None:
            slow.kill()
            slow.wait()
        asking.cancel()
        await gateway.close()


@pytest.mark.asyncio
async def test_a_worker_killed_right_after_storing_is_not_stored_twice(
    tmp_path, tiny_model_dir, redis_url
):
    """The crash window STORE leaves: a worker stored the job's scene (the database
    committed) and died before it marked the job stored in Redis. The worker taking the job
    over wins STORE (no live owner), writes the scene again and hands back the one already
    stored under the job id: it is posted once and the database holds one row."""
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    gateway = await Core.start(config)
    client = gateway.queue.client
    chat = Chat()
    asking = asyncio.create_task(scene(gateway, chat))
    try:
        await until(lambda: chat.acks)
        job_id = await only_job(client)
        # The dead worker: took the job, won STORE, stored the scene, then was killed.
        assert await client.xreadgroup(q.GROUP, "dead:1:x", {q.JOBS: ">"}, count=1)
        await client.hincrby(q.job_key(job_id), "attempts", 1)
        assert await client.eval(q.STORE, 1, q.job_key(job_id), "dead:1:x", q.worker_key(""))
        stored = await gateway.db.add_scene(
            place=LOCAL,
            user_id="1",
            prompt=PROMPT,
            model_name="tiny",
            lines=[PROMPT, "NEWMAN: Hello, Jerry."],
            prompt_lines=1,
            new_tokens=5,
            seconds=0.5,
            job_id=job_id,
        )
        worker, stop, task = await start_worker(config)  # takes it over after CLAIM_S
        try:
            await asyncio.wait_for(asking, 120)
        finally:
            await stop_worker(stop, task)
        assert chat.headers() == [f"Scene {stored.id} — vote with /vote {stored.id} LINE_NO"]
        assert "NEWMAN: Hello, Jerry." in chat.said[0]  # the stored scene, not a rewrite
        assert chat.updates[0].startswith(f"🎬 Scene {stored.id} is ready")
        assert "(2 lines," in chat.updates[0]
        rows = await scene_rows(gateway)
        assert len(rows) == 1 and rows[0][1] is not None  # one row, posted
        assert (await gateway.db._fetch("SELECT COUNT(*) FROM lines"))[0][0] == 2
        job = await client.hgetall(q.job_key(job_id))
        assert job["attempts"] == "2" and job["scene"] == str(stored.id)
        assert worker.done == 1
    finally:
        asking.cancel()
        await gateway.close()


async def only_job(client) -> str:
    keys = [k async for k in client.scan_iter(q.job_key("*"))]
    keys = [k for k in keys if not k.endswith(":adopted")]
    return keys[0].rsplit(":", 1)[1] if len(keys) == 1 else ""


@pytest.mark.asyncio
async def test_a_gateway_restart_loses_no_queued_scene(tmp_path, tiny_model_dir, redis_url):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    first = await Core.start(config)
    chat = Chat()
    asking = asyncio.create_task(scene(first, chat))
    await until(lambda: chat.acks)  # queued; no worker yet
    await first.close()  # the gateway goes away with the scene still queued
    await asyncio.wait_for(asking, 10)
    assert chat.updates == [q.HANDED_OVER]

    second = await Core.start(config)  # the restarted gateway
    out = io.StringIO()
    Console(second, out=out)  # registers its surface: it shows adopted scenes
    worker, stop, task = await start_worker(config)
    try:
        await until(lambda: out.getvalue(), timeout=120)
        await asyncio.sleep(CLAIM_S)  # more sweeps: nothing posted twice
        assert out.getvalue().count("Scene 1 — vote with /vote 1 LINE_NO") == 1
        assert "Scene 2" not in out.getvalue()
        rows = await scene_rows(second)
        assert len(rows) == 1 and rows[0][1] is not None
        assert await second.queue.client.zcard(q.UNPOSTED) == 0
    finally:
        await stop_worker(stop, task)
        await second.close()
    assert chat.said == []  # the first gateway posted nothing


@pytest.mark.asyncio
async def test_a_scene_whose_gateway_died_is_posted_once_by_another(
    tmp_path, tiny_model_dir, redis_url
):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    dying, other = await Core.start(config), await Core.start(config)
    out = io.StringIO()
    Console(other, out=out)
    chat = Chat()
    asking = asyncio.create_task(scene(dying, chat))
    await until(lambda: chat.acks)
    # The asking gateway hangs: it reads no results any more, but its heartbeat goes on.
    asking.cancel()
    for task in dying.queue._tasks:
        task.cancel()

    async def beating() -> None:
        while True:
            await dying.queue._beat()
            await asyncio.sleep(0.2)

    beat = asyncio.create_task(beating())
    worker, stop, task = await start_worker(config)
    try:
        client = other.queue.client
        await until(lambda: client.zcard(q.UNPOSTED), timeout=120)  # written, not posted
        assert await other.queue.sweep_once() == 0  # its gateway counts as alive
        assert out.getvalue() == ""
        beat.cancel()  # now it is dead (kill -9): its heartbeat expires
        await until(lambda: out.getvalue(), timeout=5 * CLAIM_S)
        await asyncio.sleep(CLAIM_S)
        assert out.getvalue().count("Scene 1 — vote with /vote 1 LINE_NO") == 1
        assert chat.said == [] and chat.updates == []
        rows = await scene_rows(other)
        assert len(rows) == 1 and rows[0][1] is not None
    finally:
        beat.cancel()
        await stop_worker(stop, task)
        await other.close()
        await dying.close()


@pytest.mark.asyncio
async def test_checkpoint_use_reaches_every_worker_and_later_ones(
    tmp_path, tiny_model_dir, redis_url
):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    shutil.copytree(tiny_model_dir, config.checkpoints_dir / "alt")
    gateway = await Core.start(config)
    one, stop1, task1 = await start_worker(config)
    two, stop2, task2 = await start_worker(config)
    try:
        assert one.core.checkpoint == two.core.checkpoint == tiny_model_dir.name
        assert await gateway.use_checkpoint("alt") == "alt"
        await until(lambda: one.core.checkpoint == two.core.checkpoint == "alt", timeout=30)
        assert one.core.engine.model_name == str(config.checkpoints_dir / "alt")
        three, stop3, task3 = await start_worker(config)  # started after the switch
        assert three.core.checkpoint == "alt"
        await stop_worker(stop3, task3)
    finally:
        await stop_worker(stop1, task1)
        await stop_worker(stop2, task2)
        await gateway.close()


def slow_loader(delay: float):
    import time

    from helpers import SCRIPT, teleprompter_model

    from sitcom.model.catalog import load_model

    def load(name: str):
        _, tokenizer = load_model(name)
        model = teleprompter_model(tokenizer, SCRIPT)
        model.register_forward_hook(lambda *a: time.sleep(delay))
        return model, tokenizer

    return load


@pytest.mark.asyncio
async def test_queue_position_counts_every_workers_scenes(tmp_path, tiny_model_dir, redis_url):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    gateway = await Core.start(config)
    client = gateway.queue.client
    one, stop1, task1 = await start_worker(config, slow_loader(0.02), slots=1)
    two, stop2, task2 = await start_worker(config, slow_loader(0.02), slots=1)
    chats = [Chat() for _ in range(3)]
    asking = [asyncio.create_task(scene(gateway, chats[0], user="1"))]
    try:
        asking.append(asyncio.create_task(scene(gateway, chats[1], user="2")))
        await until(lambda: len(one.inflight) == len(two.inflight) == 1, timeout=60)
        asking.append(asyncio.create_task(scene(gateway, chats[2], user="3")))
        await until(lambda: chats[2].acks)
        # Two scenes being written (one on each worker) are ahead of it.
        assert chats[2].acks == ["🎬 Writing your scene — #3 in the queue…"]
        assert (await client.xpending(q.JOBS, q.GROUP))["pending"] == 2
        await asyncio.wait_for(asyncio.gather(*asking), 180)
        assert sorted(c.headers()[0] for c in chats) == [
            f"Scene {n} — vote with /vote {n} LINE_NO" for n in (1, 2, 3)
        ]
        assert one.done >= 1 and two.done >= 1 and one.done + two.done == 3
        # Now measured (each finished scene renews the heartbeat): the next
        # acknowledgement carries a wait estimate.
        ticket = await gateway.queue.submit(LOCAL, "4", PROMPT, gateway_settings())
        assert ticket.position == 1 and ticket.eta_s is not None and ticket.eta_s > 0
    finally:
        await stop_worker(stop1, task1)
        await stop_worker(stop2, task2)
        await gateway.close()


def gateway_settings():
    from sitcom.settings import SceneSettings

    return SceneSettings()


def test_wait_estimate_spreads_the_queue_over_every_workers_slots():
    workers = [{"scene_s": "10", "slots": "2"}, {"scene_s": "20", "slots": "2"}]
    assert q.estimate_wait(1, workers) == 15.0
    assert q.estimate_wait(4, workers) == 15.0
    assert q.estimate_wait(5, workers) == 30.0
    assert q.estimate_wait(3, [{"scene_s": "0", "slots": "8"}]) is None


@pytest.mark.asyncio
async def test_per_user_limit_holds_across_gateways(tmp_path, tiny_model_dir, redis_url):
    config = config_for(tmp_path, tiny_model_dir, redis_url, per_user_limit=1)
    first, second = await Core.start(config), await Core.start(config)
    try:
        chat = Chat()
        asking = asyncio.create_task(scene(first, chat, user="7"))
        await until(lambda: chat.acks)
        with pytest.raises(TooManyPending):
            await scene(second, Chat(), user="7")
        other = Chat()  # another user is welcome on either gateway
        task = asyncio.create_task(scene(second, other, user="8"))
        await until(lambda: other.acks)
        assert other.acks == ["🎬 Writing your scene — #2 in the queue…"]
        asking.cancel()
        task.cancel()
    finally:
        await first.close()
        await second.close()


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_worker_status_lists_live_workers(tmp_path, tiny_model_dir, redis_url):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    worker, stop, task = await start_worker(config)
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            "worker",
            "--status",
            env={**os.environ, "PYTHONPATH": str(ROOT), "REDIS_URL": redis_url},
            cwd=tmp_path,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(), 120)
    finally:
        await stop_worker(stop, task)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert text.splitlines()[0].startswith("queue: 0 unfinished scene(s)")
    assert "WORKER" in text and "MODEL" in text and "TOK/S" in text
    row = next(line for line in text.splitlines() if line.startswith(worker.id))
    assert tiny_model_dir.name in row and "0/8" in row


def run_module(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess:
    full = {
        k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN" and not k.startswith("SLACK_")
    }
    full.update(PYTHONPATH=str(ROOT), **env)
    return subprocess.run(
        [sys.executable, "-m", "bot", *args],
        input="",
        capture_output=True,
        text=True,
        cwd=cwd,
        env=full,
        timeout=120,
    )


@pytest.mark.e2e
def test_unreachable_redis_is_one_line_and_status_1(tmp_path, tiny_model_dir):
    from redis_server import free_port

    url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    for args in (("worker",), ("worker", "--status"), ()):
        done = run_module(
            *args, cwd=tmp_path, REDIS_URL=url, DEFAULT_CHECKPOINT=str(tiny_model_dir)
        )
        assert done.returncode == 1, (args, done.stderr)
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith(f"error: cannot reach Redis at {url[8:-2]} ("), args
        assert "Traceback" not in done.stderr


@pytest.mark.parametrize(
    "url, says",
    [
        ("http://localhost:6379", "scheme 'http'"),
        ("redis://:secret@localhost:99999/0", "port"),
        ("redis://localhost:6379/zero", "database"),
        ("redis://", "host is missing"),
        ("unix://", "socket path"),
    ],
)
def test_a_bad_redis_url_is_one_line_that_never_shows_the_password(url, says):
    with pytest.raises(ConfigError) as e:
        Config.from_env({"REDIS_URL": url}, dotenv=False)
    assert says in str(e.value) and "secret" not in str(e.value)


@pytest.mark.e2e
def test_a_bad_redis_url_stops_the_worker_with_one_line(tmp_path):
    done = run_module("worker", cwd=tmp_path, REDIS_URL="http://x")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip().splitlines() == [
        "error: REDIS_URL must look like redis://HOST:6379/0, rediss://… or "
        "unix:///path/redis.sock (got scheme 'http')"
    ]


def test_redis_settings_read_from_the_environment():
    config = Config.from_env(
        {"REDIS_URL": "redis://:pw@cache:6380/2", "QUEUE_CLAIM_TIMEOUT_S": "5"}, dotenv=False
    )
    assert config.redis_url == "redis://:pw@cache:6380/2" and config.claim_timeout_s == 5.0
    assert "pw" not in repr(config)
    assert Config.from_env({}, dotenv=False).redis_url is None
    with pytest.raises(ConfigError, match="QUEUE_CLAIM_TIMEOUT_S"):
        Config.from_env({"QUEUE_CLAIM_TIMEOUT_S": "0"}, dotenv=False)


@pytest.mark.e2e
@pytest.mark.asyncio
async def test_the_console_as_a_gateway_process_gets_its_scene_from_a_worker(
    tmp_path, tiny_model_dir, redis_url
):
    config = config_for(tmp_path, tiny_model_dir, redis_url)
    worker, stop, task = await start_worker(config)
    env = {
        k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN" and not k.startswith("SLACK_")
    }
    env.update(
        PYTHONPATH=str(ROOT),
        REDIS_URL=redis_url,
        BOT_DB=str(config.db_path),
        CHECKPOINTS_DIR=str(config.checkpoints_dir),
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        LOG_LEVEL="WARNING",
    )
    try:  # the real `python -m bot`: no model loaded (the scripted loader is not there)
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "bot",
            env=env,
            cwd=tmp_path,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        out, err = await asyncio.wait_for(proc.communicate(f"/scene {PROMPT}\n".encode()), 180)
    finally:
        await stop_worker(stop, task)
    assert proc.returncode == 0, err.decode()
    text = out.decode()
    assert "Writing your scene — #1 in the queue" in text
    assert text.count("Scene 1 — vote with /vote 1 LINE_NO") == 1
    assert "Scene 1 is ready" in text and worker.done == 1
