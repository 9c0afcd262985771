"""Slack commands and reaction votes on slack-bolt's AsyncApp; Socket Mode or HTTP mode.

Slack has no subcommands or typed options, so every command takes text, parsed by
bot.commands (the console's grammar) and validated with the same ranges as Discord:

    /scene PROMPT | #ID        /best [channel]
    /settings show | set KEY VALUE [KEY VALUE …] | reset
    /checkpoint list | use NAME

Every command is acknowledged at once with an empty ack (Slack waits 3 s at most), before
anything slow; the answers follow through the command's response_url (5 messages within 30
minutes), or chat.postEphemeral when that fails. Replies to the user (queue position,
refusals, usage) are ephemeral; scenes, /best and settings changes go to the channel.
Changing settings needs a workspace admin/owner or an id in ADMIN_USER_IDS; switching
checkpoints needs ADMIN_USER_IDS.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
from decimal import Decimal, InvalidOperation

import aiohttp
from aiohttp import web
from aiohttp.web_log import AccessLogger
from slack_bolt.adapter.socket_mode.async_handler import AsyncSocketModeHandler
from slack_bolt.async_app import AsyncApp
from slack_sdk.errors import SlackApiError
from slack_sdk.signature import SignatureVerifier
from slack_sdk.web.async_client import AsyncWebClient

from sitcom.engine import EngineError
from sitcom.model.catalog import ModelLoadError

from ..checkpoints import CheckpointError
from ..commands import UsageError, parse_best, parse_checkpoint, parse_settings
from ..config import Config
from ..core import Core
from ..db import DatabaseError, LeaseHeld, Place
from ..permissions import NotAllowed, check_checkpoint, check_settings
from .surface import (
    PLATFORM,
    SlackSurface,
    escape,
    make_client,
    message_ref,
    slot_of,
    unescape,
)

log = logging.getLogger(__name__)

USER_FACING = (EngineError, ModelLoadError, CheckpointError, DatabaseError, NotAllowed, UsageError)
SORRY = "Sorry, something went wrong on my side. It has been logged."
EVENTS_PATH = "/slack/events"
COMMANDS = ("/scene", "/best", "/settings", "/checkpoint")  # as in manifest.yaml
EVENTS = ("reaction_added", "reaction_removed")


_TIMESTAMP_RE = re.compile(r"[0-9]{1,12}")
# An app-level token: xapp-1-A0123ABCD-…, the app's id in its second field.
_APP_TOKEN_RE = re.compile(r"xapp-[0-9]+-(A[A-Z0-9]{2,30})-")


def socket_mode_scope(app_token: str) -> str:
    """The lease (see Core.hold_leases) of an app's one Socket Mode process: by the app's
    id, read from its app-level token (a hash of the token when it has none)."""
    found = _APP_TOKEN_RE.match(app_token)
    if found:
        return f"Slack app {found.group(1)}, Socket Mode"
    digest = hashlib.sha256(app_token.encode()).hexdigest()[:12]
    return f"Slack app token sha256:{digest}, Socket Mode"


class SocketModeTaken(DatabaseError):
    """Another live process holds this app's Socket Mode lease."""

    def __init__(self, held: LeaseHeld) -> None:
        super().__init__(
            f"another process already runs this Slack app over Socket Mode: pid {held.pid} "
            f"on host {held.host}; Slack sends each event to one of an app's connections at "
            "random, so run one Socket Mode process (for several, use HTTP mode: "
            "docs/slack.md)"
        )


# A key in the request's own state (RequestKey from aiohttp 3.12; a string before).
_REFUSED = (
    web.RequestKey("sitcom_refused", bool) if hasattr(web, "RequestKey") else "sitcom_refused"
)


