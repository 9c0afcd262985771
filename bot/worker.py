"""`python -m bot worker`: take scene jobs from the Redis queue (bot.queue), write them with
today's SceneEngine (continuous batching: up to its max_batch scenes at once), store them in
the database and hand them back for a gateway to post. Any number of workers, on any
machine that reaches REDIS_URL and the database; `python -m bot worker --status` lists the
live ones.

A worker killed mid-scene loses nothing: its jobs stay in its pending list in Redis, and
after QUEUE_CLAIM_TIMEOUT_S without its heartbeat another worker claims them (XAUTOCLAIM)
and writes them again; a scene already stored by the dead worker is handed back as it is
(the job hash holds its id; killed before it wrote that, the database finds the scene by
its job id: scenes.job_id is unique), so it is stored and posted once. SIGTERM/SIGINT: no
new jobs, running scenes get SHUTDOWN_TIMEOUT_S (then are stored as they got), queued ones
go back to Redis.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
import uuid
from collections import deque

from redis.exceptions import RedisError

from sitcom.jobs import EngineError, GenerationTimeout

from . import queue as q
from .config import Config, ConfigError
from .core import HUMOUR_KEY, Core, wrote_lines
from .db import DatabaseError, Place

log = logging.getLogger(__name__)

CRASHED = (
    "Writing this scene stopped its writer {n} times; try again, perhaps with a different opening."
)


class Worker:
    """One worker process's loop over a started Core (its engine writes the scenes)."""

    def __init__(self, core: Core, client, config: Config, worker_id: str | None = None) -> None:
        self.core = core
        self.client = client
        self.config = config
        self.id = worker_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.slots = max(1, int(getattr(core.engine, "max_batch", 1)))
        self.claim_ms = int(config.claim_timeout_s * 1000)
        self.inflight: dict[str, asyncio.Task] = {}  # stream entry id -> its task
        self.done = 0
        self._recent: deque[tuple[float, int]] = deque(maxlen=20)  # (seconds, tokens)
        self.started = time.time()
        self.stopping = False

    @classmethod
    async def start(cls, config: Config, loader=None, worker_id: str | None = None) -> Worker:
        """Connect to Redis first (a bad REDIS_URL fails in a second, before any model
        loads), then start the Core with the active checkpoint from the database."""
        client = await q.connect(config.redis_url)
        try:
            await q.ensure_group(client)
            local = dataclasses.replace(
                config, redis_url=None, per_user_limit=100, max_queue=1000
            )  # the gateways enforce the real limits across every worker
            core = await Core.start(local, loader=loader)
        except BaseException:
            await client.aclose()
            raise
        return cls(core, client, config, worker_id)

    # -- the loop ----------------------------------------------------------------------

    async def run(self, stop: asyncio.Event) -> None:
        """Take jobs until `stop`, then finish the running ones and close."""
        background = [
            asyncio.create_task(self._heartbeat(), name="worker heartbeat"),
            asyncio.create_task(self._control(), name="worker control"),
        ]
        try:
            await self._beat()
            while not stop.is_set():
                free = self.slots - len(self.inflight)
                if free <= 0:
                    await asyncio.wait(
                        list(self.inflight.values()), timeout=1, return_when="FIRST_COMPLETED"
                    )
                    continue
                try:
                    entries = await self._take(free)
                except (RedisError, OSError) as e:
                    log.warning("taking jobs from Redis failed (%s); retrying", e)
                    await asyncio.sleep(1)
                    continue
                for entry_id, fields in entries:
                    if entry_id in self.inflight or not fields:
                        continue
                    task = asyncio.create_task(self._handle(entry_id, fields["job"]))
                    self.inflight[entry_id] = task
                    task.add_done_callback(lambda _, e=entry_id: self.inflight.pop(e, None))
        finally:
            self.stopping = True
            await self.core.close(posting=set(self.inflight.values()))
            # Both loops see `stopping` within a second (cancelling redis-py in the middle
            # of a pub/sub read can hang); cancelled only if they do not.
            await asyncio.wait(background, timeout=5)
            for task in background:
                task.cancel()
            with contextlib.suppress(RedisError, OSError):
                await self.client.delete(q.worker_key(self.id))
                await self.client.srem(q.WORKERS, self.id)
            await self.client.aclose()

    async def _take(self, count: int) -> list[tuple[str, dict]]:
        """Jobs of workers silent past the claim timeout first, then new ones."""
        _, claimed, _ = await self.client.xautoclaim(
            q.JOBS, q.GROUP, self.id, self.claim_ms, start_id="0-0", count=count
        )
        if claimed:
            log.info("took over %d job(s) from a silent worker", len(claimed))
            return claimed
        answer = await self.client.xreadgroup(
            q.GROUP, self.id, {q.JOBS: ">"}, count=count, block=1000
        )
        return [entry for _, entries in answer or () for entry in entries]

    async def _handle(self, entry_id: str, job_id: str) -> None:
        try:
            await self._job(entry_id, job_id)
        except asyncio.CancelledError:
            raise
        except (RedisError, OSError, DatabaseError) as e:  # left pending: redelivered
            log.warning("job %s: %s; it goes back to the queue", job_id, e)
        except Exception:
            log.exception("job %s failed; it goes back to the queue", job_id)

    async def _job(self, entry_id: str, job_id: str) -> None:
        key = q.job_key(job_id)
        data = await self.client.hgetall(key)
        if "payload" not in data or await self.client.zscore(q.OPEN, job_id) is None:
            await self._finish(entry_id, job_id, None)  # done by another worker already
            return
        attempts = await self.client.hincrby(key, "attempts", 1)
        if data.get("cancelled"):
            await self._finish(entry_id, job_id, q.Result(error="cancelled"))
            return
        if data.get("stored"):  # stored by a worker that died before handing it back
            await self._finish(entry_id, job_id, q.Result.loads(data["stored"]))
            return
        if attempts > q.MAX_ATTEMPTS:
            await self._finish(entry_id, job_id, q.Result(error=CRASHED.format(n=attempts - 1)))
            return
        result = await self._write(job_id, json.loads(data["payload"]))
        if result is not None:
            await self._finish(entry_id, job_id, result)

    async def _write(self, job_id: str, job: dict) -> q.Result | None:
        """Core.scene_command's writing half: the scene, once more when the model wrote
        nothing beyond the opening; stored (unclaimed: the gateway claims its posting).
        None when this worker is stopping before it could write it (it is redelivered)."""
        from sitcom.settings import SceneSettings

        settings = SceneSettings(**job["settings"])
        note = None
        for attempt in (1, 2):
            try:
                engine_job = await self.core.engine.submit(
                    job["prompt"], settings, user_id=job["user_key"]
                )
                scene = await engine_job.result()
            except GenerationTimeout as e:
                return q.Result(error=str(e))
            except EngineError as e:
                if self.stopping:
                    return None  # cancelled by the shutdown, not written: back to the queue
                return q.Result(error=str(e))
            if scene.partial:
                note = f"⏱️ {scene.note}"
            if wrote_lines(scene):
                break
            if attempt == 2 or scene.partial:
                return q.Result(
                    error="The model wrote nothing beyond your lines this time; "
                    "try again, perhaps with a different opening."
                )
        if await self.client.hget(q.job_key(job_id), "cancelled"):
            return q.Result(error="cancelled")
        other = await self._stored_elsewhere(job_id)
        if other is not None:
            return other
        stored = await self.core.record(
            scene,
            place=Place(*job["place"]),
            user_id=job["user_id"],
            prompt=engine_job.prompt,
            note=note,
            job_id=job_id,  # stored already (its worker died before the hset below): that one
        )
        result = q.Result(
            scene_id=stored.id,
            lines=tuple(line.text for line in stored.lines),
            seconds=scene.seconds,
            model=self.core.model_label(scene),
            new_tokens=scene.new_tokens,
        )
        # Stored: should this worker die now, the next one hands this back, not a copy.
        await self.client.hset(
            q.job_key(job_id), mapping={"scene": stored.id, "stored": result.dumps()}
        )
        self._recent.append((scene.seconds, scene.new_tokens))
        return result

    async def _stored_elsewhere(self, job_id: str) -> q.Result | None:
        """None when this worker is to store the job's scene (queue.STORE); else the result
        another worker stored for it, waited for while that worker is alive and storing."""
        key = q.job_key(job_id)
        while True:
            verdict = await self.client.eval(q.STORE, 1, key, self.id, q.worker_key(""))
            if isinstance(verdict, bytes):
                verdict = verdict.decode()
            if verdict == "mine":
                return None
            if verdict == "stored":
                return q.Result.loads(await self.client.hget(key, "stored"))
            await asyncio.sleep(0.2)  # "busy": its result is a moment away

    async def _finish(self, entry_id: str, job_id: str, result: q.Result | None) -> None:
        finished = await self.client.eval(
            q.FINISH,
            5,
            q.OPEN,
            q.job_key(job_id),
            q.RESULTS,
            q.UNPOSTED,
            q.JOBS,
            job_id,
            entry_id,
            (result or q.Result(error="The scene was lost; please ask again.")).dumps(),
            time.time(),
            q.GROUP,
            q.RESULTS_MAXLEN,
        )
        if finished and result is not None and result.error is None:
            self.done += 1
            with contextlib.suppress(RedisError, OSError):
                await self._beat()  # fresh speed for the next acknowledgement's estimate

    # -- heartbeat, claims, control ----------------------------------------------------

    async def _beat(self) -> None:
        seconds = sum(s for s, _ in self._recent)
        tokens = sum(t for _, t in self._recent)
        beat = {
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "model": self.core.checkpoint,
            "slots": self.slots,
            "in_flight": len(self.inflight),
            "done": self.done,
            "scene_s": f"{seconds / len(self._recent):.2f}" if self._recent else "0",
            "tokens_s": f"{tokens / seconds:.1f}" if seconds > 0 else "0",
            "started": f"{self.started:.0f}",
        }
        ttl = max(1, int(self.config.claim_timeout_s + 0.999))
        async with self.client.pipeline(transaction=True) as pipe:
            pipe.hset(q.worker_key(self.id), mapping=beat)
            pipe.expire(q.worker_key(self.id), ttl)
            pipe.sadd(q.WORKERS, self.id)
            await pipe.execute()

    async def _heartbeat(self) -> None:
        """Every third of the claim timeout: the heartbeat, the claims on this worker's
        running jobs renewed (so a long scene is not handed on), and the database's active
        checkpoint followed (a missed control message, or a switch while Redis was away)."""
        loop = asyncio.get_running_loop()
        while not self.stopping:
            next_beat = loop.time() + max(0.2, self.config.claim_timeout_s / 3)
            while not self.stopping and loop.time() < next_beat:
                await asyncio.sleep(min(0.2, next_beat - loop.time()))
            if self.stopping:
                return
            try:
                await self._beat()
                await self._renew()
                await self.follow()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, DatabaseError) as e:
                log.warning("worker heartbeat failed (%s); retrying", e)

    async def _renew(self) -> None:
        mine = await self.client.xpending_range(
            q.JOBS, q.GROUP, min="-", max="+", count=self.slots * 4, consumername=self.id
        )
        ids = [p["message_id"] for p in mine if p["message_id"] in self.inflight]
        if ids:
            await self.client.xclaim(q.JOBS, q.GROUP, self.id, 0, ids, justid=True)

    async def follow(self) -> None:
        """Switch to the checkpoint (and humour model) the database says is active."""
        await self.core._follow_checkpoint()
        humour = await self.core.db.get_state(HUMOUR_KEY)
        if humour and humour != self.core.humour:
            try:
                await self.core.use_humour(humour)
                log.info("ranking with humour model %s, chosen in a gateway", humour)
            except Exception as e:  # noqa: BLE001 - logged, and not retried every beat
                log.warning("cannot switch to humour model %s: %s", humour, e)
                self.core.humour = humour

    async def _control(self) -> None:
        while not self.stopping:
            try:
                async with self.client.pubsub() as pubsub:
                    await pubsub.subscribe(q.CONTROL)
                    while not self.stopping:
                        message = await pubsub.get_message(
                            ignore_subscribe_messages=True, timeout=1.0
                        )
                        if message is not None and not self.stopping:
                            await self.follow()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, DatabaseError) as e:
                log.warning("control channel: %s; resubscribing", e)
                await asyncio.sleep(1)


