"""Drive the real discord.py machinery without a network: gateway payloads in, HTTP recorded.

As discord.py's own tests do, Interactions are built from gateway-shaped payloads on a real
ConnectionState; only the two places where bytes would leave the process are replaced:
`HTTPClient.request` (bot REST calls) and the webhook adapter (interaction responses).
Every request is recorded in `Recorder.calls` and answered with a plausible payload.
"""

from __future__ import annotations

import asyncio
import datetime
import itertools
from dataclasses import dataclass
from types import SimpleNamespace
from typing import Any

import discord
from discord.webhook.async_ import AsyncWebhookAdapter, async_context

APP_ID = 100000000000000001
BOT_ID = 100000000000000002
OWNER_ID = 100000000000000003
GUILD_ID = 100000000000000004
CHANNEL_ID = 100000000000000005
USER_ID = 100000000000000006

MANAGE = discord.Permissions(manage_channels=True)  # a moderator's permissions, for `permissions=`
EPHEMERAL = 64  # the message flag of a reply only its user sees (MessageFlags.ephemeral)

_ids = itertools.count(200000000000000000)


def next_id() -> int:
    return next(_ids)


def interaction_id(age_s: float = 0.0) -> int:
    """A unique snowflake made `age_s` seconds ago."""
    made = discord.utils.utcnow() - datetime.timedelta(seconds=age_s)
    return discord.utils.time_snowflake(made) + next(_ids) % (1 << 22)


def user(user_id: int, name: str = "someone", bot: bool = False) -> dict:
    return {
        "id": str(user_id),
        "username": name,
        "discriminator": "0",
        "global_name": name,
        "avatar": None,
        "bot": bot,
    }


def message(message_id: int, channel_id: int, content: str, author_id: int = BOT_ID) -> dict:
    return {
        "id": str(message_id),
        "channel_id": str(channel_id),
        "content": content,
        "author": user(author_id, "SitcomBot", bot=True),
        "timestamp": "2024-01-01T00:00:00+00:00",
        "edited_timestamp": None,
        "tts": False,
        "mention_everyone": False,
        "mentions": [],
        "mention_roles": [],
        "attachments": [],
        "embeds": [],
        "pinned": False,
        "type": 0,
    }


@dataclass
class Call:
    method: str
    path: str  # without the https://discord.com/api/vN prefix
    json: Any


INTERACTION_WINDOW_S = 3.0  # Discord's limit for the first response to an interaction


class Recorder:
    """As strict as Discord where the bot relies on it: an interaction is answered once,
    within 3 s of its creation (its id's timestamp), or 10062 Unknown interaction; a
    message create with a nonce and enforce_nonce that repeats one returns the message
    created before instead of a new one. GET /gateway/bot recommends `shards` shards."""

    shards = 1

    def __init__(self) -> None:
        self.calls: list[Call] = []
        # (method, path part, content part, error, dropped): dropped = the request is
        # carried out and only its answer is lost (the connection drops on the way back)
        self.faults: list[tuple[str, str, str, BaseException, bool]] = []
        self.created: list[dict] = []  # channel messages that exist, in order
        self._by_nonce: dict[tuple[int, str], dict] = {}
        self._answered: set[str] = set()  # interactions with their first response

    def fail(self, method: str, fragment: str, error: BaseException, content: str = "") -> None:
        """The next `method` request whose path holds `fragment` (and whose content holds
        `content`) raises `error` instead."""
        self.faults.append((method, fragment, content, error, False))

    def drop_answer(self, method: str, fragment: str, error: BaseException) -> None:
        """The next such request is carried out, then `error` is raised in place of the
        answer: the message is created, the bot never hears of it."""
        self.faults.append((method, fragment, "", error, True))

    def _fault(self, method: str, path: str, body: Any) -> tuple[BaseException | None, bool]:
        text = body.get("content") if isinstance(body, dict) else None
        for i, (m, fragment, content, error, dropped) in enumerate(self.faults):
            if m == method and fragment in path and content in (text or ""):
                del self.faults[i]
                return error, dropped
        return None, False

    def find(self, method: str, fragment: str = "") -> list[Call]:
        return [c for c in self.calls if c.method == method and fragment in c.path]

    def texts(self) -> list[str]:
        """Every message content the bot sent, edited or replied, in order."""
        return [
            c.json["content"]
            for c in self.calls
            if isinstance(c.json, dict) and isinstance(c.json.get("content"), str)
        ]

    def replies(self) -> list[dict]:
        """Interaction responses and follow-ups: content, flags (64 = ephemeral), mentions."""
        out = []
        for c in self.calls:
            body = c.json or {}
            if c.path.endswith("/callback"):
                out.append(body.get("data") or {})
            elif c.path.startswith("/webhooks/") and c.method in ("POST", "PATCH"):
                out.append(body)
        return out

    def answer(self, method: str, path: str, body: Any) -> Any:
        error, dropped = self._fault(method, path, body)
        if error is not None and not dropped:
            raise error
        result = self._carry_out(method, path, body)
        if error is not None:
            raise error
        return result

    def _carry_out(self, method: str, path: str, body: Any) -> Any:
        self.calls.append(Call(method, path, body))
        if method == "POST" and path.endswith("/messages") and path.startswith("/channels/"):
            channel_id = int(path.split("/")[2])
            key = (channel_id, str(body.get("nonce")))
            if body.get("enforce_nonce") and key in self._by_nonce:
                return self._by_nonce[key]
            created = message(next_id(), channel_id, body.get("content", ""))
            self.created.append(created)
            if body.get("nonce") is not None:
                self._by_nonce[key] = created
            return created
        if path.endswith("/callback"):
            interaction_id = path.split("/")[2]
            age = (
                discord.utils.utcnow() - discord.utils.snowflake_time(int(interaction_id))
            ).total_seconds()
            if age > INTERACTION_WINDOW_S:
                raise http_error(discord.NotFound, 404, "Unknown interaction", 10062)
            if interaction_id in self._answered:
                raise http_error(
                    discord.HTTPException, 400, "Interaction has already been acknowledged.", 40060
                )
            self._answered.add(interaction_id)
            return {"interaction": {"id": interaction_id, "type": 2}}
        if path.startswith("/webhooks/") and method in ("POST", "PATCH"):
            return message(next_id(), CHANNEL_ID, body.get("content", ""))
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
                dict(c, id=str(next_id()), application_id=str(APP_ID), version="1") for c in body
            ]
        if path == "/gateway/bot" and method == "GET":
            return {
                "url": "wss://gateway.discord.gg",
                "shards": self.shards,
                "session_start_limit": {
                    "total": 1000,
                    "remaining": 999,
                    "reset_after": 14400000,
                    "max_concurrency": 1,
                },
            }
        return None


