"""A stand-in for Slack on 127.0.0.1, for driving the real slack-bolt AsyncApp offline.

As slack-bolt's own tests do, a local HTTP server answers the Web API (every call is
recorded), `apps.connections.open` hands out a websocket URL on the same server so the real
Socket Mode client connects to it, and response_url posts land here too. Payloads follow
Slack's documented shapes (slash command fields, events_api envelopes, Web API replies), and
the server is as strict as Slack documents it:

- Tokens: every Web API call needs a known token of the right kind (`xoxb-` bot tokens for
  the Web API, the `xapp-` app-level token for `apps.connections.open`), else `not_authed`,
  `invalid_auth` or `not_allowed_token_type`; each method needs its scope (`missing_scope`
  names it in `needed`). `scopes[token]` can be changed by a test.
- Channels: the bot posts only where it is a member (`members`): `not_in_channel` in a
  channel, `channel_not_found` in a DM (`D…`) it is not part of; ephemeral messages go
  only to members. Reactions need a real message and a known emoji name, once per user.
- Rate limits: a "429" fault answers with a real `Retry-After` (1 s, or N with "429:N")
  and keeps answering 429 to that method until the time is up.
- Acknowledgements: Slack waits 3 s for a Socket Mode ack; `send_envelope` fails the test
  when none came within `ack_deadline_s`.
- response_url: usable 5 times within 30 minutes of the command, then HTTP 404 with
  `used_url` / `expired_url`. `advance(seconds)` moves the fake's clock for those limits.
- Socket Mode: `disconnect()` sends the documented `disconnect` message; the client opens
  a new connection (up to several at once) and envelopes go to the newest.
- The bot's own reactions come back as `reaction_added` events over the socket (Slack
  sends every subscribed event, the app's own included).
- Redelivery: `send_envelope(..., lost=True)` loses a delivery on the wire; `redeliver()`
  sends it later as Slack's retry (same event, new envelope, `retry_attempt` + 1), so
  events can arrive out of order.

Faults can be queued per method: "disconnect" (the connection drops mid-request), "500",
"429" / "429:N" (rate limited, Retry-After N s) or any Slack error code such as
"missing_scope".
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import time
from collections import defaultdict, deque
from dataclasses import dataclass
from typing import Any

from aiohttp import WSMsgType, web

TEAM = "T0TEAM"
CHANNEL = "C0CHAN"
OTHER_CHANNEL = "C0OTHER"  # a channel the bot was never invited to
DM = "D0DM"  # a direct message between two people; the bot is not part of it
BOT_USER = "U0BOT"
USER = "U0USER"
ADMIN = "U0ADMIN"  # a workspace admin, per users.info
APP = "A0APP"
BOT_TOKEN = "xoxb-test"
APP_TOKEN = "xapp-1-test"
# What manifest.yaml asks for, and what the app-level token gets for Socket Mode.
BOT_SCOPES = frozenset(
    {"commands", "chat:write", "reactions:write", "reactions:read", "users:read"}
)
APP_SCOPES = frozenset({"connections:write"})
# Scope each Web API method needs (methods not listed need none beyond a valid token).
NEEDS = {
    "chat.postMessage": "chat:write",
    "chat.postEphemeral": "chat:write",
    "reactions.add": "reactions:write",
    "reactions.get": "reactions:read",
    "users.info": "users:read",
    "apps.connections.open": "connections:write",
}
APP_TOKEN_METHODS = {"apps.connections.open"}
EMOJI = frozenset(
    {
        "one",
        "two",
        "three",
        "four",
        "five",
        "six",
        "seven",
        "eight",
        "nine",
        "keycap_ten",
        "thumbsup",
        "+1",
        "tada",
        "heart",
        "joy",
    }
)
RESPONSE_URL_USES = 5
RESPONSE_URL_TTL_S = 30 * 60
ACK_DEADLINE_S = 3.0


@dataclass
class Call:
    method: str
    args: dict
    fault: str | None = None  # what the server did instead of answering
    token: str | None = None


@dataclass
class ResponseUrl:
    issued_at: float  # on the fake's clock
    user: str
    channel: str
    uses: int = 0


class FakeSlack:
    def __init__(self) -> None:
        self.calls: list[Call] = []
        self.responses: list[dict] = []  # what was accepted at response_urls
        self.rejected_responses: list[tuple[str, dict]] = []  # (error, payload)
        self.faults: dict[str, deque[str]] = defaultdict(deque)
        self.acks: dict[str, dict] = {}  # envelope_id -> the app's ack payload
        self.ack_seconds: dict[str, float] = {}  # envelope_id -> how long the ack took
        self.admins = {ADMIN}
        self.scopes: dict[str, set[str]] = {BOT_TOKEN: set(BOT_SCOPES), APP_TOKEN: set(APP_SCOPES)}
        self.members: dict[str, set[str]] = {
            CHANNEL: {BOT_USER, USER, ADMIN},
            OTHER_CHANNEL: {USER, ADMIN},
            DM: {USER, ADMIN},
        }
        self.messages: dict[tuple[str, str], dict] = {}  # (channel, ts) -> message
        self.echo_reactions = True
        self.echoed: list[str] = []  # envelope ids of the bot's own reactions sent back
        self.ack_deadline_s = ACK_DEADLINE_S
        self.connections = 0  # websockets opened so far
        self.lost: list[dict] = []  # envelopes lost on the wire, for redeliver()
        self._urls: dict[str, ResponseUrl] = {}
        self._url_replies: dict[str, list[dict]] = defaultdict(list)
        self._limited_until: dict[str, float] = {}  # method -> monotonic time
        self._skew = 0.0
        self._ts = itertools.count(1)
        self._ws: web.WebSocketResponse | None = None
        self._sockets: set[web.WebSocketResponse] = set()
        self._connected = asyncio.Event()
        self._changed = asyncio.Event()
        self._sent_at: dict[str, float] = {}
        self._background: set[asyncio.Task] = set()
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
        for task in self._background:
            task.cancel()
        for ws in list(self._sockets):
            await ws.close()
        await self._runner.cleanup()

    @property
    def base_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/api/"

    def now(self) -> float:
        """The fake's clock (monotonic, moved on by `advance`)."""
        return time.monotonic() + self._skew

    def advance(self, seconds: float) -> None:
        """Let `seconds` pass for response_url expiry."""
        self._skew += seconds

    def response_url(self, user: str = USER, channel: str = CHANNEL) -> str:
        token = str(next(self._ts))
        self._urls[token] = ResponseUrl(self.now(), user, channel)
        return f"http://127.0.0.1:{self.port}/respond/{token}"

    def response_url_state(self, url: str) -> ResponseUrl:
        """Uses and age of one response_url (a test may spend its uses)."""
        return self._urls[url.rsplit("/", 1)[-1]]

    def replies(self, url: str) -> list[dict]:
        """What the app posted (successfully) to one response_url."""
        return self._url_replies[url.rsplit("/", 1)[-1]]

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
        auth = request.headers.get("Authorization", "")
        token = auth.removeprefix("Bearer ").strip() if auth.startswith("Bearer ") else None
        token = token or args.pop("token", None)
        call = Call(method, args, token=token)
        self.calls.append(call)
        self._note()
        left = self._limited_until.get(method, 0.0) - time.monotonic()
        if left > 0:  # called again before Retry-After was up: still limited
            call.fault = "429"
            return self._rate_limited(math.ceil(left))
        if self.faults[method]:
            fault = call.fault = self.faults[method].popleft()
            if fault == "disconnect":
                request.transport.close()  # the client sees ServerDisconnectedError
                return web.Response()
            if fault == "500":
                return web.Response(status=500, text="oops")
            if fault.startswith("429"):
                seconds = int(fault.partition(":")[2] or 1)
                self._limited_until[method] = time.monotonic() + seconds
                return self._rate_limited(seconds)
            body = {"ok": False, "error": fault}
            if fault == "missing_scope":
                body["needed"] = "reactions:write" if method == "reactions.add" else "chat:write"
            return web.json_response(body)
        refusal = self._check_token(method, token)
        if refusal is not None:
            call.fault = refusal["error"]
            return web.json_response(refusal)
        body = self._answer(method, args)
        if not body.get("ok"):
            call.fault = body["error"]
        return web.json_response(body)

    @staticmethod
    def _rate_limited(seconds: int) -> web.Response:
        return web.json_response(
            {"ok": False, "error": "ratelimited"}, status=429, headers={"Retry-After": str(seconds)}
        )

    def _check_token(self, method: str, token: str | None) -> dict | None:
        if not token:
            return {"ok": False, "error": "not_authed"}
        if token not in self.scopes:
            return {"ok": False, "error": "invalid_auth"}
        app_level = token.startswith("xapp-")
        if app_level != (method in APP_TOKEN_METHODS):
            return {"ok": False, "error": "not_allowed_token_type"}
        needed = NEEDS.get(method)
        if needed and needed not in self.scopes[token]:
            return {
                "ok": False,
                "error": "missing_scope",
                "needed": needed,
                "provided": ",".join(sorted(self.scopes[token])),
            }
        return None

    def _channel_error(self, channel: str | None) -> str | None:
        """Why the bot can't post in `channel`, as Slack says it."""
        if not channel or channel not in self.members:
            return "channel_not_found"
        if BOT_USER not in self.members[channel]:
            # A DM (or private channel) the bot is not in does not exist as far as it knows.
            return "channel_not_found" if channel[0] in "DG" else "not_in_channel"
        return None

    def _answer(self, method: str, args: dict) -> dict:
        if method == "auth.test":
            return {
                "ok": True,
                "url": "https://test.slack.com/",
                "team": "Test",
                "user": "sitcom",
                "team_id": TEAM,
                "user_id": BOT_USER,
                "bot_id": "B0BOT",
                "is_enterprise_install": False,
            }
        if method == "apps.connections.open":
            return {"ok": True, "url": f"ws://127.0.0.1:{self.port}/socket"}
        if method == "chat.postMessage":
            channel = args.get("channel")
            if error := self._channel_error(channel):
                return {"ok": False, "error": error}
            ts = f"{1700000000 + next(self._ts)}.000100"
            message = {
                "type": "message",
                "text": args.get("text"),
                "user": BOT_USER,
                "bot_id": "B0BOT",
                "ts": ts,
                "reactions": {},
            }
            self.messages[(channel, ts)] = message
            return {
                "ok": True,
                "channel": channel,
                "ts": ts,
                "message": {k: v for k, v in message.items() if k != "reactions"},
            }
        if method == "chat.postEphemeral":
            channel, user = args.get("channel"), args.get("user")
            if error := self._channel_error(channel):
                return {"ok": False, "error": error}
            if user not in self.members[channel]:
                return {"ok": False, "error": "user_not_in_channel"}
            return {"ok": True, "message_ts": f"{1700000000 + next(self._ts)}.000200"}
        if method == "chat.getPermalink":
            channel, ts = args.get("channel"), args.get("message_ts")
            if (channel, ts) not in self.messages:
                return {"ok": False, "error": "message_not_found"}
            return {
                "ok": True,
                "channel": channel,
                "permalink": f"https://test.slack.com/archives/{channel}/p{ts.replace('.', '')}",
            }
        if method == "reactions.add":
            channel, ts, name = args.get("channel"), args.get("timestamp"), args.get("name")
            message = self.messages.get((channel, ts))
            if message is None:
                return {"ok": False, "error": "message_not_found"}
            if name not in EMOJI:
                return {"ok": False, "error": "invalid_name"}
            users = message["reactions"].setdefault(name, [])
            if BOT_USER in users:
                return {"ok": False, "error": "already_reacted"}
            users.append(BOT_USER)
            if self.echo_reactions and self._ws is not None:
                body = reaction_event("reaction_added", name, f"{channel}/{ts}", user=BOT_USER)
                task = asyncio.ensure_future(self._echo(event_envelope(body)))
                self._background.add(task)
                task.add_done_callback(self._background.discard)
            return {"ok": True}
        if method == "users.info":
            user = args["user"]
            return {
                "ok": True,
                "user": {
                    "id": user,
                    "team_id": TEAM,
                    "name": user.lower(),
                    "is_admin": user in self.admins,
                    "is_owner": False,
                    "is_primary_owner": False,
                    "is_bot": False,
                },
            }
        return {"ok": True}

    async def _echo(self, envelope: dict) -> None:
        self.echoed.append(envelope["envelope_id"])
        await self._deliver(envelope)

    def find(self, method: str, answered: bool = True) -> list[dict]:
        """Arguments of the calls to `method` (only those answered normally, by default)."""
        return [
            c.args for c in self.calls if c.method == method and (c.fault is None or not answered)
        ]

    def posts(self, channel: str = CHANNEL) -> list[str]:
        """Texts of the messages that were posted (not those a fault swallowed)."""
        return [a["text"] for a in self.find("chat.postMessage") if a["channel"] == channel]

    async def _respond(self, request: web.Request) -> web.Response:
        token = request.match_info["token"]
        payload = await request.json()
        url = self._urls.get(token)
        error = None
        if url is None:
            error = "invalid_token"
        elif self.now() - url.issued_at > RESPONSE_URL_TTL_S:
            error = "expired_url"
        elif url.uses >= RESPONSE_URL_USES:
            error = "used_url"
        self._note()
        if error is not None:
            self.rejected_responses.append((error, payload))
            return web.json_response({"ok": False, "error": error}, status=404)
        url.uses += 1
        self.responses.append(payload)
        self._url_replies[token].append(payload)
        return web.json_response({"ok": True})

    # -- Socket Mode --------------------------------------------------------------------

    async def _socket(self, request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(autoping=True)
        await ws.prepare(request)
        self._sockets.add(ws)
        self._ws = ws  # envelopes go to the newest connection
        self.connections += 1
        await ws.send_json(
            {
                "type": "hello",
                "num_connections": len(self._sockets),
                "debug_info": {"host": "local"},
                "connection_info": {"app_id": APP},
            }
        )
        self._connected.set()
        self._note()
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    ack = json.loads(msg.data)
                    eid = ack["envelope_id"]
                    self.acks[eid] = ack.get("payload") or {}
                    if eid in self._sent_at:
                        self.ack_seconds[eid] = time.monotonic() - self._sent_at[eid]
                    self._note()
        finally:
            self._sockets.discard(ws)
            if self._ws is ws:
                self._ws = next(iter(self._sockets), None)
                if self._ws is None:
                    self._connected.clear()
        return ws

    async def _deliver(self, envelope: dict) -> None:
        await asyncio.wait_for(self._connected.wait(), 30)
        self._sent_at[envelope["envelope_id"]] = time.monotonic()
        await self._ws.send_json(envelope)

    async def send_envelope(self, envelope: dict, lost: bool = False) -> dict | None:
        """Deliver over the socket and return the app's ack payload; the test fails when
        the ack does not come within Slack's 3 s. `lost=True`: the delivery is lost on the
        wire (kept for `redeliver`), nothing is sent now."""
        if lost:
            self.lost.append(envelope)
            return None
        await self._deliver(envelope)
        eid = envelope["envelope_id"]
        try:
            await self.wait_for(lambda: eid in self.acks, timeout=self.ack_deadline_s)
        except AssertionError:
            raise AssertionError(
                f"no ack within {self.ack_deadline_s:g} s for {envelope['type']} {eid}: "
                "Slack gives up and the user sees an error"
            ) from None
        return self.acks[eid]

    async def redeliver(self, envelope: dict | None = None) -> dict | None:
        """Slack's retry of an unacknowledged (or lost) delivery: the same payload in a new
        envelope with retry_attempt + 1. Without an argument, the oldest lost one."""
        envelope = envelope or self.lost.pop(0)
        attempt = envelope.get("retry_attempt", 0) + 1
        again = {
            **envelope,
            "envelope_id": f"env-{next(_envelopes)}",
            "retry_attempt": attempt,
            "retry_reason": "timeout",
        }
        return await self.send_envelope(again)

    async def disconnect(self, reason: str = "refresh_requested") -> None:
        """Slack's `disconnect` message (sent before it closes a connection, e.g. every few
        hours); returns once the client has connected again, then closes the old socket."""
        await asyncio.wait_for(self._connected.wait(), 30)
        old, before = self._ws, self.connections
        await old.send_json(
            {"type": "disconnect", "reason": reason, "debug_info": {"host": "local"}}
        )
        await self.wait_for(lambda: self.connections > before, timeout=30)
        if not old.closed:
            await old.close()


_envelopes = itertools.count(1)


def slash_command(
    fake: FakeSlack, command: str, text: str = "", user: str = USER, channel: str = CHANNEL
) -> dict:
    """A slash command's fields as Slack sends them (form fields in HTTP mode)."""
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM,
        "team_domain": "test",
        "channel_id": channel,
        "channel_name": "directmessage" if channel.startswith("D") else "general",
        "user_id": user,
        "user_name": user.lower(),
        "command": command,
        "text": text,
        "api_app_id": APP,
        "is_enterprise_install": "false",
        "response_url": fake.response_url(user, channel),
        "trigger_id": f"{next(_envelopes)}.1.abc",
    }