def _screen(signing_secret: str):
    """An aiohttp middleware that answers what cannot be a request from Slack before Bolt
    sees it, in one INFO line each: a timestamp that is not a number (Bolt's int() would
    end in HTTP 500 and a logged traceback), a body that is not UTF-8 (likewise), a bad or
    stale signature (Bolt would log the whole body). Slack signs every request
    (api.slack.com/authentication/verifying-requests-from-slack); checked with slack_sdk's
    SignatureVerifier, as Bolt does after this again."""
    verifier = SignatureVerifier(signing_secret)

    @web.middleware
    async def screen(request: web.Request, handler):
        if request.method != "POST":
            return await handler(request)
        timestamp = request.headers.get("X-Slack-Request-Timestamp", "")
        signature = request.headers.get("X-Slack-Signature", "")
        status, why = 0, ""
        if not _TIMESTAMP_RE.fullmatch(timestamp):
            status, why = 401, "no numeric X-Slack-Request-Timestamp"
        else:
            try:
                body = (await request.read()).decode("utf-8")
            except UnicodeDecodeError:
                status, why = 400, "the body is not UTF-8"
            else:
                if not verifier.is_valid(body, timestamp, signature):
                    status, why = 401, "bad or stale signature"
        if status:
            request[_REFUSED] = True
            log.info(
                "Slack HTTP: refused a request from %s (HTTP %d: %s)", request.remote, status, why
            )
            return web.json_response({"error": "invalid request"}, status=status)
        return await handler(request)

    return screen


class _AccessLog(AccessLogger):
    """aiohttp's access log, less the requests `_screen` refused (logged once already)."""

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        if not request.get(_REFUSED):
            super().log(request, response, time)


