"""The Slack frontend through the real slack-bolt AsyncApp, Socket Mode client and slack_sdk
Web client, on real SQLite files and the real SceneEngine with the tiny model; Slack itself
is tests/slack_fake.py, a server on 127.0.0.1 fed with Slack's documented payloads."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import time
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
import pytest_asyncio
from helpers import answers, command, make_config, refs, scripted_loader, sign, start_slack
from slack_fake import (
    ADMIN,
    APP_TOKEN,
    BOT_TOKEN,
    BOT_USER,
    CHANNEL,
    DM,
    TEAM,
    USER,
    FakeSlack,
    command_envelope,
    event_envelope,
    reaction_event,
    slash_command,
)

from bot.slack.surface import escape, make_client
from sitcom.settings import SceneSettings

DEFAULT = SceneSettings()

pytestmark = pytest.mark.asyncio
HOSTILE = "Elaine: <!channel> <!here> <!everyone> <@U0BOSS> <#C0SECRET> & <https://x.io|y>"


@pytest_asyncio.fixture
async def slack(tmp_path, tiny_model_dir):
    fake = await FakeSlack().start()
    app = await start_slack(tmp_path, tiny_model_dir, fake, admin_user_ids=frozenset({"U0LISTED"}))
    # Short scenes keep the suite fast; set through the real command, as an admin would.
    await command(fake, "/settings", "set max_new_tokens 24", user=ADMIN)
    fake.calls.clear()
    yield app, fake
    await app.core.close()
    await app.close()
    await fake.close()


async def scene(fake: FakeSlack, prompt: str, **kw) -> tuple[dict, dict]:
    """(acknowledgement, final ephemeral reply) of a /scene."""
    first, last = await answers(fake, slash_command(fake, "/scene", prompt, **kw), 2)
    return first, last


async def handled(app, goal: int) -> None:
    for _ in range(1000):
        if app.reactions_handled >= goal:
            return
        await asyncio.sleep(0.02)
    raise AssertionError("the reaction event was never handled")


async def react(app, fake: FakeSlack, body: dict, retry: int = 0, reaches_app=True) -> None:
    """Deliver a reaction event over Socket Mode and wait until the app has handled it
    (Bolt acks events before its listener runs). Bolt itself drops the bot's own events."""
    goal = app.reactions_handled + 1
    await fake.send_envelope(event_envelope(body, retry_attempt=retry))
    if reaches_app:
        await handled(app, goal)


async def test_socket_mode_scene_is_posted_escaped_with_keycaps(slack):
    app, fake = slack
    # The connection path: token check, Socket Mode URL, websocket (all to 127.0.0.1).
    # Slack sends &, <, > in command text escaped; `&amp;lt;` is a typed "&lt;".
    ack, done = await scene(fake, HOSTILE + "\nJerry: What? Tom &amp; Jerry &amp;lt;3")
    assert ack["response_type"] == "ephemeral" and "#1 in the queue" in ack["text"]
    assert "Scene 1 is ready <https://test.slack.com/archives/" in done["text"]
    assert done["response_type"] == "ephemeral"

    (text,) = fake.posts()
    rows = text.split("\n")
    assert rows[0].startswith("🎬 *Scene 1*")
    assert rows[1] == (
        "💬 ELAINE: &lt;!channel&gt; &lt;!here&gt; &lt;!everyone&gt; "
        "&lt;@U0BOSS&gt; &lt;#C0SECRET&gt; &amp; &lt;https://x.io|y&gt;"
    )
    assert rows[2] == "💬 JERRY: What? Tom &amp; Jerry &amp;lt;3"  # escaped exactly once
    written = rows[3:]
    assert written and written[0] == ":one: GEORGE: What is it?"
    assert written[1] == ":two: KRAMER: Giddyup! @everyone"
    assert "<" not in text and ">" not in text  # nothing can become a mention
    post = fake.find("chat.postMessage")[0]
    assert post["link_names"] is False and post["unfurl_links"] is False
    reactions = fake.find("reactions.add")
    assert [r["name"] for r in reactions] == [
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
    ][: len(written)]
    assert (await app.core.db.get_scene(1)).posted


