"""A stand-in for Slack on 127.0.0.1, for driving the real slack-bolt AsyncApp offline.

As slack-bolt's own tests do, a local HTTP server answers the Web API (every call is
recorded), `apps.connections.open` hands out a websocket URL on the same server so the real
Socket Mode client connects to it, and response_url posts land here too. Payloads follow
Slack's documented shapes (slash command fields, events_api envelopes, Web API replies).
Faults can be queued per method: "disconnect" (the connection drops mid-request), "500",
"429" (with Retry-After: 0) or any Slack error code such as "missing_scope".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

TEAM = "T0TEAM"
CHANNEL = "C0CHAN"
OTHER_CHANNEL = "C0OTHER"
BOT_USER = "U0BOT"
USER = "U0USER"
ADMIN = "U0ADMIN"  # a workspace admin, per users.info
APP = "A0APP"


@dataclass
class Call:
    method: str
    args: dict
    fault: str | None = None  # what the server did instead of answering


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.responses: list[dict] = []  # what was posted to response_urls
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.acks: dict[str, dict] = {}  # envelope_id -> the app's ack payload
        self.admins = {ADMIN}
        self._ts = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self.port = 0

    # -- server -------------------------------------------------------------------------

    async def start(self) -> FakeSlack:
        app = web.Application()
        app.router.add_post("/api/{method}", self._api)
        app.router.add_get("/api/{method}", self._api)  # slack_sdk GETs a few methods
        app.router.add_get("/socket", self._socket)
        app.router.add_post("/respond/{token}", self._respond)
        self._runner = web.AppRunner(app)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.port = self._runner.addresses[0][1]
        return self

    async def close(self) -> None:
        if self._ws is not None:
            await self._ws.close()
        await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def response_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/respond/{next(self._ts)}"

    def _note(self) -> None:
        self._changed.set()

    async def wait_for(self, predicate, timeout: float = 60.0) -> Any:
        """Wait until predicate() is truthy (checked whenever something arrives)."""
        deadline = time.monotonic() + timeout
        while True:
            result = predicate()
            if result:
                return result
            left = deadline - time.monotonic()
            assert left > 0, "the app never did what the test waited for"
            self._changed.clear()
            try:
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))
            except TimeoutError:
                pass

    # -- Web API ------------------------------------------------------------------------

    async def _api(self, request: web.Request) -> web.StreamResponse:
        method = request.match_info["method"]
        if request.content_type == "application/json":
            args = await request.json()
        else:
            args = {**request.query, **(await request.post())}
        call = Call(method, args)
        self.calls.append(call)
        self._note()
        if self.faults[method]:
            fault = call.fault = self.faults[method].popleft()
            if fault == "disconnect":
                request.transport.close()  # the client sees ServerDisconnectedError
                return web.Response()
            if fault == "500":
                return web.Response(status=500, text="oops")
            if fault == "429":
                return web.json_response({"ok": False, "error": "ratelimited"}, status=429,
                                         headers={"Retry-After": "0"})
            body = {"ok": False, "error": fault}
            if fault == "missing_scope":
                body["needed"] = "reactions:write" if method == "reactions.add" else "chat:write"
            return web.json_response(body)
        return web.json_response(self._answer(method, args))

    def _answer(self, method: str, args: dict) -> dict:
        if method == "auth.test":
            return {"ok": True, "url": "https://test.slack.com/", "team": "Test",
                    "user": "sitcom", "team_id": TEAM, "user_id": BOT_USER, "bot_id": "B0BOT",
                    "is_enterprise_install": False}
        if method == "apps.connections.open":
            return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}
        if method == "chat.postMessage":
            ts = f"{1700000000 + next(self._ts)}.000100"
            return {"ok": True, "channel": args["channel"], "ts": ts,
                    "message": {"type": "message", "text": args.get("text"), "user": BOT_USER,
                                "bot_id": "B0BOT", "ts": ts}}
        if method == "chat.getPermalink":
            return {"ok": True, "channel": args["channel"],
                    "permalink": f"https://test.slack.com/archives/{args['channel']}/p"
                                 f"{args['message_ts'].replace('.', '')}"}
        if method == "users.info":
            user = args["user"]
            return {"ok": True, "user": {"id": user, "team_id": TEAM, "name": user.lower(),
                                         "is_admin": user in self.admins, "is_owner": False,
                                         "is_primary_owner": False, "is_bot": False}}
        return {"ok": True}

    def find(self, method: str, answered: bool = True) -> list[dict]:
        """Arguments of the calls to `method` (only those answered normally, by default)."""
        return [c.args for c in self.calls
                if c.method == method and (c.fault is None or not answered)]

    def posts(self, channel: str = CHANNEL) -> list[str]:
        """Texts of the messages that were posted (not those a fault swallowed)."""
        return [a["text"] for a in self.find("chat.postMessage") if a["channel"] == channel]

    async def _respond(self, request: web.Request) -> web.Response:
        self.responses.append(await request.json())
        self._note()
        return web.Response(text="ok")

    # -- Socket Mode --------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._ws = ws
        await ws.send_json({"type": "hello", "num_connections": 1,
                            "debug_info": {"host": "local"}, "connection_info": {"app_id": APP}})
        self._connected.set()
        async for msg in ws:
            if msg.type == WSMsgType.TEXT:
                ack = json.loads(msg.data)
                self.acks[ack["envelope_id"]] = ack.get("payload") or {}
                self._note()
        return ws

    async def send_envelope(self, envelope: dict) -> dict:
        """Deliver over the socket and return the app's ack payload."""
        await asyncio.wait_for(self._connected.wait(), 30)
        await self._ws.send_json(envelope)
        eid = envelope["envelope_id"]
        await self.wait_for(lambda: eid in self.acks)
        return self.acks[eid]


