"""Issue 20, the bot's settings, commands and storage: hostile values end in one clear line
(or a usage reply), never a traceback, a silent clamp or a leaked path.

Real SQLite files, the real engine on the tiny model, the real slack-bolt app behind
aiohttp; Slack itself is tests/slack_fake.py on 127.0.0.1.
"""

from __future__ import annotations

import io
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlencode

import aiohttp
import pytest
from discord_payloads import EPHEMERAL, command_payload, invoke, option
from helpers import command, make_config, refs, scripted_loader, sign, start_bot, start_slack
from slack_fake import ADMIN, USER, FakeSlack, slash_command

from bot.commands import UsageError, parse_settings, repost_id
from bot.config import LIMITS, Config, ConfigError
from bot.console import Console
from bot.core import Core
from bot.db import Database, DatabaseError, Place
from bot.discord.utils.formatting import neutralize
from bot.slack.app import SlackFrontend
from bot.slack.surface import make_client
from sitcom.engine import SceneEngine
from sitcom.jobs import clean_prompt
from sitcom.scenes.script import normalize_prompt
from sitcom.settings import SceneSettings

ROOT = Path(__file__).resolve().parent.parent
SHORT = SceneSettings(max_new_tokens=16)
CONSOLE = Place("console", "0", "0")


def bot_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("DISCORD_", "SLACK_", "SITCOM_THREADS", "DEV_GUILD"))
    }
    env.update(
        {
            "BOT_DB": str(tmp_path / "bot.db"),
            "LOG_LEVEL": "WARNING",
            "CHECKPOINTS_DIR": str(tmp_path / "checkpoints"),
            "PYTHONPATH": str(ROOT),
            **extra,
        }
    )
    return env


def run_bot(
    tmp_path: Path, cwd: Path | None = None, prefix: tuple[str, ...] = (), **extra: str
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [*prefix, sys.executable, "-m", "bot"],
        input=b"",
        capture_output=True,
        cwd=cwd or tmp_path,
        env=bot_env(tmp_path, **extra),
        timeout=240,
    )


def one_line_error(proc: subprocess.CompletedProcess) -> str:
    err = proc.stderr.decode(errors="replace")
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: "), err
    return err.strip()


# -- 10. SITCOM_THREADS against the machine's cores -----------------------------------------


@pytest.mark.parametrize("value", ["100000", "512", "-3", "0", "1.5", "\u00b2"])
def test_thread_count_is_checked_against_the_cores_at_start(tmp_path, value):
    cores = len(os.sched_getaffinity(0))
    with pytest.raises(ConfigError) as err:
        Config.from_env({"SITCOM_THREADS": value}, dotenv=False)
    assert f"from 1 to {cores}" in str(err.value) and "\n" not in str(err.value)
    assert Config.from_env({"SITCOM_THREADS": str(cores)}, dotenv=False)
    assert Config.from_env({"SITCOM_THREADS": "auto"}, dotenv=False)


def test_thread_count_out_of_range_stops_the_bot_in_one_line(tmp_path):
    proc = run_bot(tmp_path, SITCOM_THREADS="-3", DEFAULT_CHECKPOINT="smollm2")
    assert proc.returncode == 2
    assert "SITCOM_THREADS must be auto or a whole number from 1 to" in one_line_error(proc)


# -- 11. .env that is not UTF-8; DEV_GUILD_ID=² ---------------------------------------------


def test_dotenv_that_is_not_utf8_is_one_line(tmp_path):
    (tmp_path / ".env").write_bytes(b"BOT_DB=caf\xe9.db\nQUEUE_SIZE=4\n")  # Latin-1
    proc = run_bot(tmp_path, DEFAULT_CHECKPOINT="smollm2")
    assert proc.returncode == 2
    err = one_line_error(proc)
    assert ".env is not UTF-8" in err and "0xe9" in err


@pytest.mark.parametrize("value", ["\u00b2", "\u0661\u0662", "\uff11", "12 34", "-5"])
def test_dev_guild_id_takes_ascii_digits_only(value):
    with pytest.raises(ConfigError, match="DEV_GUILD_ID"):
        Config.from_env({"DEV_GUILD_ID": value}, dotenv=False)
    assert (
        Config.from_env({"DEV_GUILD_ID": "123456789012345678"}, dotenv=False).dev_guild_id
        == 123456789012345678
    )