async def test_votes_once_across_redelivery_unvote_and_bot_reactions(slack):
    app, fake = slack
    await scene(fake, "Elaine: Jerry! George!")
    ref = refs(fake)[0]

    async def event(kind, reaction, user=USER, event_id=None, retry=0):
        body = reaction_event(kind, reaction, ref, user=user, event_id=event_id)
        await react(app, fake, body, retry, reaches_app=user != BOT_USER)
        return body["event_id"]

    async def tally():
        return sorted((r.line_no, r.votes) for r in await app.core.db.best("slack", TEAM))

    first = await event("reaction_added", "one")
    await event("reaction_added", "one", event_id=first, retry=1)  # redelivered: same id
    await event("reaction_added", "one", user=BOT_USER)  # the bot's own keycap
    await event("reaction_added", "thumbsup")
    await event("reaction_added", "two", user=ADMIN)
    assert await tally() == [(2, 1), (3, 1)]
    await event("reaction_added", "one", user=ADMIN)  # a second user on line 2
    assert await tally() == [(2, 2), (3, 1)]

    await event("reaction_removed", "one")
    assert await tally() == [(2, 1), (3, 1)]
    # The first add arrives once more after the removal (a reconnect): still removed.
    await event("reaction_added", "one", event_id=first, retry=2)
    assert await tally() == [(2, 1), (3, 1)]

    ack = await command(fake, "/best", "channel")
    assert ack["response_type"] == "in_channel"
    assert "*Best lines in this channel*" in ack["text"] and "GEORGE: What is it?" in ack["text"]
    assert "ELAINE" not in ack["text"]  # the user's own line is never ranked
    assert "Best lines in this workspace" in (await command(fake, "/best"))["text"]


async def test_bad_command_text_gets_usage_ephemerally(slack):
    _, fake = slack
    for name, text, expected in [
        ("/scene", "", "opening line"),
        ("/scene", "\x00\x07", "opening line"),
        ("/scene", "x" * 3000, "keep it under 1000"),
        ("/scene", "#99", "no scene 99 in this channel"),
        ("/settings", "frobnicate", "Usage: `/settings show`"),
        ("/settings", "set temperature", "Usage: `/settings show`"),
        ("/settings", "set temperature lots", "needs a number"),
        ("/settings", "set temperature nan", "needs a number"),
        ("/settings", "set warmth 3", "no setting `warmth`"),
        ("/best", "forever", "Usage: `/best`"),
        ("/checkpoint", "use", "Usage: `/checkpoint list`"),
    ]:
        ack = await command(fake, name, text, user=ADMIN if name == "/settings" else USER)
        assert expected in ack["text"], (name, text, ack)
        assert ack["response_type"] == "ephemeral" and "Traceback" not in ack["text"]
    assert not fake.find("chat.postMessage")


async def test_engine_refusals_are_polite_ephemeral_acks(slack):
    app, fake = slack
    app.core.engine.max_queue = 0  # the queue is full
    ack = await command(fake, "/scene", "Jerry: Anyone?")
    assert "The writers' room is full" in ack["text"] and ack["response_type"] == "ephemeral"
    app.core.accepting = False  # shutting down
    ack = await command(fake, "/scene", "Jerry: Anyone?")
    assert "shutting down" in ack["text"]
    app.core.accepting = True
    assert not fake.find("chat.postMessage")


