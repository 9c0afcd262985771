"""Issue 8, bot side: hostile inputs and faults end in one polite line, nothing lost or leaked.

Real SQLite files, the real engine on the tiny model, discord.py's real CommandTree; the
network edge is a local HTTP server on 127.0.0.1 or the test Recorder.
"""

from __future__ import annotations

import asyncio
import io
import logging
import math
import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path

import pytest
from discord_payloads import CHANNEL_ID, command_payload, invoke, option
from helpers import SCRIPTED_BOT, make_config, scripted_loader, start_bot

from bot import checkpoints
from bot.config import Config, ConfigError
from bot.console import CommandError, Console
from bot.core import Core
from bot.db import Database, DatabaseError, Place, StoredLine, StoredScene, migrations
from bot.discord.cogs.scenes import DiscordSurface
from bot.discord.utils.formatting import neutralize
from bot.posting import plan
from sitcom.engine import EngineError, SceneEngine
from sitcom.settings import SceneSettings

ROOT = Path(__file__).resolve().parent.parent
SHORT = SceneSettings(max_new_tokens=16)
CONSOLE = Place("console", "0", "0")


def bot_env(tmp_path: Path, **extra: str) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_APP_TOKEN")
    }
    env.update(
        BOT_DB=str(tmp_path / "bot.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        **extra,
    )
    return env


def run_bot(
    stdin: bytes, tmp_path: Path, scripted: bool = False, **extra: str
) -> subprocess.CompletedProcess:
    command = ["-c", SCRIPTED_BOT.format(tests=str(ROOT / "tests"))] if scripted else ["-m", "bot"]
    return subprocess.run(
        [sys.executable, *command],
        input=stdin,
        capture_output=True,
        cwd=tmp_path,
        env=bot_env(tmp_path, **extra),
        timeout=240,
    )


def with_checkpoints(tmp_path: Path, model_dir: Path, *names: str) -> Config:
    for name in names:
        shutil.copytree(model_dir, tmp_path / "checkpoints" / name)
    return make_config(tmp_path, model_dir)


# -- 3. a swap reported failed is not applied ---------------------------------------------


@pytest.mark.asyncio
async def test_swap_with_a_locked_database_changes_nothing(tmp_path, tiny_model_dir):
    core = await Core.start(with_checkpoints(tmp_path, tiny_model_dir, "other"))
    before = core.checkpoint
    locker = sqlite3.connect(tmp_path / "bot.db")
    try:
        locker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(DatabaseError, match="busy"):
            await core.use_checkpoint("other")
        locker.rollback()
        # Neither the listing nor the engine moved; after a restart it is the same one.
        assert core.checkpoint == before
        assert f"{before}  ← active" in core.checkpoint_listing()
        assert core.engine.model_name == str(tiny_model_dir)
        job = await core.submit("JERRY: Hello.", SHORT, 1)
        assert (await job.result()).model_name == str(tiny_model_dir)
    finally:
        locker.close()
        await core.close()
    restarted = await Core.start(make_config(tmp_path, tiny_model_dir))
    try:
        assert restarted.checkpoint == before
    finally:
        await restarted.close()


# -- 4. scenes are recorded under the model that wrote them ----------------------------


@pytest.mark.asyncio
async def test_scene_is_recorded_under_the_model_that_wrote_it(tmp_path, tiny_model_dir):
    core = await Core.start(with_checkpoints(tmp_path, tiny_model_dir, "old", "new"))
    try:
        await core.use_checkpoint("old")
        scene = await (await core.submit("JERRY: Hello.", SHORT, 1)).result()
        await core.use_checkpoint("new")  # the swap lands before the scene is stored
        stored = await core.record(scene, place=CONSOLE, user_id=1, prompt="x")
        assert core.model_label(scene) == "old"

        # 16 queued scenes around a swap: each stored under the model that wrote it.
        jobs = [await core.submit("JERRY: Hello.", SHORT, user) for user in range(16)]
        swap = asyncio.ensure_future(core.use_checkpoint("old"))
        scenes = [await job.result() for job in jobs]
        await swap
        ids = [(await core.record(s, place=CONSOLE, user_id=1, prompt="x")).id for s in scenes]
    finally:
        await core.close()
    db = sqlite3.connect(tmp_path / "bot.db")
    assert db.execute("SELECT model_name FROM scenes WHERE id = ?", (stored.id,)).fetchone() == (
        "old",
    )
    names = {Path(s.model_name).name for s in scenes}
    assert names <= {"old", "new"}
    for scene_id, scene in zip(ids, scenes, strict=True):
        row = db.execute("SELECT model_name FROM scenes WHERE id = ?", (scene_id,)).fetchone()
        assert row == (Path(scene.model_name).name,)


# -- 5. a database from a newer version is refused, not written ------------------------


@pytest.mark.asyncio
async def test_database_from_a_newer_version_is_refused(tmp_path):
    path = tmp_path / "future.db"
    newest = migrations()[-1][0]
    db = sqlite3.connect(path)
    db.execute(f"PRAGMA user_version = {newest + 5}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(DatabaseError) as err:
        await Database.open(path)
    message = str(err.value)
    assert str(newest + 5) in message and str(newest) in message and "\n" not in message
    assert path.read_bytes() == before  # not even switched to WAL
    assert not Path(f"{path}-wal").exists()


# -- 7. /vote ids are parsed strictly -------------------------------------------------------


@pytest.mark.asyncio
async def test_vote_ids_are_parsed_strictly(tmp_path, tiny_model_dir):
    core = await Core.start(make_config(tmp_path, tiny_model_dir))
    console = Console(core, out=io.StringIO(), err=io.StringIO())
    try:
        for args in ("1 99999999999999999999999999", "\u00b2 1", "1 \u0661", "-1 2", "1 +2"):
            with pytest.raises(CommandError):
                await console.handle(f"/vote {args}")
    finally:
        await core.close()


# -- 8. odd Unicode is cleaned at the edge; no exception kills the console --------------


@pytest.mark.asyncio
async def test_lone_surrogate_prompt_is_cleaned_and_stored(tmp_path, tiny_model_dir):
    # scripted: a random model may write nothing beyond the opening (then nothing is stored)
    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    await core.db.save_settings(CONSOLE, "0", SHORT)
    out, err = io.StringIO(), io.StringIO()
    console = Console(core, out=out, err=err)
    try:
        rc = await console.run(io.StringIO("/scene JERRY: caf\udcff now\n/best\n"))
    finally:
        await core.close()
    assert rc == 0, err.getvalue()
    assert "Scene 1" in out.getvalue()
    db = sqlite3.connect(tmp_path / "bot.db")
    assert db.execute("SELECT prompt FROM scenes").fetchone() == ("JERRY: caf now",)


@pytest.mark.asyncio
async def test_a_bug_in_one_command_is_one_line_not_a_dead_console(
    tmp_path, tiny_model_dir, caplog
):
    core = await Core.start(make_config(tmp_path, tiny_model_dir))
    out, err = io.StringIO(), io.StringIO()
    console = Console(core, out=out, err=err)

    async def broken(_: str) -> None:
        raise KeyError("boom")

    console.best = broken
    try:
        rc = await console.run(io.StringIO("/best\n/settings show\n"))
    finally:
        await core.close()
    assert rc == 1
    assert err.getvalue().count("\n") == 1 and err.getvalue().startswith("error: ")
    assert "max_new_tokens" in out.getvalue()  # the next command still ran
    assert any(r.exc_info for r in caplog.records)  # the traceback went to the log


@pytest.mark.e2e
def test_undecodable_stdin_bytes_do_not_hang_or_kill_the_console(tmp_path, tiny_model_dir):
    proc = run_bot(
        b"/settings set max_new_tokens 16\n/scene JERRY: caf\xff\xfe now\n/best\n",
        tmp_path,
        scripted=True,
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
    )
    err = proc.stderr.decode(errors="replace")
    assert proc.returncode == 0, err
    assert "Traceback" not in err and b"Scene 1" in proc.stdout
    stored = sqlite3.connect(tmp_path / "bot.db").execute("SELECT prompt FROM scenes").fetchone()
    assert stored[0].startswith("JERRY: caf") and stored[0].endswith(" now")


@pytest.mark.asyncio
async def test_discord_scene_with_a_lone_surrogate_is_posted_and_stored(tmp_path, tiny_model_dir):
    bot, rec = await start_bot(make_config(tmp_path, tiny_model_dir))
    try:
        await bot.core.db.save_settings(Place("discord", "1", str(CHANNEL_ID)), "1", SHORT)
        await invoke(
            bot,
            command_payload(
                "scene",
                [option("prompt", "JERRY: [free nitro](https://example.invalid/x) \ud800!")],
            ),
        )
        assert "Scene 1 is ready" in rec.replies()[-1]["content"]
        posted = "\n".join(c.json["content"] for c in rec.find("POST", "/messages"))
        assert "](" not in posted  # the masked link is neutralised in the bot's own message
    finally:
        await bot.close()
    prompt = sqlite3.connect(tmp_path / "bot.db").execute("SELECT prompt FROM scenes").fetchone()
    assert prompt == ("JERRY: [free nitro](https://example.invalid/x) !",)


# -- 9. model cache on an unwritable disk: a start-up error naming the directory --------


@pytest.mark.e2e
def test_unwritable_model_cache_is_one_line_naming_it(tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the cache directory should be")
    cache = blocker / "sitcom"
    proc = run_bot(b"/help\n", tmp_path, SITCOM_CACHE=str(cache), DEFAULT_CHECKPOINT="smollm2")
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    assert err.startswith("error: ") and str(cache) in err and "SITCOM_CACHE" in err


# -- 10. non-finite and non-integral numbers are rejected -------------------------------


@pytest.mark.parametrize("name", ["GENERATION_TIMEOUT_S", "DB_TIMEOUT_S", "QUEUE_SIZE"])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "NaN"])
def test_non_finite_environment_numbers_are_rejected(name, value):
    with pytest.raises(ConfigError, match=name):
        Config.from_env({name: value}, dotenv=False)


def test_settings_reject_non_integral_and_non_finite_values():
    with pytest.raises(ValueError, match="max_new_tokens"):
        SceneSettings().with_changes(max_new_tokens=400.9)
    with pytest.raises(ValueError, match="top_k"):
        SceneSettings().with_changes(top_k=7.5)
    for bad in (math.nan, math.inf):
        with pytest.raises(ValueError):
            SceneSettings().with_changes(temperature=bad)
    assert SceneSettings().with_changes(max_new_tokens=400.0).max_new_tokens == 400


# -- 12. an expected rejection is one log line, not a traceback at ERROR ---------------


@pytest.mark.asyncio
async def test_too_long_prompt_logs_one_line_without_traceback(tiny_model_dir, caplog):
    engine = SceneEngine(model=str(tiny_model_dir), max_prompt_chars=1000)
    await engine.start()
    try:
        caplog.clear()
        with caplog.at_level(logging.INFO):
            job = await engine.submit("JERRY: " + "\u6f22" * 990, SHORT)
            with pytest.raises(EngineError, match="too long"):
                await job.result()
    finally:
        await engine.close()
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]
    assert len([r for r in caplog.records if "too long" in r.getMessage()]) == 1