def test_dev_guild_id_superscript_stops_the_bot_in_one_line(tmp_path):
    proc = run_bot(tmp_path, DEV_GUILD_ID="\u00b2", DEFAULT_CHECKPOINT="smollm2")
    assert proc.returncode == 2 and "DEV_GUILD_ID" in one_line_error(proc)


# -- 12. documented maxima for the limits ------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("GENERATION_TIMEOUT_S", "1e308"),
        ("SHUTDOWN_TIMEOUT_S", "1e308"),
        ("DB_TIMEOUT_S", "1e10"),
        ("QUEUE_SIZE", "1000000000"),
        ("PER_USER_LIMIT", "99999"),
        ("SLACK_PORT", "70000"),
        ("GENERATION_TIMEOUT_S", "3601"),
        ("QUEUE_SIZE", "\u0663"),
        ("QUEUE_SIZE", "1_0"),
        ("DB_TIMEOUT_S", "\u0665"),
        ("SHUTDOWN_TIMEOUT_S", "1e99999"),
    ],
)
def test_limits_have_a_maximum(name, value):
    low, high = LIMITS[name]
    with pytest.raises(ConfigError) as err:
        Config.from_env({name: value}, dotenv=False)
    assert name in str(err.value) and f"to {high:g}" in str(err.value)


def test_maxima_are_accepted_and_documented():
    env = {name: str(int(high)) for name, (_, high) in LIMITS.items()}
    config = Config.from_env(env, dotenv=False)
    assert (config.timeout_s, config.shutdown_timeout_s, config.db_timeout_s) == (3600, 600, 60)
    example = (ROOT / ".env.example").read_text()
    for name in LIMITS:
        assert f"{name}=" in example
    for text in ("1-1000", "1-100", "1-3600", "0-600", "0-60", "1-65535"):
        assert text in example


# -- 13. Slack HTTP mode: SLACK_HOST, and unsigned junk ---------------------------------------


def test_slack_host_defaults_to_loopback():
    base = {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "s"}
    assert Config.from_env(base, dotenv=False).slack_host == "127.0.0.1"
    assert Config.from_env({**base, "SLACK_HOST": "0.0.0.0"}, dotenv=False).slack_host == "0.0.0.0"
    assert Config.from_env({**base, "SLACK_HOST": "::1"}, dotenv=False).slack_host == "::1"
    assert (
        Config.from_env({**base, "SLACK_HOST": "bot.internal"}, dotenv=False).slack_host
        == "bot.internal"
    )
    for bad in ("http://0.0.0.0", "a b", "host:3000", "-x"):
        with pytest.raises(ConfigError, match="SLACK_HOST"):
            Config.from_env({**base, "SLACK_HOST": bad}, dotenv=False)


@pytest.mark.asyncio
async def test_http_mode_listens_on_loopback_and_answers_junk_in_one_info_line(
    tmp_path, tiny_model_dir, caplog
):
    fake = await FakeSlack().start()
    config = make_config(
        tmp_path,
        tiny_model_dir,
        slack_bot_token="xoxb-test",
        slack_app_token=None,
        slack_signing_secret="s3cret",
        slack_port=0,
    )
    core = await Core.start(config, loader=scripted_loader())
    # No host argument: the frontend takes SLACK_HOST's default from the config.
    app = SlackFrontend(config, core, client=make_client("xoxb-test", fake.base_url))
    await app.start()
    try:
        assert app._runner.addresses[0][0] == "127.0.0.1"
        url = f"http://127.0.0.1:{app.port}/slack/events"
        form = urlencode(slash_command(fake, "/scene", "Jerry: Hi."))
        kind = {"Content-Type": "application/x-www-form-urlencoded"}
        caplog.clear()
        caplog.set_level(logging.DEBUG)
        async with aiohttp.ClientSession() as http:
            for ts in ("abc", "1e99", "", "\u0661\u0662", "99999999999999999999999"):
                headers = {**kind, "X-Slack-Request-Timestamp": ts, "X-Slack-Signature": "v0=0"}
                async with http.post(url, data=form, headers=headers) as r:
                    assert r.status in (400, 401), (ts, r.status)
            junk = b"text=\xff\xfe\xfa&command=%2Fscene"
            async with http.post(url, data=junk, headers={**kind, **sign("x", "")}) as r:
                assert r.status in (400, 401)
            async with http.post(
                url,
                data=junk,
                headers={**kind, "X-Slack-Signature": "v0=0", "X-Slack-Request-Timestamp": "1"},
            ) as r:
                assert r.status in (400, 401)
        assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
        # One line per request, from any logger (aiohttp's access log included).
        refused = [r for r in caplog.records if r.levelno >= logging.INFO]
        assert len(refused) == 7, [(r.name, r.getMessage()) for r in refused]
        assert all("\n" not in r.getMessage() and "refused" in r.getMessage() for r in refused)
        assert not fake.find("chat.postMessage")
        caplog.clear()  # requests that pass the screen still get aiohttp's access line
        async with aiohttp.ClientSession() as http:
            elsewhere = f"http://127.0.0.1:{app.port}/slack/other"
            async with http.post(
                elsewhere, data=form, headers={**kind, **sign("s3cret", form)}
            ) as r:
                assert r.status == 404
        assert [r.name for r in caplog.records if r.levelno >= logging.INFO] == ["aiohttp.access"]
    finally:
        await core.close()
        await app.close()
        await fake.close()


