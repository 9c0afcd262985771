"""The scene queue between chat gateways and `python -m bot worker` processes (REDIS_URL).

With REDIS_URL set, a chat process (Discord, Slack, console) is a *gateway*: it loads no
model; `/scene` becomes a job in Redis; worker processes (bot.worker, any number, any
machine) write it with today's SceneEngine, store it in the database, and hand the result
back; a gateway posts it (the database's claim_posting / mark_posted make that once).

Why Redis Streams consumer groups directly (redis-py's asyncio client), not arq or saq:
a scene may run for minutes on a busy CPU, and a worker killed with `kill -9` must lose
nothing. With XREADGROUP + XACK every job sits in its worker's pending list until it is
finished; XAUTOCLAIM gives a job whose worker has been *silent* for QUEUE_CLAIM_TIMEOUT_S
to another worker, and a live worker keeps its long scenes by re-claiming them (XCLAIM
JUSTID resets their idle time) every third of that timeout. arq and saq time a job from
its start (a slow scene would be run twice, or a dead worker's job waits out a long
timeout), bring their own worker loop and serialisation around ours, and have no place
for the other half we need on the same connection: results that a *different* gateway
can post when the asking one died, a live queue position across workers, per-user limits
across gateways and a control channel. Those are a few keys and two Lua scripts here.

Keys (all under the {sitcom} hash tag, so a Redis Cluster keeps them in one slot):

    jobs          stream, consumer group "workers": one entry per scene job
    open          zset job id -> sequence: every unfinished job (waiting or being written);
                  the queue position is its size when a job joins
    seq           counter behind `open`'s order
    user:KEY      set of a user's unfinished job ids (PER_USER_LIMIT across gateways)
    job:ID        hash: payload (JSON), attempts, scene + stored (its id and result once
                  it is in the database), result (JSON, once finished), cancelled;
                  expires a day after it is posted
    results       stream (capped): one entry per finished job; every gateway reads it
    unposted      zset job id -> finish time: finished jobs no gateway has posted yet; a
                  gateway whose asking gateway is gone (no heartbeat) adopts them
    gateway:ID    a live gateway's heartbeat (expires after QUEUE_CLAIM_TIMEOUT_S)
    worker:ID     hash, a live worker's heartbeat: host, pid, model, in flight, done, speed
    workers       set of worker ids (`worker --status` drops the expired ones)
    control       pub/sub channel: "checkpoint" after /checkpoint use (workers also
                  re-read the database's active checkpoint at every heartbeat)
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import os
import socket
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import redis.asyncio as aioredis
from redis.exceptions import RedisError, ResponseError

from sitcom.jobs import EngineError, QueueFull, Scene, TooManyPending, clean_prompt
from sitcom.settings import SceneSettings

from .commands import MAX_PROMPT_CHARS
from .db import DatabaseError, Place, StoredScene
from .posting import Surface
from .texts import FAILED, queue_text

Core = Any  # bot.core.Core (which imports this module): its db, surfaces and posting steps

log = logging.getLogger(__name__)

PREFIX = "{sitcom}:"
JOBS, RESULTS, OPEN, SEQ, UNPOSTED = (
    PREFIX + name for name in ("jobs", "results", "open", "seq", "unposted")
)
WORKERS, CONTROL = PREFIX + "workers", PREFIX + "control"
GROUP = "workers"
RESULTS_MAXLEN = 10_000
MAX_ATTEMPTS = 3  # a job whose worker died this many times is failed, not retried forever
POSTED_TTL_S = 86_400  # a posted job's hash is kept a day (for `/scene #ID` and debugging)
HANDED_OVER = (
    "I'm restarting; your scene stays in the queue and will be posted in this channel "
    "when it is written."
)


def job_key(job_id: str) -> str:
    return f"{PREFIX}job:{job_id}"


def user_key(key: str) -> str:
    return f"{PREFIX}user:{key}"


def gateway_key(gateway_id: str) -> str:
    return f"{PREFIX}gateway:{gateway_id}"


def worker_key(worker_id: str) -> str:
    return f"{PREFIX}worker:{worker_id}"


class QueueError(EngineError):
    """Redis cannot be used; str(e) is a one-liner fit for a user or a terminal."""


# KEYS: open, user set, jobs stream, job hash, seq. ARGV: job id, max queue, per-user
# limit, payload. Returns the queue position, -1 (queue full) or -2 (user's limit).
SUBMIT = """
if redis.call('SCARD', KEYS[2]) >= tonumber(ARGV[3]) then return -2 end
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[2]) then return -1 end
redis.call('ZADD', KEYS[1], redis.call('INCR', KEYS[5]), ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('HSET', KEYS[4], 'payload', ARGV[4], 'user', KEYS[2])
redis.call('XADD', KEYS[3], '*', 'job', ARGV[1])
return redis.call('ZCARD', KEYS[1])
"""

# KEYS: job hash. ARGV: this worker's id, the worker heartbeat key prefix. Who may store a
# written job's scene: "stored" (another worker already did: use its result), "busy" (a live
# worker is storing it now: wait for its result) or "mine" (store it: no live owner).
# A slow worker whose job was handed on, and the worker that took it over, can both finish
# writing; only one of them stores, so the database never holds the scene twice.
STORE = """
if redis.call('HEXISTS', KEYS[1], 'stored') == 1 then return 'stored' end
local owner = redis.call('HGET', KEYS[1], 'storing')
if owner and owner ~= ARGV[1] and redis.call('EXISTS', ARGV[2] .. owner) == 1 then
  return 'busy'
end
redis.call('HSET', KEYS[1], 'storing', ARGV[1])
return 'mine'
"""

# KEYS: open, job hash, results, unposted, jobs. ARGV: job id, entry id, result JSON,
# now, group. The first finisher wins (a slow worker whose job was handed on finds it
# gone and only acknowledges its copy). Returns 1 when this call finished it.
FINISH = """
local function ack()
  redis.call('XACK', KEYS[5], ARGV[5], ARGV[2])
  redis.call('XDEL', KEYS[5], ARGV[2])
end
if not redis.call('ZSCORE', KEYS[1], ARGV[1]) then ack() return 0 end
local user = redis.call('HGET', KEYS[2], 'user')
redis.call('ZREM', KEYS[1], ARGV[1])
if user then redis.call('SREM', user, ARGV[1]) end
redis.call('HSET', KEYS[2], 'result', ARGV[3])
redis.call('ZADD', KEYS[4], ARGV[4], ARGV[1])
redis.call('XADD', KEYS[3], 'MAXLEN', '~', ARGV[6], '*', 'job', ARGV[1])
ack()
return 1
"""


def describe_url(url: str) -> str:
    """Where REDIS_URL points, without its password."""
    parts = urlsplit(url)
    if parts.scheme == "unix":
        return parts.path
    return f"{parts.hostname}:{parts.port or 6379}"


async def connect(url: str) -> aioredis.Redis:
    """A client on REDIS_URL that answered PING; QueueError (one line) when it cannot."""
    try:
        client = aioredis.from_url(url, decode_responses=True, socket_connect_timeout=5)
    except ValueError as e:
        raise QueueError(f"REDIS_URL cannot be used: {e}") from None
    try:
        await client.ping()
    except RedisError as e:
        await client.aclose()
        reason = " ".join(str(e).split())[:200] or type(e).__name__
        raise QueueError(f"cannot reach Redis at {describe_url(url)} ({reason})") from None
    return client


async def ensure_group(client: aioredis.Redis) -> None:
    try:
        await client.xgroup_create(JOBS, GROUP, id="0", mkstream=True)
    except ResponseError as e:
        if "BUSYGROUP" not in str(e):
            raise


@dataclass(frozen=True)
class Result:
    """What a worker hands back: the stored scene's id, or a user-facing error."""

    scene_id: int | None = None
    error: str | None = None
    lines: tuple[str, ...] = ()
    seconds: float = 0.0
    model: str = ""
    new_tokens: int = 0

    def dumps(self) -> str:
        return json.dumps(
            {
                "scene_id": self.scene_id,
                "error": self.error,
                "lines": list(self.lines),
                "seconds": self.seconds,
                "model": self.model,
                "new_tokens": self.new_tokens,
            }
        )

    @classmethod
    def loads(cls, text: str) -> Result:
        data = json.loads(text)
        return cls(
            scene_id=data.get("scene_id"),
            error=data.get("error"),
            lines=tuple(data.get("lines") or ()),
            seconds=float(data.get("seconds") or 0.0),
            model=str(data.get("model") or ""),
            new_tokens=int(data.get("new_tokens") or 0),
        )

    def scene(self) -> Scene:
        """The scene as the acknowledgement's outcome text describes it."""
        return Scene(list(self.lines), "", self.new_tokens, self.seconds, self.model)


class Ticket:
    """A queued job as the asking gateway sees it (the engine Job's position and eta_s)."""

    def __init__(self, job_id: str, position: int, eta_s: float | None) -> None:
        self.id = job_id
        self.position = position
        self.eta_s = eta_s
        self.future: asyncio.Future[Result] = asyncio.get_running_loop().create_future()


class HandedOver(Exception):
    """This gateway is shutting down before the job finished; another one will post it."""


async def live_workers(client: aioredis.Redis) -> list[dict[str, str]]:
    """Every worker whose heartbeat has not expired (expired ones are dropped from the set)."""
    found = []
    for worker_id in sorted(await client.smembers(WORKERS)):
        beat = await client.hgetall(worker_key(worker_id))
        if beat:
            found.append({"id": worker_id, **beat})
        else:
            await client.srem(WORKERS, worker_id)
    return found


def estimate_wait(position: int, workers: list[dict[str, str]]) -> float | None:
    """Seconds until a job at `position` is done: the workers' recent seconds per scene,
    times the rounds of their combined slots the jobs ahead (and this one) need. None
    until some worker has measured a scene."""
    measured = [float(w["scene_s"]) for w in workers if float(w.get("scene_s") or 0) > 0]
    if not measured:
        return None
    slots = sum(max(1, int(w.get("slots") or 1)) for w in workers)
    return sum(measured) / len(measured) * math.ceil(position / slots)


class Gateway:
    """The queue as a gateway's Core uses it. It also stands in for Core.engine (no model
    here): the engine attributes Core reads or sets (model_name, served, scorer, swap,
    close) are kept, and /checkpoint's choice reaches the workers through the database and
    the control channel."""

    served = None  # what the workers serve is theirs to say (worker --status)

    def __init__(self, client: aioredis.Redis, config, model_name: str) -> None:
        self.client = client
        self.config = config
        self.model_name = model_name
        self.scorer = None
        self.id = f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.ttl_s = float(config.claim_timeout_s)
        self._waiting: dict[str, Ticket] = {}
        self._tasks: list[asyncio.Task] = []
        self._core: Core | None = None
        self._closed = False

    @classmethod
    async def connect(cls, config, model_name: str) -> Gateway:
        client = await connect(config.redis_url)
        try:
            await ensure_group(client)
            gateway = cls(client, config, model_name)
            await gateway._beat()
            last = await client.xrevrange(RESULTS, count=1)
        except RedisError as e:
            await client.aclose()
            raise QueueError(f"cannot use Redis at {describe_url(config.redis_url)}: {e}") from None
        gateway._last = last[0][0] if last else "0-0"
        return gateway

    def start(self, core: Core) -> None:
        """Read results and adopt orphans in the background, for `core`."""
        self._core = core
        self._tasks = [
            asyncio.create_task(self._read_results(), name="queue results"),
            asyncio.create_task(self._sweep(), name="queue sweeper"),
        ]

    # -- the engine's part, as Core uses it -------------------------------------------

    async def swap(self, model: str) -> None:
        self.model_name = str(model)  # workers load it; they follow the database's choice

    async def announce(self) -> None:
        """Tell the workers the active checkpoint changed (they re-read the database)."""
        try:
            await self.client.publish(CONTROL, "checkpoint")
        except RedisError as e:  # they re-read it at their next heartbeat anyway
            log.warning("could not announce the checkpoint switch: %s", e)

    async def close(self, deadline_s: float | None = None) -> None:
        """Stop reading results; scenes still being written are handed over (their
        gateway's heartbeat goes, so another gateway, or this one restarted, posts them)."""
        if self._closed:
            return
        self._closed = True
        if self._tasks:  # they stop within a second (a redis-py read is not cancelled
            await asyncio.wait(self._tasks, timeout=5)  # mid-way unless they hang)
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for ticket in self._waiting.values():
            if not ticket.future.done():
                ticket.future.set_exception(HandedOver())
        try:
            await self.client.delete(gateway_key(self.id))
        except RedisError as e:
            log.warning("could not remove this gateway's heartbeat: %s", e)

    async def aclose(self) -> None:
        await self.close()
        await self.client.aclose()

    # -- /scene --------------------------------------------------------------------------

    async def submit(
        self, place: Place, user_id: str, prompt: str, settings: SceneSettings
    ) -> Ticket:
        """Queue a scene; QueueFull / TooManyPending like the engine, QueueError when
        Redis is unreachable."""
        job_id = uuid.uuid4().hex
        key = f"{place.platform}:{user_id}"
        payload = json.dumps(
            {
                "place": [place.platform, place.guild_id, place.channel_id],
                "user_id": str(user_id),
                "user_key": key,
                "prompt": prompt,
                "settings": settings.as_dict(),
                "gateway": self.id,
                "queued_at": time.time(),
            }
        )
        ticket = Ticket(job_id, 0, None)
        self._waiting[job_id] = ticket  # before it can finish
        try:
            position = await self.client.eval(
                SUBMIT,
                5,
                OPEN,
                user_key(key),
                JOBS,
                job_key(job_id),
                SEQ,
                job_id,
                self.config.max_queue,
                self.config.per_user_limit,
                payload,
            )
            workers = await live_workers(self.client) if position > 0 else []
        except RedisError as e:
            self._waiting.pop(job_id, None)
            log.warning("could not queue a scene: %s", e)
            raise QueueError(
                "The scene queue is unavailable right now; please try again in a moment."
            ) from None
        if position < 0:
            self._waiting.pop(job_id, None)
            if position == -2:
                raise TooManyPending(
                    f"You already have {self.config.per_user_limit} scene(s) in the queue; "
                    "wait for one to finish."
                )
            raise QueueFull("The writers' room is full right now; try again in a minute.")
        ticket.position = int(position)
        ticket.eta_s = estimate_wait(ticket.position, workers)
        return ticket

    async def cancel(self, job_id: str) -> None:
        """Nobody will see this scene (its acknowledgement failed): a worker that takes
        it, or finishes it, drops it."""
        self._waiting.pop(job_id, None)
        try:
            await self.client.hset(job_key(job_id), "cancelled", "1")
        except RedisError as e:
            log.warning("could not cancel job %s: %s", job_id, e)

    async def scene_command(
        self,
        core: Core,
        *,
        place: Place,
        user_id: str,
        prompt: str,
        surface: Surface,
        acknowledge: Callable[[str], Awaitable[None]],
        update: Callable[[str], Awaitable[None]],
    ) -> None:
        """Core.scene_command with a worker writing the scene: queue, acknowledge with
        the position across every worker, wait for the stored scene, post it here."""
        if not core.accepting or self._closed:
            raise EngineError("I'm shutting down for a moment; please try again shortly.")
        prompt = clean_prompt(prompt, MAX_PROMPT_CHARS)  # BadPrompt before anything queues
        settings = await core.db.get_settings(place.platform, place.channel_id)
        ticket = await self.submit(place, user_id, prompt, settings)
        try:
            await acknowledge(queue_text(ticket))
        except BaseException:
            await self.cancel(ticket.id)
            raise
        try:
            result = await asyncio.shield(ticket.future)
        except HandedOver:
            await update(HANDED_OVER)
            return
        finally:
            self._waiting.pop(ticket.id, None)
        if result.error is not None:
            await self._posted(ticket.id)
            await update(FAILED + surface.escape(result.error))
            return
        outcome = await self._post(core, ticket.id, result.scene_id, surface)
        if outcome is None:
            await update(f"🎬 Scene {result.scene_id} is posted in this channel.")
            return
        stored, delivery = outcome
        await update(core._outcome(stored, delivery, surface, result.scene()))

    async def _post(self, core: Core, job_id: str, scene_id: int, surface: Surface):
        """Post a stored scene once: (stored, delivery), or None when it is out already
        (or being posted by someone else; then it stays in `unposted` until it is out)."""
        claim = await core.db.claim_posting(scene_id)
        if claim in ("posted", "missing"):
            if claim == "missing":
                log.warning("job %s: its scene %s is not in the database", job_id, scene_id)
            await self._posted(job_id)
            return None
        if claim != "claimed":
            return None
        try:
            stored: StoredScene = await core.db.get_scene(scene_id)
            delivery = await core._deliver(stored, surface)
        finally:
            await core._release(scene_id)
        await self._posted(job_id)  # a failed posting is stored: `/scene #ID` finishes it
        return stored, delivery

    async def _posted(self, job_id: str) -> None:
        try:
            async with self.client.pipeline(transaction=True) as pipe:
                pipe.zrem(UNPOSTED, job_id)
                pipe.expire(job_key(job_id), POSTED_TTL_S)
                await pipe.execute()
        except RedisError as e:  # the sweeper finds it posted (claim_posting) and drops it
            log.warning("could not mark job %s posted in Redis: %s", job_id, e)

    # -- background: results, heartbeat, orphans -----------------------------------------

    async def _beat(self) -> None:
        await self.client.set(gateway_key(self.id), "1", ex=max(1, math.ceil(self.ttl_s)))

    def _settle(self, job_id: str, raw: str | None) -> None:
        ticket = self._waiting.get(job_id)
        if ticket is not None and raw and not ticket.future.done():
            ticket.future.set_result(Result.loads(raw))

    async def _read_results(self) -> None:
        while not self._closed:
            try:
                answer = await self.client.xread({RESULTS: self._last}, block=1000, count=100)
                for _, entries in answer or ():
                    for entry_id, fields in entries:
                        self._last = entry_id
                        job_id = fields.get("job", "")
                        if job_id in self._waiting:
                            self._settle(job_id, await self.client.hget(job_key(job_id), "result"))
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError) as e:
                log.warning("reading scene results from Redis failed (%s); retrying", e)
                await asyncio.sleep(1)

    async def _sweep(self) -> None:
        """Every third of QUEUE_CLAIM_TIMEOUT_S: renew this gateway's heartbeat, settle its
        own jobs whose result the reader missed, and post finished scenes whose gateway
        is gone (it was restarted or died) on this gateway's platforms."""
        loop = asyncio.get_running_loop()
        while not self._closed:
            next_sweep = loop.time() + max(0.2, self.ttl_s / 3)
            while not self._closed and loop.time() < next_sweep:
                await asyncio.sleep(min(0.2, next_sweep - loop.time()))
            if self._closed:
                return
            try:
                await self._beat()
                await self.sweep_once()
            except asyncio.CancelledError:
                raise
            except (RedisError, OSError, DatabaseError) as e:
                log.warning("queue sweep failed (%s); retrying", e)
            except Exception:
                log.exception("queue sweep failed")

    async def sweep_once(self) -> int:
        """One sweep (see _sweep); returns how many orphaned scenes it posted."""
        for job_id, ticket in list(self._waiting.items()):
            if not ticket.future.done():
                self._settle(job_id, await self.client.hget(job_key(job_id), "result"))
        posted = 0
        for job_id in await self.client.zrange(UNPOSTED, 0, 99):
            if job_id in self._waiting:
                continue
            data = await self.client.hgetall(job_key(job_id))
            if "payload" not in data or "result" not in data:
                await self.client.zrem(UNPOSTED, job_id)
                continue
            job = json.loads(data["payload"])
            origin = job.get("gateway", "")
            if origin != self.id and await self.client.exists(gateway_key(origin)):
                continue  # its own gateway is alive and posts it
            if await self.adopt(job_id, job, Result.loads(data["result"])):
                posted += 1
        return posted

    async def adopt(self, job_id: str, job: dict, result: Result) -> bool:
        """Post an orphaned finished job if this gateway serves its platform and channel."""
        core = self._core
        place = Place(*job["place"])
        factory = core.surfaces.get(place.platform) if core is not None else None
        surface = factory(place) if factory is not None else None
        if surface is None:
            return False  # another gateway serves that platform (or shard)
        if result.error is not None or result.scene_id is None:
            await self._posted(job_id)  # nobody is left to tell
            return False
        lock = f"{job_key(job_id)}:adopted"
        if not await self.client.set(lock, self.id, nx=True, ex=max(1, math.ceil(self.ttl_s))):
            return False
        outcome = await self._post(core, job_id, result.scene_id, surface)
        if outcome is not None:
            log.info("posted scene %s, whose gateway had gone, in %s", result.scene_id, place)
        return outcome is not None and outcome[1].posted