def _path(url: str) -> str:
    return url.split("/api/v10", 1)[-1]


class RecordingWebhookAdapter(AsyncWebhookAdapter):
    def __init__(self, recorder: Recorder) -> None:
        super().__init__()
        self.recorder = recorder

    async def request(self, route, session=None, *, payload=None, **kwargs) -> Any:
        return self.recorder.answer(route.method, _path(route.url), payload)


def install(bot: discord.Client) -> Recorder:
    """Replace the network under `bot` with a Recorder and log it in as BOT_ID."""
    recorder = Recorder()

    async def request(route, *, files=None, form=None, **kwargs):
        return recorder.answer(route.method, _path(route.url), kwargs.get("json"))

    bot.http.request = request
    async_context.set(RecordingWebhookAdapter(recorder))
    state = bot._connection
    state.user = discord.ClientUser(state=state, data=user(BOT_ID, "SitcomBot", bot=True))
    state.application_id = APP_ID
    return recorder


def command_payload(
    name: str,
    options: list[dict] | None = None,
    *,
    user_id: int = USER_ID,
    permissions: discord.Permissions | None = None,
    channel_id: int = CHANNEL_ID,
    age_s: float = 0.0,
) -> dict:
    """An INTERACTION_CREATE for a slash command in GUILD_ID/channel_id, created `age_s`
    seconds ago (its id holds the time, as Discord's do)."""
    perms = permissions if permissions is not None else discord.Permissions.none()
    return {
        "id": str(interaction_id(age_s)),
        "application_id": str(APP_ID),
        "type": 2,
        "token": f"token-{next_id()}",
        "version": 1,
        "guild_id": str(GUILD_ID),
        "channel_id": str(channel_id),
        "channel": {
            "id": str(channel_id),
            "type": 0,
            "guild_id": str(GUILD_ID),
            "name": "general",
            "position": 0,
            "permission_overwrites": [],
            "nsfw": False,
            "parent_id": None,
        },
        "member": {
            "user": user(user_id),
            "roles": [],
            "joined_at": "2024-01-01T00:00:00+00:00",
            "deaf": False,
            "mute": False,
            "flags": 0,
            "permissions": str(perms.value),
        },
        "app_permissions": str(discord.Permissions.all().value),
        "locale": "en-US",
        "guild_locale": "en-US",
        "attachment_size_limit": 8388608,
        "entitlements": [],
        "authorizing_integration_owners": {},
        "context": 0,
        "data": {"id": str(next_id()), "name": name, "type": 1, "options": options or []},
    }


def option(name: str, value: Any) -> dict:
    kind = {bool: 5, int: 4, float: 10, str: 3}[type(value)]
    return {"name": name, "type": kind, "value": value}


def subcommand(name: str, *options: dict) -> dict:
    return {"name": name, "type": 1, "options": list(options)}


async def invoke(bot: discord.Client, payload: dict) -> discord.Interaction:
    """Run a command like the gateway would, but awaited: parse -> tree -> error handler."""
    interaction = discord.Interaction(data=payload, state=bot._connection)
    tree = bot.tree
    try:
        await tree._call(interaction)
    except discord.app_commands.AppCommandError as e:  # what CommandTree._from_interaction does
        await tree._dispatch_error(interaction, e)
    return interaction


def reaction_payload(message_id: int, emoji: str, user_id: int = USER_ID) -> dict:
    return {
        "user_id": str(user_id),
        "channel_id": str(CHANNEL_ID),
        "message_id": str(message_id),
        "guild_id": str(GUILD_ID),
        "emoji": {"id": None, "name": emoji},
        "burst": False,
        "type": 0,
    }


async def settle(bot: discord.Client) -> None:
    """Wait for the event handlers that bot.dispatch scheduled (named 'discord.py: on_...')."""
    while True:
        pending = [
            t
            for t in asyncio.all_tasks()
            if t.get_name().startswith("discord.py: ") and not t.done()
        ]
        if not pending:
            return
        await asyncio.gather(*pending)


def http_error(kind: type[discord.HTTPException], status: int, message: str, code: int = 0):
    """What discord.py raises for an error status (built from a response-like object)."""
    response = SimpleNamespace(status=status, reason=message)
    return kind(response, {"code": code, "message": message})