async def test_settings_and_checkpoint_permissions(slack):
    app, fake = slack
    refused = await command(fake, "/settings", "set temperature 1.3", user=USER)
    assert refused["response_type"] == "ephemeral"
    assert "workspace admin or owner" in refused["text"]
    assert fake.find("users.info")[-1]["user"] == USER  # asked Slack who this is

    out_of_range = await command(fake, "/settings", "set temperature 5", user=ADMIN)
    assert "temperature must be between 0.1 and 2" in out_of_range["text"]
    saved = await command(fake, "/settings", "set temperature=1.3 top_k 7", user=ADMIN)
    assert saved["response_type"] == "in_channel" and "`temperature` = 1.3" in saved["text"]
    settings = await app.core.db.get_settings("slack", CHANNEL)
    assert (settings.temperature, settings.top_k, settings.max_new_tokens) == (1.3, 7, 24)
    listed = await command(fake, "/settings", "reset", user="U0LISTED")  # ADMIN_USER_IDS
    assert "Reset." in listed["text"]
    shown = await command(fake, "/settings", "show", user=USER)  # anyone may look
    assert shown["response_type"] == "ephemeral"
    assert f"`temperature` = {SceneSettings().temperature:g}" in shown["text"]

    # Checkpoints: ADMIN_USER_IDS only; a workspace admin is not enough.
    for user in (USER, ADMIN):
        ack = await command(fake, "/checkpoint", "list", user=user)
        assert "Only the bot's admins" in ack["text"] and ack["response_type"] == "ephemeral"
    ack = await command(fake, "/checkpoint", "use ../x", user="U0LISTED")
    assert "not a checkpoint name" in ack["text"]
    ack = await command(fake, "/checkpoint", "list", user="U0LISTED")
    assert "smollm2" in ack["text"]
    shutil.copytree(app.config.default_checkpoint, app.config.checkpoints_dir / "ft-1")
    ack = await command(fake, "/checkpoint", "use ft-1", user="U0LISTED")
    assert "Loading `ft-1`" in ack["text"]
    await fake.wait_for(lambda: fake.responses and "now written by" in fake.responses[-1]["text"])
    assert app.core.checkpoint == "ft-1" and fake.responses[-1]["response_type"] == "ephemeral"


async def test_posting_survives_drops_5xx_and_429(slack):
    app, fake = slack
    # Each fault once, then success: slack_sdk's retry handlers (and ours behind them).
    for fault in ("disconnect", "500", "429"):
        before = len(fake.posts())
        tries = len(fake.find("chat.postMessage", answered=False))
        fake.faults["chat.postMessage"].append(fault)
        fake.faults["reactions.add"].append(fault)
        _, done = await scene(fake, f"Jerry: {fault}!")
        assert "is ready" in done["text"], (fault, done)
        assert len(fake.posts()) == before + 1  # posted once, not twice, not zero
        # The failed attempt, then the retry.
        assert len(fake.find("chat.postMessage", answered=False)) == tries + 2
    # More 429s than slack_sdk retries: our backstop waits Retry-After and tries again.
    fake.faults["chat.postMessage"].extend(["429"] * 4)
    _, done = await scene(fake, "Jerry: Busy!")
    assert "is ready" in done["text"]
    assert all(s.posted for s in [await app.core.db.get_scene(i) for i in range(1, 5)])


async def test_not_in_channel_is_explained_and_the_scene_reposted_later(slack):
    app, fake = slack
    fake.faults["chat.postMessage"].append("not_in_channel")
    _, done = await scene(fake, "Elaine: Jerry!")
    assert "Scene 1 is written and saved" in done["text"]
    assert "/invite" in done["text"] and "/scene #1" in done["text"]
    stored = await app.core.db.get_scene(1)
    assert not stored.posted and len(stored.lines) >= 2  # nothing lost

    _, done = await scene(fake, "#1")
    assert "Scene 1 is ready" in done["text"]
    assert (await app.core.db.get_scene(1)).posted and len(fake.posts()) == 1
    ack = await command(fake, "/scene", "#1")
    assert "posted already" in ack["text"]


async def test_missing_reactions_scope_posts_every_line_and_says_why(slack):
    app, fake = slack
    fake.faults["reactions.add"].append("missing_scope")
    _, done = await scene(fake, "Elaine: Jerry!")
    assert "Scene 1 is ready" in done["text"]
    assert "`reactions:write` scope" in done["text"] and ":one:…:keycap_ten:" in done["text"]
    assert len(fake.find("reactions.add", answered=False)) == 1  # stopped after the refusal
    stored = await app.core.db.get_scene(1)
    assert stored.posted and all(line.message_id for line in stored.lines)
    # Users' own keycaps still count.
    line2 = next(line for line in stored.lines if not line.from_prompt)
    await react(app, fake, reaction_event("reaction_added", "one", line2.message_id))
    assert [r.votes for r in await app.core.db.best("slack", TEAM)] == [1]


