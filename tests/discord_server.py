"""A Discord stand-in on 127.0.0.1 for tests that run the real `python -m bot` process: the
REST routes the bot uses and a gateway websocket (HELLO, heartbeat ACKs, READY, then the
events a test dispatches), as Discord documents them. The process is pointed at it by
setting discord.py's REST base and gateway URL before it starts (see `launcher`).

As strict as Discord where the bot relies on it: an interaction is answered once, within
3 s of its creation (10062 Unknown interaction after that); a message create repeating a
nonce with enforce_nonce returns the message created before. Sharding as Discord documents
it (discord.com/developers/docs/topics/gateway#sharding): GET /gateway/bot recommends
`shards`; an IDENTIFY's `shard` must be [shard_id, num_shards] with shard_id below
num_shards (else close 4010 Invalid shard) and num_shards at least `required_shards` (else
4011 Sharding required); a guild's events go to shard (guild_id >> 22) % num_shards, DMs to
shard 0.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from dataclasses import dataclass, field
from typing import Any

import discord
from aiohttp import WSMsgType, web
from discord_payloads import APP_ID, BOT_ID, INTERACTION_WINDOW_S, OWNER_ID, message, user

_ids = itertools.count(300000000000000000)


@dataclass
class Request:
    method: str
    path: str  # without /api/v10
    json: Any


@dataclass
class FakeDiscord:
    port: int = 0
    requests: list[Request] = field(default_factory=list)
    created: list[dict] = field(default_factory=list)
    identified: asyncio.Event = field(default_factory=asyncio.Event)
    shards: int = 1  # what GET /gateway/bot recommends
    required_shards: int = 1  # fewer: 4011 Sharding required (Discord: past 2,500 servers)
    identifies: list[tuple[int, int]] = field(default_factory=list)  # [id, count] of each
    gateway_bot_status: int = 200  # e.g. 503: GET /gateway/bot fails (Discord in trouble)

    def __post_init__(self) -> None:
        self._runner: web.AppRunner | None = None
        self._sockets: list[web.WebSocketResponse] = []
        self._seq = itertools.count(1)
        self._by_nonce: dict[tuple[str, str], dict] = {}
        self._answered: set[str] = set()
        self._changed = asyncio.Condition()
        self._sessions: dict[tuple[int, int], web.WebSocketResponse] = {}

    @property
    def base(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/gateway/", self._gateway)
        app.router.add_route("*", "/api/v10/{tail:.*}", self._rest)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        for ws in self._sockets:
            await ws.close()
        if self._runner is not None:
            await self._runner.cleanup()

    def launcher(self, before_main: str = "") -> str:
        """Python source that runs `python -m bot` against this server; `before_main` is
        code run first (e.g. a slow model)."""
        return (
            "import sys, yarl, discord.http, discord.gateway\n"
            f"discord.http.Route.BASE = {self.base + '/api/v10'!r}\n"
            "discord.gateway.DiscordWebSocket.DEFAULT_GATEWAY = "
            f"yarl.URL({f'ws://127.0.0.1:{self.port}/gateway/'!r})\n"
            f"{before_main}\n"
            "from bot.__main__ import main\n"
            "sys.exit(main())\n"
        )

    # -- what tests do ---------------------------------------------------------------------

    async def dispatch(self, event: str, data: dict) -> None:
        """Send a gateway DISPATCH (e.g. INTERACTION_CREATE) to the session of the shard
        its guild belongs to (shard 0 without a guild), as Discord routes events."""
        await self.identified.wait()
        live = {key: ws for key, ws in self._sessions.items() if not ws.closed}
        counts = {count for _, count in live}
        if len(counts) != 1:
            raise AssertionError(f"sessions disagree on the shard count: {sorted(live)}")
        (count,) = counts
        guild = data.get("guild_id")
        shard = (int(guild) >> 22) % count if guild else 0
        ws = live.get((shard, count))
        if ws is None:
            raise AssertionError(f"no session runs shard {shard} of {count}: {sorted(live)}")
        await ws.send_str(json.dumps({"op": 0, "t": event, "s": next(self._seq), "d": data}))

    async def wait_identified(self, count: int, timeout: float = 180.0) -> list[tuple[int, int]]:
        """The [id, count] of every IDENTIFY so far, once there are `count` of them."""
        async with self._changed:
            await asyncio.wait_for(
                self._changed.wait_for(lambda: len(self.identifies) >= count), timeout
            )
            return list(self.identifies)

    async def wait_for(
        self, method: str | None, fragment: str, text: str = "", timeout: float = 60.0
    ) -> Request:
        """The first request of `method` (None: any) whose path holds `fragment` and whose
        content (a message's, or an interaction response's) holds `text`."""

        def found() -> Request | None:
            for r in self.requests:
                body = r.json if isinstance(r.json, dict) else {}
                content = body.get("content") or (body.get("data") or {}).get("content")
                if method in (None, r.method) and fragment in r.path and text in (content or ""):
                    return r
            return None

        async with self._changed:
            await asyncio.wait_for(self._changed.wait_for(found), timeout)
            return found()

    def find(self, method: str, fragment: str = "") -> list[Request]:
        return [r for r in self.requests if r.method == method and fragment in r.path]

    # -- the gateway -----------------------------------------------------------------------

    async def _gateway(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        self._sockets.append(ws)
        await ws.send_str(json.dumps({"op": 10, "d": {"heartbeat_interval": 41250}}))
        async for msg in ws:
            if msg.type != WSMsgType.TEXT:
                continue
            payload = json.loads(msg.data)
            if payload["op"] == 1:  # heartbeat
                await ws.send_str(json.dumps({"op": 11}))
            elif payload["op"] == 2:  # identify
                shard = payload["d"].get("shard", [0, 1])
                valid = (
                    isinstance(shard, list)
                    and len(shard) == 2
                    and all(type(n) is int for n in shard)
                    and 0 <= shard[0] < shard[1]
                )
                if not valid:
                    await ws.close(code=4010, message=b"Invalid shard.")
                    break
                if shard[1] < self.required_shards:
                    await ws.close(code=4011, message=b"Sharding required.")
                    break
                async with self._changed:
                    self.identifies.append((shard[0], shard[1]))
                    self._sessions[(shard[0], shard[1])] = ws
                    self._changed.notify_all()
                ready = {
                    "v": 10,
                    "user": user(BOT_ID, "SitcomBot", bot=True),
                    "guilds": [],
                    "session_id": "fake-session",
                    "shard": shard,
                    "resume_gateway_url": f"ws://127.0.0.1:{self.port}/gateway/",
                    "application": {"id": str(APP_ID), "flags": 0},
                }
                await ws.send_str(
                    json.dumps({"op": 0, "t": "READY", "s": next(self._seq), "d": ready})
                )
                self.identified.set()
        return ws

    # -- REST --------------------------------------------------------------------------------

    async def _rest(self, request: web.Request) -> web.Response:
        path = "/" + request.match_info["tail"]
        body = await request.json() if request.can_read_body else None
        if isinstance(body, dict) and "payload_json" in body:
            body = json.loads(body["payload_json"])
        async with self._changed:
            self.requests.append(Request(request.method, path, body))
            self._changed.notify_all()
        try:
            answer = self._answer(request.method, path, body)
        except _Error as e:
            return _json({"message": e.message, "code": e.code}, status=e.status)
        if answer is None:
            return web.Response(status=204)
        return _json(answer)

    def _answer(self, method: str, path: str, body: Any) -> Any:
        parts = path.strip("/").split("/")
        if path == "/users/@me":
            return user(BOT_ID, "SitcomBot", bot=True)
        if path == "/gateway/bot" and method == "GET":
            if self.gateway_bot_status != 200:
                raise _Error(self.gateway_bot_status, "Service Unavailable", 0)
            return {
                "url": f"ws://127.0.0.1:{self.port}/gateway/",
                "shards": self.shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        if path == "/oauth2/applications/@me":
            return {
                "id": str(APP_ID),
                "name": "SitcomBot",
                "description": "",
                "icon": None,
                "bot_public": True,
                "bot_require_code_grant": False,
                "owner": user(OWNER_ID, "owner"),
                "verify_key": "x",
                "flags": 0,
            }
        if path.endswith("/commands") and method == "PUT":
            return [
                dict(c, id=str(next(_ids)), application_id=str(APP_ID), version="1") for c in body
            ]
        if parts[0] == "interactions" and parts[-1] == "callback":
            interaction_id = parts[1]
            age = (
                discord.utils.utcnow() - discord.utils.snowflake_time(int(interaction_id))
            ).total_seconds()
            if age > INTERACTION_WINDOW_S:
                raise _Error(404, "Unknown interaction", 10062)
            if interaction_id in self._answered:
                raise _Error(400, "Interaction has already been acknowledged.", 40060)
            self._answered.add(interaction_id)
            return {"interaction": {"id": interaction_id, "type": 2}}
        if parts[0] == "webhooks":
            if method == "DELETE":
                return None
            return message(next(_ids), 0, (body or {}).get("content", ""))
        if parts[0] == "channels" and parts[2:] == ["messages"] and method == "POST":
            key = (parts[1], str(body.get("nonce")))
            if body.get("enforce_nonce") and key in self._by_nonce:
                return self._by_nonce[key]
            created = message(next(_ids), int(parts[1]), body.get("content", ""))
            self.created.append(created)
            if body.get("nonce") is not None:
                self._by_nonce[key] = created
            return created
        if parts[0] == "channels" and "reactions" in parts and method == "PUT":
            return None
        raise _Error(404, "404: Not Found", 0)


class _Error(Exception):
    def __init__(self, status: int, message: str, code: int) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def _json(data: Any, status: int = 200) -> web.Response:
    # Exactly "application/json", as Discord sends it (discord.py parses nothing else).
    return web.Response(
        body=json.dumps(data).encode(), status=status, headers={"Content-Type": "application/json"}
    )