# -- 13. bad token, Discord 5xx at login: one line ---------------------------------------


@pytest.mark.parametrize("token", ["abc\x07def", "abc def", "abc\r\nX-Evil: 1"])
def test_token_with_control_characters_is_a_config_error(token):
    with pytest.raises(ConfigError, match="DISCORD_TOKEN"):
        Config.from_env({"DISCORD_TOKEN": token}, dotenv=False)


@pytest.mark.asyncio
async def test_discord_5xx_at_login_is_one_line(tmp_path, tiny_model_dir, monkeypatch, capsys):
    from aiohttp import web
    from discord.http import Route

    from bot.__main__ import run

    async def unavailable(request: web.Request) -> web.Response:
        return web.json_response({"message": "upstream down", "code": 0}, status=503)

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", unavailable)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    monkeypatch.setattr(Route, "BASE", f"http://127.0.0.1:{port}/api/v10")
    try:
        config = make_config(tmp_path, tiny_model_dir, token="x.y.z")
        assert await run(config) == 1
    finally:
        await runner.cleanup()
    err = capsys.readouterr().err  # (the model now loads first: its progress bar is there)
    errors = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and "503" in errors[0] and "Traceback" not in err, err


# -- 14. no token and stdin at EOF: say so --------------------------------------------


@pytest.mark.e2e
def test_console_at_eof_says_how_to_start_the_real_bots(tmp_path, tiny_model_dir):
    proc = run_bot(b"", tmp_path, DEFAULT_CHECKPOINT=str(tiny_model_dir))
    err = proc.stderr.decode()
    assert proc.returncode == 1
    assert "console" in err and "DISCORD_TOKEN" in err and "SLACK" in err
    assert "Traceback" not in err