async def test_http_mode_checks_signatures(tmp_path, tiny_model_dir):
    fake = await FakeSlack().start()
    app = await start_slack(
        tmp_path,
        tiny_model_dir,
        fake,
        slack_app_token=None,
        slack_signing_secret="s3cret",
        slack_port=0,
    )
    url = f"http://127.0.0.1:{app.port}/slack/events"
    try:
        async with aiohttp.ClientSession() as http:
            form = urlencode(slash_command(fake, "/scene", "Jerry: Hi, Newman."))
            kind = {"Content-Type": "application/x-www-form-urlencoded"}
            async with http.post(url, data=form, headers={**kind, **sign("wrong", form)}) as r:
                assert r.status == 401
            stale = sign("s3cret", form, int(time.time()) - 3600)  # a replayed request
            async with http.post(url, data=form, headers={**kind, **stale}) as r:
                assert r.status == 401
            assert not fake.find("chat.postMessage")

            async with http.post(url, data=form, headers={**kind, **sign("s3cret", form)}) as r:
                assert r.status == 200
                body = await r.text()
            await fake.wait_for(lambda: any("is ready" in r["text"] for r in fake.responses))
            said = ([json.loads(body)] if body else []) + fake.responses
            assert "#1 in the queue" in said[0]["text"]
            assert "Scene 1 is ready" in said[-1]["text"]

            ref = refs(fake)[0]
            body = json.dumps(reaction_event("reaction_added", "one", ref))
            jtype = {"Content-Type": "application/json"}
            for retry in ("", "1"):  # Slack retries with the same event_id
                headers = {**jtype, **sign("s3cret", body)}
                if retry:
                    headers |= {"X-Slack-Retry-Num": retry, "X-Slack-Retry-Reason": "timeout"}
                async with http.post(url, data=body, headers=headers) as r:
                    assert r.status == 200
            for _ in range(1000):
                if app.reactions_handled == 2:
                    break
                await asyncio.sleep(0.02)
            assert [r.votes for r in await app.core.db.best("slack", TEAM)] == [1]
    finally:
        await app.core.close()
        await app.close()
        await fake.close()


async def test_escape():
    assert escape("<!channel> & <@U1>\x07") == "&lt;!channel&gt; &amp; &lt;@U1&gt;"


async def test_discord_and_slack_share_one_core(tmp_path, tiny_model_dir):
    """Both frontends in one process: one engine, one database, one scene numbering, but
    settings, votes, /best and re-posts stay within their platform."""
    from discord_payloads import CHANNEL_ID, GUILD_ID, command_payload, install, invoke, option

    from bot.discord.bot import SitcomBot

    fake = await FakeSlack().start()
    slack = await start_slack(tmp_path, tiny_model_dir, fake)
    bot = SitcomBot(slack.config, slack.core)
    await bot.__aenter__()
    recorder = install(bot)
    bot.sync_on_setup = False
    await bot.setup_hook()
    try:
        assert bot.core is slack.core
        await command(fake, "/settings", "set max_new_tokens 20", user=ADMIN)
        assert (
            await slack.core.db.get_settings("discord", str(CHANNEL_ID))
        ).max_new_tokens == 200  # a Slack channel's settings are not a Discord channel's
        _, done = await scene(fake, "Jerry: From Slack.")
        await invoke(bot, command_payload("scene", [option("prompt", "George: From Discord.")]))
        assert "Scene 1 is ready" in done["text"]
        assert "Scene 2 is ready" in recorder.replies()[-1]["content"]
        one, two = await slack.core.db.get_scene(1), await slack.core.db.get_scene(2)
        assert one.place.platform == "slack" and two.place.platform == "discord"
        ack = await command(fake, "/scene", "#2")  # Discord's scene is not Slack's to post
        assert "no scene 2 in this channel" in ack["text"]
        await react(
            app=slack, fake=fake, body=reaction_event("reaction_added", "one", refs(fake)[0])
        )
        assert [r.scene_id for r in await slack.core.db.best("slack", TEAM)] == [1]
        assert await slack.core.db.best("discord", str(GUILD_ID)) == []
    finally:
        await slack.core.close()
        await bot.close()
        await slack.close()
        await fake.close()