# -- 14. a checkpoint given as a path shows a name --------------------------------------------


@pytest.mark.asyncio
async def test_default_checkpoint_path_is_shown_as_a_name(tmp_path, tiny_model_dir):
    secret = tmp_path / "srv-private-x9" / "my-model"
    shutil.copytree(tiny_model_dir, secret)
    fake = await FakeSlack().start()
    app = await start_slack(tmp_path, secret, fake, admin_user_ids=frozenset({USER}))
    try:
        assert app.core.checkpoint == "my-model"
        await command(fake, "/settings", "set max_new_tokens 16", user=ADMIN)
        listing = await command(fake, "/checkpoint", "list")
        assert "my-model" in listing["text"] and "srv-private-x9" not in listing["text"]
        before = len(fake.responses)
        await command(fake, "/scene", "Jerry: Hi, Newman.")
        await fake.wait_for(
            lambda: any("is ready" in r.get("text", "") for r in fake.responses[before:])
        )
        done = fake.responses[-1]["text"]
        assert "Scene 1 is ready" in done and "my-model" in done, done
        assert "srv-private-x9" not in done and str(tmp_path) not in done
        posted = " ".join(c.get("text", "") for c in fake.find("chat.postMessage"))
        assert "srv-private-x9" not in posted and refs(fake)
    finally:
        await app.core.close()
        await app.close()
        await fake.close()
    db = sqlite3.connect(tmp_path / "bot.db")
    assert db.execute("SELECT model_name FROM scenes").fetchall() == [("my-model",)]


# -- 15. /scene #ID strictly ------------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt",
    ["#\uff12", "#\u0662", "#-1", "# 2", "#2 extra", "#9999999999", "#0", "#", "#+2", "#2.0"],
)
def test_repost_id_is_strict(prompt):
    with pytest.raises(UsageError, match="#ID"):
        repost_id(prompt)


def test_repost_id_and_prompts():
    assert repost_id(" #12 ") == 12 and repost_id("#999999999") == 999_999_999
    assert repost_id("Jerry: #1 fan!") is None


@pytest.mark.asyncio
@pytest.mark.parametrize("prompt", ["#\uff12", "#2 extra", "#9999999999"])
async def test_scene_with_a_bad_id_gets_the_usage_not_a_new_scene(tmp_path, tiny_model_dir, prompt):
    fake = await FakeSlack().start()
    app = await start_slack(tmp_path, tiny_model_dir, fake)
    try:
        ack = await command(fake, "/scene", prompt)
        assert "Usage" in ack["text"] and "#ID" in ack["text"], ack
        assert app.core.engine.queued == 0 and app.core.engine.running == 0
        assert await app.core.db.get_scene(1) is None
        assert not fake.find("chat.postMessage")
    finally:
        await app.core.close()
        await app.close()
        await fake.close()