# -- 15. masked links and impersonating markdown ----------------------------------------


@pytest.mark.parametrize(
    "text",
    [
        "JERRY: [free nitro](https://example.invalid/claim)",
        "JERRY: [free nitro](<https://example.invalid/claim>)",
        "JERRY: [a] [b](http://x.invalid)",
    ],
)
def test_masked_links_are_neutralised(text):
    from bot.markup import neutralize_markdown

    shown = neutralize(text)
    assert "](" not in shown and shown.replace("\u200b", "") == text  # nothing else changed
    assert neutralize_markdown(text) != text


@pytest.mark.parametrize(
    "line",
    [
        "# Official announcement",
        "## Staff",
        "### x",
        "-# system",
        "  # indented",
        "> # quoted header",
    ],
)
def test_headers_and_subtext_cannot_impersonate(line):
    shown = neutralize(line)
    for start in ("#", "-#", "> #"):
        assert not shown.lstrip().startswith(start), shown


def test_scene_lines_keep_their_plain_text():
    lines = ["[Scene: Monk's Cafe]", "JERRY: (to Elaine) What? #1 fan!", "ELAINE: Get out!"]
    scene = StoredScene(
        1, CONSOLE, [StoredLine(i, i, t, False, None) for i, t in enumerate(lines, 1)]
    )
    (message,) = plan(scene, DiscordSurface(channel=None))
    content, count = message.text, len(message.lines)
    assert count == 3
    for line in lines:
        assert line in content