async def test_run_connects_slack_and_stops_cleanly(tmp_path, tiny_model_dir, capsys):
    """`python -m bot`'s run(): Slack credentials → connect (token check, Socket Mode URL,
    websocket), serve, stop on request, close the database; a bad token → one line, 1."""
    from bot.__main__ import run

    fake = await FakeSlack().start()
    config = make_config(
        tmp_path, tiny_model_dir, slack_bot_token=BOT_TOKEN, slack_app_token=APP_TOKEN
    )
    stop = asyncio.Event()
    try:
        task = asyncio.create_task(
            run(
                config,
                loader=scripted_loader(),
                stop=stop,
                slack_client=make_client(BOT_TOKEN, fake.base_url),
            )
        )
        ack = await command(fake, "/settings", "show")
        assert "Scene settings" in ack["text"]
        assert [c.method for c in fake.calls[:2]] == ["auth.test", "apps.connections.open"]
        stop.set()
        assert await task == 0
        assert not (tmp_path / "bot.db-wal").exists()  # the database was closed

        fake.faults["auth.test"].append("invalid_auth")
        status = await run(
            config, loader=scripted_loader(), slack_client=make_client(BOT_TOKEN, fake.base_url)
        )
        assert status == 1
        err = capsys.readouterr().err
        assert "\nerror: Slack rejected the token" in err and "Traceback" not in err
    finally:
        await fake.close()


async def test_manifest_matches_what_the_app_handles():
    from importlib import resources

    import yaml

    from bot.slack.app import COMMANDS, EVENTS

    manifest = yaml.safe_load(resources.files("bot.slack").joinpath("manifest.yaml").read_text())
    assert tuple(c["command"] for c in manifest["features"]["slash_commands"]) == COMMANDS
    assert tuple(manifest["settings"]["event_subscriptions"]["bot_events"]) == EVENTS
    assert manifest["settings"]["socket_mode_enabled"] is True
    scopes = set(manifest["oauth_config"]["scopes"]["bot"])
    assert {"commands", "chat:write", "reactions:write", "reactions:read", "users:read"} <= scopes
    assert "chat:write.public" not in scopes  # the bot posts only where it was invited


async def test_long_scenes_split_within_slacks_limits():
    from bot.db import Place, StoredLine, StoredScene
    from bot.posting import plan
    from bot.slack.surface import SlackSurface

    lines = (
        ["ELAINE: Hi!"]
        + [f"JERRY: line {i} <!here>" for i in range(22)]
        + ["GEORGE: " + "a" * 2000] * 3
    )
    scene = StoredScene(
        5,
        Place("slack", TEAM, CHANNEL),
        [StoredLine(i, i, text, i == 1, None) for i, text in enumerate(lines, 1)],
    )
    messages = plan(scene, SlackSurface(client=None, channel=CHANNEL))
    assert [len(m.lines) for m in messages] == [11, 10, 4, 1]  # two 1500-char lines fit
    assert all(len(m.text) <= 3900 for m in messages)
    assert messages[0].text.split("\n")[1] == "💬 ELAINE: Hi!"
    assert messages[1].text.startswith("🎬 *Scene 5* (part 2)")
    assert messages[1].text.split("\n")[1] == ":one: JERRY: line 10 &lt;!here&gt;"
    assert messages[1].text.split("\n")[-1].startswith(":keycap_ten: ")


# -- issue 19: the Slack faults a strict stand-in for Slack shows --------------------------


async def test_socket_mode_disconnect_message_reconnects_and_self_reactions_are_ignored(slack):
    """Slack's `disconnect` message: the client connects again and commands still arrive;
    the bot's own keycaps come back as events, are acked and never count as votes."""
    app, fake = slack
    await fake.disconnect()
    assert fake.connections == 2
    assert "Scene settings" in (await command(fake, "/settings", "show"))["text"]
    await scene(fake, "Elaine: Jerry!")
    await fake.wait_for(lambda: fake.echoed and all(e in fake.acks for e in fake.echoed))
    assert len(fake.echoed) == len(fake.find("reactions.add"))
    assert app.reactions_handled == 0 and await app.core.db.best("slack", TEAM) == []


