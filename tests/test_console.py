"""`python -m bot` without DISCORD_TOKEN: the local console, run as a real subprocess."""

from __future__ import annotations

import io
import os
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import SCRIPTED_BOT, make_config, scripted_loader

ROOT = Path(__file__).resolve().parent.parent


def run_bot(stdin: str, tmp_path: Path, model: Path | str, scripted: bool = False, **env: str):
    full = {
        k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN" and not k.startswith("SLACK_")
    }
    full.update(
        DEFAULT_CHECKPOINT=str(model),
        BOT_DB=str(tmp_path / "console.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        SITCOM_CACHE=str(tmp_path / "cache"),
        **env,
    )
    command = ["-c", SCRIPTED_BOT.format(tests=str(ROOT / "tests"))] if scripted else ["-m", "bot"]
    return subprocess.run(
        [sys.executable, *command],
        input=stdin,
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=full,
        timeout=240,
    )


@pytest.mark.e2e
def test_console_writes_a_scene_votes_and_keeps_settings(tmp_path, tiny_model_dir):
    env = {"PYTHONPATH": str(ROOT)}
    first = run_bot(
        "/settings set max_new_tokens 16\n/scene Elaine: Jerry! George! You guys, listen!\n/best\n",
        tmp_path,
        tiny_model_dir,
        scripted=True,
        **env,
    )
    assert first.returncode == 0, first.stderr
    out = first.stdout
    # The user's own line is shown but not numbered for voting.
    assert "Scene 1" in out and "you. ELAINE: Jerry! George! You guys, listen!" in out
    assert "No votes yet" in out

    # Bad input: one clear line each, no traceback, exit status 1; settings survived.
    second = run_bot(
        "/settings show\n/scene\n/scene \x00\x07\n/settings set temperature 9\n"
        "/settings set top_k lots\n/vote 1 99\n/checkpoint use ../x\n/checkpoint use /etc\n"
        "/frobnicate\n/vote 1 1\n",
        tmp_path,
        tiny_model_dir,
        **env,
    )
    assert second.returncode == 1
    assert "`max_new_tokens` = 16" in second.stdout
    errors = [e for e in second.stderr.splitlines() if e.startswith("error: ")]
    assert len(errors) == 9, second.stderr
    assert "line 1 is your own opening" in second.stderr
    assert "Traceback" not in second.stderr
    assert "temperature must be between 0.1 and 2" in second.stderr
    assert "scene 1 has no line 99" in second.stderr


@pytest.mark.e2e
def test_console_startup_errors_are_one_line(tmp_path, tiny_model_dir):
    env = {"PYTHONPATH": str(ROOT)}
    bad_model = run_bot("", tmp_path, tmp_path / "missing-model", **env)
    assert bad_model.returncode == 1
    assert bad_model.stderr.strip().startswith("error:") and "Traceback" not in bad_model.stderr
    bad_config = run_bot("", tmp_path, "smollm2", QUEUE_SIZE="lots", **env)
    assert bad_config.returncode == 2
    assert bad_config.stderr.strip() == (
        "error: QUEUE_SIZE must be a whole number from 1 to 1000 (got 'lots')"
    )
    bad_threads = run_bot("", tmp_path, tiny_model_dir, SITCOM_THREADS="lots", **env)
    assert bad_threads.returncode == 2  # a configuration error, found before the model loads
    assert bad_threads.stderr.strip().startswith(
        "error: SITCOM_THREADS must be auto or a whole number from 1 to "
    )


@pytest.mark.e2e
def test_sigterm_stops_cleanly_and_closes_the_database(tmp_path, tiny_model_dir):
    import signal
    import sqlite3

    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        BOT_DB=str(tmp_path / "console.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
    )
    bot = subprocess.Popen(
        [sys.executable, "-m", "bot"],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        bot.stdin.write("/settings set top_k 7\n")
        bot.stdin.flush()
        assert "Saved" in bot.stdout.readline()  # started, and the command went through
        bot.send_signal(signal.SIGTERM)
        bot.wait(timeout=60)  # not communicate(): it closes stdin, and EOF also ends the bot
        err = bot.stderr.read()
    finally:
        bot.kill()
    assert bot.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    db = sqlite3.connect(tmp_path / "console.db")
    assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    assert db.execute("SELECT top_k FROM channel_settings").fetchone() == (7,)


@pytest.mark.asyncio
async def test_console_votes_for_what_the_model_wrote(tmp_path, tiny_model_dir):
    from bot.console import Console
    from bot.core import Core

    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    out = io.StringIO()
    console = Console(core, out=out)
    try:
        await console.handle("/settings set max_new_tokens 20")
        await console.handle("/scene Elaine: Jerry!")
        assert "you. ELAINE: Jerry!" in out.getvalue()
        assert "  2. GEORGE: What is it?" in out.getvalue()
        await console.handle("/vote 1 2")
        await console.handle("/vote 1 2")
        await console.handle("/best")
        text = out.getvalue()
        assert "Voted for line 2 of scene 1." in text and "already voted" in text
        assert "GEORGE: What is it? — **1** vote" in text
    finally:
        await core.close()


# The real `python -m bot`, with one change made before it starts: the model writes a fixed
# script (helpers.teleprompter_model), its first line at full speed, then 50 ms a token, so a
# 400-token scene is still running when the signals arrive. The file `progress` appears once
# the first line is out, however loaded the machine is.
SLOW_BOT = """
import sys, time
from pathlib import Path
sys.path.insert(0, {tests!r})
import sitcom.model.serving
from helpers import teleprompter_model

real = sitcom.model.serving.load_hf_model
calls = 0

def stall(module, args):
    global calls
    calls += 1
    if calls == {fast_calls}:
        Path({progress!r}).touch()
    elif calls > {fast_calls}:
        time.sleep(0.05)

def slow(name):
    _, tokenizer = real(name)
    model = teleprompter_model(tokenizer, "ELAINE: Get out!\\nGEORGE: What?\\n")
    model.register_forward_pre_hook(stall)
    return model, tokenizer

sitcom.model.serving.load_hf_model = slow
from bot.__main__ import main
sys.exit(main())
"""


@pytest.mark.e2e
@pytest.mark.parametrize(
    "signals, shutdown_s",
    [(["SIGTERM"], "1"), (["SIGTERM", "SIGINT"], "600"), (["SIGINT", "SIGINT"], "600")],
    ids=["deadline", "second-signal", "ctrl-c-twice"],
)
def test_shutdown_is_bounded_and_stores_the_running_scene(
    tmp_path, tiny_model_dir, signals, shutdown_s
):
    """One signal: the running scene gets until SHUTDOWN_TIMEOUT_S, then it is shown and
    stored as a partial scene. A second signal (with a 600 s deadline) cuts it at once, and
    still the scene is stored, the database closed (no -wal left) and the exit status 0."""
    import signal
    import sqlite3
    import time

    env = {k: v for k, v in os.environ.items() if k != "DISCORD_TOKEN"}
    env.update(
        DEFAULT_CHECKPOINT=str(tiny_model_dir),
        BOT_DB=str(tmp_path / "console.db"),
        CHECKPOINTS_DIR=str(tmp_path / "checkpoints"),
        LOG_LEVEL="WARNING",
        PYTHONPATH=str(ROOT),
        SHUTDOWN_TIMEOUT_S=shutdown_s,
        GENERATION_TIMEOUT_S="600",
    )
    progress = tmp_path / "progress"
    code = SLOW_BOT.format(tests=str(ROOT / "tests"), progress=str(progress), fast_calls=16)
    bot = subprocess.Popen(
        [sys.executable, "-c", code],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=tmp_path,
        env=env,
    )
    try:
        bot.stdin.write("/settings set max_new_tokens 400\n")
        bot.stdin.flush()
        assert "Saved" in bot.stdout.readline()  # started
        bot.stdin.write("/scene Jerry: Hello, Newman.\n")
        bot.stdin.flush()
        deadline = time.monotonic() + 120  # generous: a loaded CI machine may take a while
        while not progress.exists():  # the first line is out; ~380 tokens (~20 s) to go
            assert bot.poll() is None, bot.stderr.read()
            assert time.monotonic() < deadline, "the scene never got past its first line"
            time.sleep(0.01)
        for name in signals:
            bot.send_signal(getattr(signal, name))
            time.sleep(0.3)
        bot.wait(timeout=90)
        out, err = bot.stdout.read(), bot.stderr.read()
    finally:
        bot.kill()
    assert bot.returncode == 0, err
    assert "Traceback" not in err and "stopped" in err
    assert "Scene 1" in out and "  2. ELAINE: Get out!" in out
    assert "The bot was shutting down, so the scene stops here.)" in out
    assert not (tmp_path / "console.db-wal").exists()
    db = sqlite3.connect(tmp_path / "console.db")
    (tokens,) = db.execute("SELECT new_tokens FROM scenes").fetchone()
    assert 0 < tokens < 400


@pytest.mark.e2e
def test_humour_models_are_listed_switched_and_remembered_like_checkpoints(
    tmp_path, tiny_model_dir
):
    import shutil

    from sitcom.scenes.humour import DEFAULT_DIR

    shutil.copytree(DEFAULT_DIR, tmp_path / "checkpoints" / "funny")
    env = {"PYTHONPATH": str(ROOT)}
    first = run_bot(
        "/checkpoint list\n/checkpoint use funny\n"
        "/settings set best_of 3 max_new_tokens 16\n"
        "/scene Elaine: Jerry! George! You guys, listen!\n",
        tmp_path,
        tiny_model_dir,
        scripted=True,
        **env,
    )
    assert first.returncode == 0, first.stderr
    assert "humour model: humour  ← active" in first.stdout
    assert "humour model: funny" in first.stdout and "humour model: off" in first.stdout
    assert "now ranked by the humour model funny" in first.stdout
    assert "Scene 1" in first.stdout
    # the best of 3 is what was shown and stored (votes go to the stored lines)
    import sqlite3

    db = sqlite3.connect(tmp_path / "console.db")
    stored = [t for (t,) in db.execute("SELECT text FROM lines ORDER BY line_no")]
    assert stored and all(line in first.stdout for line in stored)
    db.close()
    second = run_bot(
        "/checkpoint list\n/checkpoint use nothing-here\n/checkpoint use off\n",
        tmp_path,
        tiny_model_dir,
        **env,
    )
    assert "humour model: funny  ← active" in second.stdout  # remembered across a restart
    assert "no checkpoint called `nothing-here`" in second.stderr
    assert "ranked by the coherence checks alone" in second.stdout
    assert "Traceback" not in second.stderr


@pytest.mark.e2e
def test_console_scene_hash_id_is_a_repost_not_a_new_scene(tmp_path, tiny_model_dir):
    """`/scene #12` goes through Core.scene_command as on Discord and Slack: it re-posts
    stored scene 12 and never writes a new scene opening with "#12"."""
    import sqlite3

    run = run_bot("/scene #12\n/scene #x\n", tmp_path, tiny_model_dir, PYTHONPATH=str(ROOT))
    assert run.returncode == 1
    errors = [e for e in run.stderr.splitlines() if e.startswith("error: ")]
    assert errors[0] == "error: There is no scene 12 in this channel.", run.stderr
    assert "`/scene #ID` posts saved scene ID again" in errors[1]
    assert "Traceback" not in run.stderr
    db = sqlite3.connect(tmp_path / "console.db")
    assert db.execute("SELECT COUNT(*) FROM scenes").fetchone() == (0,)
    db.close()


@pytest.mark.asyncio
async def test_console_reposts_a_stored_scene_that_was_never_shown(tmp_path, tiny_model_dir):
    from bot.console import LOCAL, Console
    from bot.core import Core
    from sitcom.engine import EngineError
    from sitcom.settings import SceneSettings

    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    out = io.StringIO()
    console = Console(core, out=out)
    try:
        # Written and stored, never shown (the process stopped before it was printed).
        job = await core.submit("Elaine: Jerry!", SceneSettings(max_new_tokens=20), "console:0")
        stored = await core.record(await job.result(), place=LOCAL, user_id="0", prompt=job.prompt)
        await console.handle(f"/scene #{stored.id}")
        text = out.getvalue()
        assert f"Scene {stored.id}" in text and "you. ELAINE: Jerry!" in text
        assert "  2. GEORGE: What is it?" in text
        assert (await core.db.get_scene(stored.id)).posted
        await console.handle(f"/vote {stored.id} 2")  # its lines are votable now
        assert "Voted for line 2" in out.getvalue()
        with pytest.raises(EngineError, match="posted already"):
            await console.handle(f"/scene #{stored.id}")
        with pytest.raises(EngineError, match="no scene 99"):
            await console.handle("/scene #99")
        assert await core.db.get_scene(stored.id + 1) is None  # nothing new written
    finally:
        await core.close()


@pytest.mark.asyncio
async def test_console_retries_a_scene_with_nothing_beyond_the_prompt_then_says_so(
    tmp_path, tiny_model_dir, caplog
):
    """The model ends the scene right after the user's lines: tried once more, then one
    error line, and nothing is stored (as on Discord and Slack)."""
    import logging

    from helpers import teleprompter_model

    from bot.console import CommandError, Console
    from bot.core import Core
    from sitcom.model.catalog import load_model

    def silent(name: str):
        _, tokenizer = load_model(name)
        return teleprompter_model(tokenizer, tokenizer.eos_token), tokenizer

    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=silent)
    console = Console(core, out=io.StringIO())
    caplog.set_level(logging.INFO, logger="bot.core")
    try:
        await console.handle("/settings set max_new_tokens 16 best_of 1")
        with pytest.raises(CommandError, match="wrote nothing beyond your lines"):
            await console.handle("/scene Elaine: Jerry!")
        assert await core.db.get_scene(1) is None
    finally:
        await core.close()
    attempts = [r.getMessage() for r in caplog.records if "nothing written" in r.getMessage()]
    assert len(attempts) == 2, attempts


@pytest.mark.asyncio
async def test_console_votes_go_through_core_vote(tmp_path, tiny_model_dir):
    from bot.console import Console
    from bot.core import Core

    core = await Core.start(make_config(tmp_path, tiny_model_dir), loader=scripted_loader())
    calls = []
    real_vote = core.vote

    async def vote(**kwargs):
        calls.append(kwargs)
        return await real_vote(**kwargs)

    core.vote = vote
    out = io.StringIO()
    console = Console(core, out=out)
    try:
        await console.handle("/settings set max_new_tokens 20")
        await console.handle("/scene Elaine: Jerry!")
        await console.handle("/vote 1 2")
        await console.handle("/vote 1 2")
    finally:
        await core.close()
    assert [(c["platform"], c["slot"], c["user_id"], c["add"]) for c in calls] == [
        ("console", 1, "0", True)
    ] * 2
    assert "Voted for line 2 of scene 1." in out.getvalue()
    assert "already voted" in out.getvalue()