# -- 16. .env from the working directory only -----------------------------------------


@pytest.mark.e2e
def test_dotenv_is_read_from_the_working_directory_only(tmp_path):
    app = tmp_path / "a" / "b" / "app"
    for package in ("bot", "sitcom"):
        shutil.copytree(
            ROOT / package,
            app / package,
            ignore=shutil.ignore_patterns("__pycache__", "seinfeld_lora"),
        )
    (tmp_path / "a" / ".env").write_text("BOT_DB=/tmp/planted.db\nADMIN_USER_IDS=666\n")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    # A script file, as `python -m bot` is: python-dotenv's search starts from the caller's
    # file for those, and from the working directory only for `python -c` and REPLs.
    (cwd / "probe.py").write_text(
        "from bot.config import Config\nc = Config.from_env()\n"
        "print(c.db_path, sorted(c.admin_user_ids))\n"
    )
    env = {
        k: v
        for k, v in os.environ.items()
        if k not in ("BOT_DB", "ADMIN_USER_IDS", "DISCORD_TOKEN")
    }
    env["PYTHONPATH"] = str(app)

    def run() -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, "probe.py"],
            cwd=cwd,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )

    first = run()
    assert first.returncode == 0, first.stderr
    assert first.stdout.split() == ["sitcom.db", "[]"]
    (cwd / ".env").write_text("BOT_DB=here.db\n")
    assert run().stdout.split()[0] == "here.db"


# -- 17. symlinks out of CHECKPOINTS_DIR ---------------------------------------------------


def test_symlink_out_of_the_checkpoints_dir_is_refused(tmp_path, tiny_model_dir):
    outside = tmp_path / "outside" / "secret-model"
    shutil.copytree(tiny_model_dir, outside)
    ckpts = tmp_path / "checkpoints"
    shutil.copytree(tiny_model_dir, ckpts / "real")
    (ckpts / "evil").symlink_to(outside, target_is_directory=True)
    (ckpts / "alias").symlink_to(ckpts / "real", target_is_directory=True)  # inside: fine
    assert checkpoints.available(ckpts) == [*checkpoints.BUILT_IN, "alias", "real"]
    with pytest.raises(checkpoints.CheckpointError) as err:
        checkpoints.resolve("evil", ckpts)
    assert "outside" not in str(err.value)
    assert checkpoints.resolve("real", ckpts) == str((ckpts / "real").resolve())