async def test_item10_ack_comes_first_though_users_info_is_rate_limited(slack):
    """users.info answers 429 with Retry-After 4: the ack must not wait for it (Slack gives
    up after 3 s); the change is saved and said through response_url."""
    app, fake = slack
    fake.faults["users.info"].append("429:4")
    payload = slash_command(fake, "/settings", "set temperature 1.3", user=ADMIN)
    ack = await fake.send_envelope(command_envelope(payload))  # fails the test after 3 s
    assert "text" not in ack
    (reply,) = await fake.wait_for(lambda: fake.replies(payload["response_url"]), timeout=30)
    assert reply["response_type"] == "in_channel" and "Saved." in reply["text"]
    assert (await app.core.db.get_settings("slack", CHANNEL)).temperature == 1.3
    assert [c.fault for c in fake.calls if c.method == "users.info"] == ["429:4", None]


async def test_item10_http_mode_acks_at_once_though_the_database_is_locked(
    tmp_path, tiny_model_dir
):
    """HTTP mode, a database locked by another process (a 4 s busy timeout): the HTTP
    answer comes at once; the refusal follows through response_url; nothing is saved."""
    fake = await FakeSlack().start()
    app = await start_slack(
        tmp_path,
        tiny_model_dir,
        fake,
        slack_app_token=None,
        slack_signing_secret="s3cret",
        slack_port=0,
        db_timeout_s=4.0,
    )
    url = f"http://127.0.0.1:{app.port}/slack/events"
    locker = sqlite3.connect(tmp_path / "bot.db", isolation_level=None)
    try:
        locker.execute("BEGIN IMMEDIATE")
        payload = slash_command(fake, "/settings", "set temperature 1.3", user=ADMIN)
        form = urlencode(payload)
        headers = {"Content-Type": "application/x-www-form-urlencoded", **sign("s3cret", form)}
        started = time.monotonic()
        async with aiohttp.ClientSession() as http, http.post(url, data=form, headers=headers) as r:
            assert r.status == 200 and time.monotonic() - started < 3
        (reply,) = await fake.wait_for(lambda: fake.replies(payload["response_url"]), timeout=30)
        assert "database is busy" in reply["text"] and reply["response_type"] == "ephemeral"
        locker.execute("ROLLBACK")
        stored = await app.core.db.get_settings("slack", CHANNEL)
        assert stored.temperature == SceneSettings().temperature
    finally:
        locker.close()
        await app.core.close()
        await app.close()
        await fake.close()


async def test_item11_used_up_or_expired_response_url_falls_back_to_post_ephemeral(slack, caplog):
    """Bolt's respond() returns a 404 without raising; the app checks it, sends the
    message with chat.postEphemeral instead and logs one line per fallback."""
    app, fake = slack
    caplog.set_level(logging.INFO, logger="bot.slack.app")
    payload = slash_command(fake, "/scene", "Elaine: Jerry!")
    fake.response_url_state(payload["response_url"]).uses = 5  # answered 5 times already

    def fell_back():
        return [
            r.getMessage()
            for r in caplog.records
            if r.name == "bot.slack.app" and "response_url" in r.getMessage()
        ]

    await fake.send_envelope(command_envelope(payload))
    await fake.wait_for(
        lambda: (
            any("is ready" in e["text"] for e in fake.find("chat.postEphemeral")) and not app.tasks
        ),
        timeout=30,
    )
    final = fake.find("chat.postEphemeral")[-1]
    assert (final["channel"], final["user"]) == (CHANNEL, USER)
    assert "Scene 1 is ready" in final["text"]
    assert {error for error, _ in fake.rejected_responses} == {"used_url"}
    assert len(fell_back()) == len(fake.find("chat.postEphemeral")) >= 1  # one line each
    assert "used_url" in fell_back()[-1] and "\n" not in fell_back()[-1]

    # 31 minutes in the queue: the response_url has expired.
    payload = slash_command(fake, "/settings", "show")
    fake.advance(31 * 60)
    await fake.send_envelope(command_envelope(payload))
    await fake.wait_for(
        lambda: "Scene settings" in fake.find("chat.postEphemeral")[-1]["text"] and not app.tasks,
        timeout=30,
    )  # one ephemeral message is there already
    assert fake.rejected_responses[-1][0] == "expired_url"
    assert "expired_url" in fell_back()[-1]

    # In a DM the bot is not part of, the fallback fails too: still one line, saying so.
    before = len(fell_back())
    payload = slash_command(fake, "/settings", "show", channel=DM)
    fake.response_url_state(payload["response_url"]).uses = 5
    await fake.send_envelope(command_envelope(payload))
    await fake.wait_for(lambda: len(fell_back()) > before and not app.tasks, timeout=30)
    (lost,) = fell_back()[before:]
    assert "lost" in lost and "channel_not_found" in lost and "\n" not in lost