@pytest.mark.asyncio
async def test_discord_scene_with_a_fullwidth_id_gets_the_usage(tmp_path, tiny_model_dir):
    bot, rec = await start_bot(make_config(tmp_path, tiny_model_dir))
    try:
        await invoke(bot, command_payload("scene", [option("prompt", "#\uff12")]))
        reply = rec.replies()[-1]
        assert "Usage" in reply["content"] and reply["flags"] & EPHEMERAL
        assert not rec.find("POST", "/channels/")
        assert await bot.core.db.get_scene(1) is None
    finally:
        await bot.close()


# -- 16. /settings: ASCII decimals, no duplicates ---------------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "set max_new_tokens \u0663\u0660\u0660",
        "set top_k 1_0",
        "set top_k \uff15",
        "set temperature 1e0",
        "set top_k 5 top_k 50",
        "set top_k=5 top_k=6",
        "set temperature nan",
        "set top_k 0x10",
    ],
)
def test_settings_values_are_ascii_decimals_given_once(text):
    with pytest.raises(UsageError):
        parse_settings(text)


def test_settings_decimals_still_parse():
    assert parse_settings("set top_k 5 temperature 0.9 top_p .5") == (
        "set",
        {"top_k": 5.0, "temperature": 0.9, "top_p": 0.5},
    )


# -- 17. damaged and read-only databases ------------------------------------------------------


async def _database_with_scenes(path: Path, scenes: int = 40) -> None:
    db = await Database.open(path)
    for n in range(scenes):
        await db.add_scene(
            place=CONSOLE,
            user_id="1",
            prompt=f"JERRY: {n}" * 20,
            model_name="m",
            lines=[f"JERRY: line {n} " * 10] * 5,
            prompt_lines=1,
            new_tokens=1,
            seconds=0.1,
        )
    await db.close()


def _overwrite_a_page(path: Path) -> None:
    con = sqlite3.connect(path)
    con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    con.execute("PRAGMA journal_mode = DELETE")
    page = con.execute("PRAGMA page_size").fetchone()[0]
    root = con.execute("SELECT rootpage FROM sqlite_master WHERE name = 'lines'").fetchone()[0]
    pages = con.execute("PRAGMA page_count").fetchone()[0]
    con.close()
    target = max(root, pages - 2)  # a page holding scene lines, not the header
    with open(path, "r+b") as f:
        f.seek((target - 1) * page)
        f.write(bytes([0x0D]) + os.urandom(page - 1))


@pytest.mark.asyncio
async def test_damaged_database_is_refused_at_start(tmp_path):
    path = tmp_path / "bot.db"
    await _database_with_scenes(path)
    _overwrite_a_page(path)
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as err:
        await Database.open(path)
    message = str(err.value)
    assert "damaged" in message and "quick_check" in message and "\n" not in message
    assert path.read_bytes() == before


def test_damaged_database_stops_the_bot_in_one_line(tmp_path):
    import asyncio

    asyncio.run(_database_with_scenes(tmp_path / "bot.db"))
    _overwrite_a_page(tmp_path / "bot.db")
    proc = run_bot(tmp_path, DEFAULT_CHECKPOINT="smollm2")
    assert proc.returncode == 1
    assert "damaged" in one_line_error(proc)


def _read_only_mount() -> tuple[str, ...]:
    """A command prefix that runs the rest with tmp dirs bind-mounted read-only (needs
    mount namespaces, as root in CI has); skips where that is not allowed."""
    if shutil.which("unshare") is None:
        pytest.skip("no unshare(1)")
    probe = subprocess.run(["unshare", "-m", "true"], capture_output=True)
    if probe.returncode != 0:
        pytest.skip("mount namespaces not allowed here")
    return (
        "unshare",
        "-m",
        "sh",
        "-c",
        'mount --bind "$RO" "$RO" && mount -o remount,bind,ro "$RO" && exec "$@"',
        "sh",
    )


@pytest.mark.parametrize("existing", [True, False])
def test_database_on_a_read_only_filesystem_says_so(tmp_path, existing):
    prefix = _read_only_mount()
    ro = tmp_path / "ro"
    ro.mkdir()
    if existing:
        import asyncio

        asyncio.run(_database_with_scenes(ro / "bot.db", scenes=1))
    proc = run_bot(
        tmp_path, prefix=prefix, RO=str(ro), BOT_DB=str(ro / "bot.db"), DEFAULT_CHECKPOINT="smollm2"
    )
    assert proc.returncode == 1
    assert "read-only filesystem" in one_line_error(proc)