# -- the command -------------------------------------------------------------------------


async def status(config: Config, out=sys.stdout) -> int:
    """`worker --status`: the live workers and the queue."""
    client = await q.connect(config.redis_url)
    try:
        workers = await q.live_workers(client)
        waiting = await client.zcard(q.OPEN)
        unposted = await client.zcard(q.UNPOSTED)
    finally:
        await client.aclose()
    running = sum(int(w.get("in_flight") or 0) for w in workers)
    print(
        f"queue: {waiting} unfinished scene(s) ({running} being written), "
        f"{unposted} finished and not posted yet",
        file=out,
    )
    if not workers:
        print("no live workers (start one with `python -m bot worker`)", file=out)
        return 0
    header = ("WORKER", "HOST", "MODEL", "IN FLIGHT", "DONE", "S/SCENE", "TOK/S")
    rows = [
        (
            w["id"],
            w.get("host", "?"),
            w.get("model", "?"),
            f"{w.get('in_flight', '0')}/{w.get('slots', '?')}",
            w.get("done", "0"),
            w.get("scene_s", "0"),
            w.get("tokens_s", "0"),
        )
        for w in workers
    ]
    widths = [max(len(str(r[i])) for r in (header, *rows)) for i in range(len(header))]
    for row in (header, *rows):
        print(
            "  ".join(str(c).ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out
        )
    return 0


async def serve(config: Config, loader=None, stop: asyncio.Event | None = None) -> int:
    from sitcom.model.catalog import ModelLoadError

    try:
        worker = await Worker.start(config, loader=loader)
    except (ModelLoadError, DatabaseError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    log.info(
        "worker %s writing with %s (%d slots)", worker.id, worker.core.checkpoint, worker.slots
    )
    try:
        await worker.run(stop)
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
    return 0


def main(argv: list[str], loader=None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bot worker",
        description="Write the scenes the gateways queue in Redis (REDIS_URL).",
    )
    parser.add_argument(
        "--status", action="store_true", help="list the live workers and the queue, then exit"
    )
    args = parser.parse_args(argv)
    try:
        config = Config.from_env()
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    if not config.redis_url:
        print("error: REDIS_URL is not set; workers take their scenes from Redis", file=sys.stderr)
        return 2
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    try:
        if args.status:
            return asyncio.run(status(config))
        return asyncio.run(serve(config, loader=loader))
    except q.QueueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


__all__ = ["Worker", "main", "serve", "status"]
