"""Posting to a Slack channel: bot.posting.Surface over slack_sdk's AsyncWebClient.

Slack ids: a message is identified by its channel and `ts` (unique only within the
channel), stored as "CHANNEL/ts". Keycaps are the reactions :one: … :nine: :keycap_ten:.
"""

from __future__ import annotations

import logging

import aiohttp
from slack_sdk.errors import SlackApiError
from slack_sdk.http_retry.builtin_async_handlers import (
    AsyncConnectionErrorRetryHandler,
    AsyncRateLimitErrorRetryHandler,
    AsyncServerErrorRetryHandler,
)
from slack_sdk.web.async_client import AsyncWebClient

from ..markup import CONTROL_RE, neutralize_markdown
from ..posting import Posted, Refused, Transient, scene_header

log = logging.getLogger(__name__)

PLATFORM = "slack"
REACTIONS = ("one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "keycap_ten")
# Slack shows up to 40,000 characters but recommends 4,000 per message; stay under it.
MESSAGE_LIMIT = 3900
LINE_LIMIT = 1500


def slot_of(reaction: str | None) -> int | None:
    """1-10 for a keycap reaction name, None for anything else."""
    try:
        return REACTIONS.index(reaction) + 1
    except ValueError:
        return None


def escape(text: str) -> str:
    """Text Slack shows as typed: `&`, `<`, `>` escaped as Slack documents, so `<!channel>`,
    `<!here>`, `<!everyone>`, `<@U…>`, `<#C…>` and `<url|label>` stay plain text; control
    characters removed, masked markdown links and headings made inert as on Discord."""
    text = neutralize_markdown(CONTROL_RE.sub("", text))
    return text.replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")


def unescape(text: str) -> str:
    """Command text as typed: Slack sends `&`, `<`, `>` escaped; undone here so they are
    escaped exactly once on the way out (only those three, as Slack documents)."""
    return text.replace("&lt;", "<").replace("&gt;", ">").replace("&amp;", "&")


def make_client(token: str, base_url: str | None = None) -> AsyncWebClient:
    """A Web API client that waits out rate limits (Retry-After) and retries 5xx and
    dropped connections itself (slack_sdk's retry handlers)."""
    return AsyncWebClient(
        token=token,
        base_url=base_url or AsyncWebClient.BASE_URL,
        retry_handlers=[
            AsyncConnectionErrorRetryHandler(max_retry_count=2),
            AsyncRateLimitErrorRetryHandler(max_retry_count=2),
            AsyncServerErrorRetryHandler(max_retry_count=2),
        ],
    )


def explain(error: SlackApiError, channel: str | None = None) -> Exception:
    """A SlackApiError as Transient (worth retrying), Refused (say what to fix) or itself;
    `channel` is where the call tried to post."""
    status = error.response.status_code
    code = error.response.get("error", "") if isinstance(error.response.data, dict) else ""
    if status == 429 or code == "ratelimited":
        raw = error.response.headers.get("Retry-After") or error.response.headers.get("retry-after")
        try:
            retry_after = float(raw[0] if isinstance(raw, list) else raw)
        except (TypeError, ValueError):
            retry_after = None
        return Transient("rate limited", retry_after)
    if status >= 500 or code in (
        "internal_error",
        "fatal_error",
        "service_unavailable",
        "request_timeout",
    ):
        return Transient(f"HTTP {status} {code}".strip())
    if code == "missing_scope":
        needed = error.response.get("needed") or "?"
        return Refused(
            f"the app is missing the `{needed}` scope; a workspace admin has to "
            "add it under OAuth & Permissions and reinstall the app"
        )
    if code == "channel_not_found" and channel and channel.startswith("D"):
        # A direct message between other people: nobody can invite the bot into it.
        return Refused(
            "I can't post in this conversation (a direct message I'm not part "
            "of); use /scene in a channel I'm in"
        )
    if code in ("not_in_channel", "channel_not_found"):
        return Refused(
            "I'm not in this channel; invite me with `/invite @Sitcom` (or the app's name)"
        )
    if code == "is_archived":
        return Refused("this channel is archived")
    if code in ("restricted_action", "ekm_access_denied", "not_allowed_token_type"):
        return Refused(f"Slack doesn't let me post here ({code})")
    return error


class SlackSurface:
    """bot.posting.Surface for one Slack channel."""

    platform = PLATFORM
    max_chars = MESSAGE_LIMIT
    line_chars = LINE_LIMIT
    keycaps = ":one:…:keycap_ten:"

    def __init__(self, client: AsyncWebClient, channel: str) -> None:
        self.client = client
        self.channel = channel
        self._linked = False  # the ack links to the first message only

    def escape(self, text: str) -> str:
        return escape(text)

    def header(self, scene_id: int, part: int, note: str | None) -> str:
        return scene_header(scene_id, part, note, bold="*")

    def line(self, slot: int | None, text: str, line_no: int = 0) -> str:
        # line_no: unused; the keycap says which line a vote is for
        return f"💬 {text}" if slot is None else f":{REACTIONS[slot - 1]}: {text}"

    def link(self, url: str, label: str) -> str:
        return f"<{url}|{label}>"

    async def _call(self, method: str, **kwargs):
        try:
            return await getattr(self.client, method)(**kwargs)
        except SlackApiError as e:
            raise explain(e, kwargs.get("channel")) from e
        except (TimeoutError, aiohttp.ClientError, OSError) as e:
            raise Transient(f"connection lost: {type(e).__name__}") from e

    async def send(self, text: str) -> Posted:
        # link_names/unfurls off: nothing in the text turns into a mention or a preview.
        response = await self._call(
            "chat_postMessage",
            channel=self.channel,
            text=text,
            link_names=False,
            unfurl_links=False,
            unfurl_media=False,
        )
        channel, ts = response["channel"], response["ts"]
        link = None
        if not self._linked:
            self._linked = True
            try:  # nice to have in the ack; never worth failing a post over
                link = (await self.client.chat_getPermalink(channel=channel, message_ts=ts))[
                    "permalink"
                ]
            except (SlackApiError, aiohttp.ClientError, OSError, TimeoutError, KeyError) as e:
                log.info("no permalink for %s/%s: %s", channel, ts, e)
        return Posted(f"{channel}/{ts}", link)

    async def react(self, ref: str, slot: int) -> None:
        channel, ts = ref.split("/", 1)
        try:
            await self._call(
                "reactions_add", channel=channel, timestamp=ts, name=REACTIONS[slot - 1]
            )
        except SlackApiError as e:
            if e.response.get("error") != "already_reacted":  # a retry that had landed
                raise


def message_ref(item: dict) -> str | None:
    """ "CHANNEL/ts" for a reaction event's item, None if it is not a message."""
    if item.get("type") != "message" or not item.get("channel") or not item.get("ts"):
        return None
    return f"{item['channel']}/{item['ts']}"