_envelopes = itertools.count(1)


def slash_command(fake: FakeSlack, command: str, text: str = "", user: str = USER,
                  channel: str = CHANNEL) -> dict:
    """A slash command's fields as Slack sends them (form fields in HTTP mode)."""
    return {
        "token": "legacy-verification-token", "team_id": TEAM, "team_domain": "test",
        "channel_id": channel, "channel_name": "general", "user_id": user,
        "user_name": user.lower(), "command": command, "text": text, "api_app_id": APP,
        "is_enterprise_install": "false", "response_url": fake.response_url(),
        "trigger_id": f"{next(_envelopes)}.1.abc",
    }


def command_envelope(payload: dict) -> dict:
    return {"envelope_id": f"env-{next(_envelopes)}", "type": "slash_commands",
            "accepts_response_payload": True, "payload": payload}


def reaction_event(kind: str, reaction: str, ts_ref: str, user: str = USER,
                   event_id: str | None = None) -> dict:
    """An events_api body for reaction_added/reaction_removed on message `CHANNEL/ts`."""
    channel, ts = ts_ref.split("/")
    return {
        "token": "legacy-verification-token", "team_id": TEAM, "api_app_id": APP,
        "event": {"type": kind, "user": user, "reaction": reaction, "item_user": BOT_USER,
                  "item": {"type": "message", "channel": channel, "ts": ts},
                  "event_ts": f"{time.time():.6f}"},
        "type": "event_callback", "event_id": event_id or f"Ev{next(_envelopes):08d}",
        "event_time": int(time.time()),
        "authorizations": [{"enterprise_id": None, "team_id": TEAM, "user_id": BOT_USER,
                            "is_bot": True, "is_enterprise_install": False}],
        "is_ext_shared_channel": False,
    }


def event_envelope(body: dict, retry_attempt: int = 0) -> dict:
    return {"envelope_id": f"env-{next(_envelopes)}", "type": "events_api",
            "accepts_response_payload": False, "retry_attempt": retry_attempt,
            "retry_reason": "timeout" if retry_attempt else "", "payload": body}