class SlackFrontend:
    """One Slack app on the shared Core: build it, `start()` (connects), `close()`."""

    def __init__(
        self,
        config: Config,
        core: Core,
        client: AsyncWebClient | None = None,
        host: str | None = None,
    ) -> None:
        self.config = config
        self.core = core
        self.client = client or make_client(config.slack_bot_token)
        self.host = host or config.slack_host  # HTTP mode: SLACK_HOST, loopback by default
        self.tasks: set[asyncio.Task] = set()  # running commands, for a clean shutdown
        # REDIS_URL: a scene whose asking gateway went away is posted by this one
        core.surfaces[PLATFORM] = lambda place: SlackSurface(self.client, place.channel_id)
        self.reactions_handled = 0  # reaction events processed (acked first, then handled)
        self.app = AsyncApp(
            client=self.client,  # holds SLACK_BOT_TOKEN
            signing_secret=config.slack_signing_secret or "",
            # Socket Mode requests are authenticated by the connection, HTTP ones by signature.
            request_verification_enabled=bool(config.slack_signing_secret),
        )
        for name in COMMANDS:
            self.app.command(name)(self._command)
        self.app.event("reaction_added")(self._reaction_added)
        self.app.event("reaction_removed")(self._reaction_removed)
        self._socket: AsyncSocketModeHandler | None = None
        self._runner: web.AppRunner | None = None
        self._stopping: asyncio.Task | None = None
        self.port: int | None = None

    # -- connection ---------------------------------------------------------------------

    async def start(self) -> None:
        """Check the bot token (auth.test), then connect: Socket Mode when SLACK_APP_TOKEN
        is set, otherwise an HTTP server for Slack's requests on SLACK_PORT."""
        auth = await self.client.auth_test()
        log.info("Slack: signed in as %s in workspace %s", auth.get("user"), auth.get("team"))
        if self.config.slack_app_token:
            try:  # one Socket Mode process per app and database
                await self.core.hold_leases(
                    socket_mode_scope(self.config.slack_app_token),
                    [(0, 1)],
                    on_lost=self._lease_lost,
                )
            except LeaseHeld as e:
                raise SocketModeTaken(e) from None
            # Checked once here: the Socket Mode client itself retries a bad token forever.
            await self.client.apps_connections_open(app_token=self.config.slack_app_token)
            self._socket = AsyncSocketModeHandler(self.app, self.config.slack_app_token)
            await self._socket.connect_async()
            log.info("Slack: connected over Socket Mode")
        else:
            web_app = self.app.web_app(path=EVENTS_PATH)
            web_app.middlewares.append(_screen(self.config.slack_signing_secret or ""))
            self._runner = web.AppRunner(web_app, access_log_class=_AccessLog)
            await self._runner.setup()
            site = web.TCPSite(self._runner, self.host, self.config.slack_port)
            await site.start()
            self.port = self._runner.addresses[0][1]
            log.info(
                "Slack: listening for requests on %s port %d at %s",
                self.host,
                self.port,
                EVENTS_PATH,
            )

    def _lease_lost(self, reason: str) -> None:
        # Another process took the lease over (this one stalled past its expiry): it
        # serves the app now; this one stops listening.
        log.error("Slack: stopping Socket Mode: %s", reason)
        if self._socket is not None:
            self._stopping = asyncio.get_running_loop().create_task(self.close())

    async def close(self) -> None:
        if self._socket is not None:
            await self._socket.close_async()
            self._socket = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    # -- commands -----------------------------------------------------------------------

    async def _command(self, ack, command: dict, respond) -> None:
        # Slack waits 3 s for the ack: it goes first, before anything that can be slow
        # (users.info, the database, the queue); every answer then goes through respond.
        await ack()
        task = asyncio.current_task()
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

        async def reply(text: str, public: bool = False) -> None:
            await self._reply(respond, command, text, public)

        name = command.get("command", "")
        command = {**command, "text": unescape(command.get("text") or "")}
        try:
            handler = {
                "/scene": self._scene,
                "/best": self._best,
                "/settings": self._settings,
                "/checkpoint": self._checkpoint,
            }[name]
            await handler(command, reply)
        except USER_FACING as e:
            log.info("%s by %s refused: %s", name, command.get("user_id"), e)
            await reply("⚠️ " + escape(str(e)))
        except Exception:
            log.exception("%s by %s failed", name, command.get("user_id"))
            await reply("⚠️ " + SORRY)

    async def _reply(self, respond, command: dict, text: str, public: bool) -> None:
        """Answer a command through its response_url; when that fails (it expires after
        30 minutes and takes 5 messages; Bolt's respond returns any HTTP status without
        raising), send the text with the Web API instead and log one line."""
        kind = "in_channel" if public else "ephemeral"
        try:
            response = await respond(text=text, response_type=kind, replace_original=False)
        except (aiohttp.ClientError, OSError, TimeoutError, ValueError) as e:
            why = f"{type(e).__name__}: {e}"
        else:
            if response.status_code == 200:
                return
            why = f"HTTP {response.status_code} {_webhook_error(response.body)}".strip()
        name, user, channel = (
            command.get("command"),
            command.get("user_id"),
            command.get("channel_id"),
        )
        method = "chat.postMessage" if public else "chat.postEphemeral"
        try:
            if public:
                await self.client.chat_postMessage(
                    channel=channel,
                    text=text,
                    link_names=False,
                    unfurl_links=False,
                    unfurl_media=False,
                )
            else:
                await self.client.chat_postEphemeral(channel=channel, user=user, text=text)
        except (SlackApiError, aiohttp.ClientError, OSError, TimeoutError) as e:
            problem = e.response.get("error") if isinstance(e, SlackApiError) else repr(e)
            log.warning(
                "reply to %s by %s in %s lost: response_url failed (%s) and %s failed (%s): %.100s",
                name,
                user,
                channel,
                why,
                method,
                problem,
                " ".join(text.split()),
            )
            return
        log.warning(
            "reply to %s by %s in %s: response_url failed (%s); sent with %s instead",
            name,
            user,
            channel,
            why,
            method,
        )

    @staticmethod
    def _place(command: dict) -> Place:
        return Place(PLATFORM, command["team_id"], command["channel_id"])

    async def _scene(self, command: dict, reply) -> None:
        await self.core.scene_command(
            place=self._place(command),
            user_id=command["user_id"],
            prompt=command.get("text", ""),
            surface=SlackSurface(self.client, command["channel_id"]),
            acknowledge=reply,
            update=reply,
        )

    async def _best(self, command: dict, reply) -> None:
        scope = parse_best(command.get("text", ""))
        text = await self.core.best_text(
            self._place(command),
            channel_only=scope == "channel",
            where="workspace",
            escape=escape,
            bold="*",
            keycaps=SlackSurface.keycaps,
        )
        await reply(text, public=True)

    async def _settings(self, command: dict, reply) -> None:
        action, changes = parse_settings(command.get("text", ""))
        place = self._place(command)
        if action == "show":
            await reply(await self.core.show_settings(place, bold="*"))
            return
        user = command["user_id"]
        check_settings(
            user,
            platform_admin=await self._is_workspace_admin(user),
            config=self.config,
            needs="to be a workspace admin or owner",
        )
        if action == "reset":
            await reply(await self.core.reset_settings(place, bold="*"), public=True)
        else:
            await reply(
                await self.core.change_settings(place, user, changes, bold="*"), public=True
            )

    async def _is_workspace_admin(self, user: str) -> bool:
        if user in self.config.admin_user_ids:
            return True  # no need to ask Slack
        try:
            info = (await self.client.users_info(user=user))["user"]
        except SlackApiError as e:
            code = e.response.get("error") if isinstance(e.response.data, dict) else None
            if code == "missing_scope":
                needed = e.response.get("needed") or "users:read"
                raise NotAllowed(
                    f"I can't check whether you are a workspace admin: the app is missing the "
                    f"`{needed}` scope; a workspace admin has to add it under OAuth & "
                    "Permissions and reinstall the app (or list you in ADMIN_USER_IDS)."
                ) from e
            log.warning("users.info for %s failed: %s", user, code or e.response.status_code)
            raise NotAllowed(
                "I couldn't ask Slack whether you are a workspace admin; please "
                "try again in a moment."
            ) from e
        except (aiohttp.ClientError, OSError, TimeoutError, KeyError) as e:
            log.warning("users.info for %s failed: %r", user, e)
            raise NotAllowed(
                "I couldn't ask Slack whether you are a workspace admin; please "
                "try again in a moment."
            ) from e
        return bool(info.get("is_admin") or info.get("is_owner") or info.get("is_primary_owner"))

    async def _checkpoint(self, command: dict, reply) -> None:
        action, name = parse_checkpoint(command.get("text", ""))
        check_checkpoint(command["user_id"], owner=False, config=self.config)
        if action == "list":
            rows = "\n".join(f"• {escape(row)}" for row in self.core.checkpoint_listing())
            await reply(f"🎞️ *Checkpoints*\n{rows}")
            return
        self.core.check_checkpoint_name(name)  # a bad name: refused in the ack
        await reply(f"⏳ Loading `{escape(name)}`…")  # acknowledged; loading takes seconds
        active = await self.core.use_checkpoint(name)
        await reply("✅ " + self.core.switched_text(escape(active), "`"))

    # -- votes --------------------------------------------------------------------------

    async def _reaction_added(self, event: dict, body: dict, context) -> None:
        await self._vote(event, body, context, add=True)

    async def _reaction_removed(self, event: dict, body: dict, context) -> None:
        await self._vote(event, body, context, add=False)

    async def _vote(self, event: dict, body: dict, context, add: bool) -> None:
        ref = message_ref(event.get("item") or {})
        user = event.get("user")
        try:
            if ref is None or not user or user == context.bot_user_id:
                return  # not a message, or the bot's own keycaps
            # Bolt has acked the event already; the event_id makes a redelivery harmless.
            # Events can arrive out of order (a redelivery after a newer event): the event's
            # own time decides which one stands.
            await self.core.vote(
                platform=PLATFORM,
                message_id=ref,
                slot=slot_of(event.get("reaction")),
                user_id=user,
                add=add,
                event_id=body.get("event_id"),
                event_time=event_micros(event.get("event_ts")),
            )
        except DatabaseError as e:  # nobody to reply to for a reaction
            log.warning("vote by %s not stored: %s", user, e)
        finally:
            self.reactions_handled += 1


def event_micros(event_ts: str | None) -> int | None:
    """A Slack `event_ts` ("1700000000.123456") as integer microseconds, None if absent."""
    try:
        return int(Decimal(str(event_ts)) * 1_000_000) if event_ts else None
    except (InvalidOperation, ValueError, OverflowError):
        return None


def _webhook_error(body: str | None) -> str:
    """The error code in a response_url answer such as {"ok":false,"error":"expired_url"}."""
    try:
        data = json.loads(body or "")
    except ValueError:
        return (body or "").strip()[:60]
    return str(data.get("error", "")) if isinstance(data, dict) else ""