def command_envelope(payload: dict) -> dict:
    return {
        "envelope_id": f"env-{next(_envelopes)}",
        "type": "slash_commands",
        "accepts_response_payload": True,
        "payload": payload,
    }


def reaction_event(
    kind: str,
    reaction: str,
    ts_ref: str,
    user: str = USER,
    event_id: str | None = None,
    event_ts: float | None = None,
) -> dict:
    """An events_api body for reaction_added/reaction_removed on message `CHANNEL/ts`;
    `event_ts` is when the reaction happened (now by default)."""
    channel, ts = ts_ref.split("/")
    when = time.time() if event_ts is None else event_ts
    return {
        "token": "legacy-verification-token",
        "team_id": TEAM,
        "api_app_id": APP,
        "event": {
            "type": kind,
            "user": user,
            "reaction": reaction,
            "item_user": BOT_USER,
            "item": {"type": "message", "channel": channel, "ts": ts},
            "event_ts": f"{when:.6f}",
        },
        "type": "event_callback",
        "event_id": event_id or f"Ev{next(_envelopes):08d}",
        "event_time": int(when),
        "authorizations": [
            {
                "enterprise_id": None,
                "team_id": TEAM,
                "user_id": BOT_USER,
                "is_bot": True,
                "is_enterprise_install": False,
            }
        ],
        "is_ext_shared_channel": False,
    }


def event_envelope(body: dict, retry_attempt: int = 0) -> dict:
    return {
        "envelope_id": f"env-{next(_envelopes)}",
        "type": "events_api",
        "accepts_response_payload": False,
        "retry_attempt": retry_attempt,
        "retry_reason": "timeout" if retry_attempt else "",
        "payload": body,
    }