# -- 19. Unicode line separators in a prompt ---------------------------------------------------


@pytest.mark.parametrize("sep", ["\u2028", "\u2029", "\r", "\x85", "\x0b", "\x0c", "\x1e"])
def test_unicode_line_separators_are_line_breaks(sep):
    prompt = f"elaine: Jerry!{sep}george: What?"
    assert clean_prompt(prompt, 1000) == "elaine: Jerry!\ngeorge: What?"
    assert normalize_prompt(prompt) == "ELAINE: Jerry!\nGEORGE: What?\n"


@pytest.mark.asyncio
async def test_a_prompt_with_u2028_opens_the_scene_with_both_speakers(tmp_path, tiny_model_dir):
    engine = SceneEngine(model=str(tiny_model_dir), timeout_s=60)
    await engine.start()
    try:
        job = await engine.submit(
            "elaine: Jerry!\u2028george: What?\u2029kramer: Hey!", SHORT, user_id="1"
        )
        scene = await job.result()
    finally:
        await engine.close()
    assert "\u2028" not in job.prompt and "\u2029" not in job.prompt
    assert scene.lines[:3] == ["ELAINE: Jerry!", "GEORGE: What?", "KRAMER: Hey!"]


@pytest.mark.asyncio
async def test_console_stores_the_u2029_prompt_as_lines(tmp_path, tiny_model_dir):
    # scripted: a random model may write nothing beyond the opening (then nothing is stored)
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    await core.db.save_settings(CONSOLE, "0", SHORT)
    out, err = io.StringIO(), io.StringIO()
    try:
        rc = await Console(core, out=out, err=err).run(
            io.StringIO("/scene jerry: Hi.\u2029newman: Hello, Jerry.\n")
        )
    finally:
        await core.close()
    assert rc == 0, err.getvalue()
    db = sqlite3.connect(tmp_path / "bot.db")
    assert db.execute(
        "SELECT text FROM lines WHERE from_prompt = 1 ORDER BY line_no"
    ).fetchall() == [("JERRY: Hi.",), ("NEWMAN: Hello, Jerry.",)]


# -- 20. markdown Discord renders: headings and subtext in lists and quotes, odd spaces --------


@pytest.mark.parametrize(
    "line",
    [
        "1. # heading",
        "10. ## big",
        "2) ### x",
        "- 1. # nested",
        "* # star",
        "+ -# sub",
        "> - # quoted list",
        ">>> # quote all",
        "#\u00a0x",
        "##\u2003x",
        "-#\u00a0small",
        "\u3000# ideographic space",
        "1.\u00a0# nbsp after the number",
    ],
)
def test_headings_in_lists_and_after_odd_spaces_are_neutralised(line):
    shown = neutralize(line)
    assert shown.replace("\u200b", "") == line  # nothing visible changed
    stripped = shown.lstrip("".join(c for c in shown if c.isspace()) + ">-*+0123456789.)")
    assert stripped.startswith("\u200b"), repr(shown)


@pytest.mark.parametrize(
    "text", ["JERRY: hi\u2028# Official", "JERRY: hi\u2029## Staff", "JERRY: hi\u2029-# grey"]
)
def test_headings_after_unicode_line_breaks_are_neutralised(text):
    shown = neutralize(text)
    assert "\u200b" in shown and shown.replace("\u200b", "") == text


@pytest.mark.parametrize(
    "line", ["JERRY: #1 fan!", "#hashtag", "#### four", "1.# x", "GEORGE: 1. # not at the start"]
)
def test_plain_text_with_hashes_is_left_alone(line):
    assert neutralize(line) == line


def test_config_defaults_are_the_dataclass_fields():
    """No variable set: every setting is the dataclass default (written once, in Config)."""
    from dataclasses import replace

    from_env = Config.from_env({}, dotenv=False)
    assert from_env == replace(
        Config(),
        db_path=Config().db_path.expanduser(),
        checkpoints_dir=Config().checkpoints_dir.expanduser(),
    )
    assert from_env.humour_model == "humour" and from_env.slack_port == 3000