async def test_item12_votes_arriving_out_of_order_keep_the_latest(slack):
    """A reaction_removed arrives before an older reaction_added that Slack redelivers (its
    first delivery was lost): the vote stays removed; only newer events change it."""
    app, fake = slack
    await scene(fake, "Elaine: Jerry! George!")
    ref = refs(fake)[0]
    t = time.time()

    async def tally():
        return [r.votes for r in await app.core.db.best("slack", TEAM)]

    added = reaction_event("reaction_added", "one", ref, event_ts=t)
    await fake.send_envelope(event_envelope(added), lost=True)
    await react(app, fake, reaction_event("reaction_removed", "one", ref, event_ts=t + 1))
    goal = app.reactions_handled + 1
    await fake.redeliver()  # the add of time t, after the removal of t + 1
    await handled(app, goal)
    assert await tally() == []

    await react(app, fake, reaction_event("reaction_added", "one", ref, event_ts=t + 2))
    assert await tally() == [1]
    # An old removal redelivered late does not undo the newer add.
    removed = reaction_event("reaction_removed", "one", ref, event_ts=t + 1.5)
    await react(app, fake, removed, retry=1)
    assert await tally() == [1]
    # Other users and lines keep their own order.
    await react(app, fake, reaction_event("reaction_added", "one", ref, user=ADMIN, event_ts=t))
    assert await tally() == [2]


async def test_item13_missing_users_read_scope_is_named(slack):
    app, fake = slack
    fake.scopes[BOT_TOKEN].discard("users:read")
    reply = await command(fake, "/settings", "set temperature 1.3", user=ADMIN)
    assert "`users:read`" in reply["text"] and "admin or owner" not in reply["text"]
    assert reply["response_type"] == "ephemeral"
    stored = await app.core.db.get_settings("slack", CHANNEL)
    assert stored.temperature == SceneSettings().temperature
    assert [c.fault for c in fake.calls if c.method == "users.info"] == ["missing_scope"]


async def test_item13_scene_in_a_dm_says_it_cannot_post_there(slack, caplog):
    """/scene in a DM between two people: Slack answers channel_not_found; inviting the
    bot is impossible there, so the reply says it can't post in this conversation."""
    app, fake = slack
    _, done = await scene(fake, "Elaine: Jerry!", channel=DM)
    assert "can't post in this conversation" in done["text"]
    assert "/invite" not in done["text"] and done["response_type"] == "ephemeral"
    assert not (await app.core.db.get_scene(1)).posted


async def test_item13_default_checkpoint_path_shows_only_its_name(slack):
    """DEFAULT_CHECKPOINT given as a directory path: chat shows its name, not the path."""
    app, fake = slack
    path = app.config.default_checkpoint
    name = Path(path).name
    _, done = await scene(fake, "Elaine: Jerry!")
    assert f", {name})." in done["text"] and path not in done["text"]
    listing = await command(fake, "/checkpoint", "list", user="U0LISTED")
    assert f"• {name}  ← active" in listing["text"] and path not in listing["text"]
    assert app.core.checkpoint == name
