"""Message splitting, mention neutralising, checkpoint names and configuration parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.checkpoints import CheckpointError, available, resolve, startup_model
from bot.config import Config, ConfigError
from bot.db import Place, StoredLine, StoredScene
from bot.discord.cogs.scenes import DiscordSurface
from bot.discord.utils.formatting import KEYCAPS, neutralize, slot_of
from bot.posting import plan


def scene(lines, prompt_lines=0, note=None):
    return StoredScene(
        7,
        Place("discord", "1", "2"),
        [StoredLine(i, i, text, i <= prompt_lines, None) for i, text in enumerate(lines, 1)],
        note,
    )


def shown_lines(messages):
    return [row.split(" ", 1)[1] for m in messages for row in m.text.split("\n")[1:]]


def test_scene_split_on_line_boundaries_ten_lines_and_2000_chars_per_message():
    lines = [f"JERRY: line {i}" for i in range(23)] + ["GEORGE: " + "a" * 1700] * 3
    messages = plan(scene(lines), DiscordSurface(channel=None))
    assert [len(m.lines) for m in messages] == [10, 10, 4, 1, 1]  # a 1500-char line fits once
    assert all(len(m.text) <= 2000 for m in messages)
    assert shown_lines(messages)[:23] == lines[:23]
    for m in messages:  # each message numbers its own lines 1..count
        rows = m.text.split("\n")[1:]
        assert [row.split(" ", 1)[0] for row in rows] == list(KEYCAPS[: len(m.lines)])
        assert [slot for _, slot in m.lines] == list(range(1, len(m.lines) + 1))
    assert shown_lines(messages)[-1].endswith("…")  # an over-long line is shortened, not split


def test_prompt_lines_are_shown_without_a_keycap():
    lines = ["ELAINE: Jerry!", "JERRY: What?"] + [f"GEORGE: line {i}" for i in range(11)]
    messages = plan(scene(lines, prompt_lines=2, note="⏱️ partial"), DiscordSurface(None))
    first = messages[0].text.split("\n")
    assert first[1] == "⏱️ partial"  # the note goes under the first header
    assert first[2:4] == ["💬 ELAINE: Jerry!", "💬 JERRY: What?"]
    assert [slot for _, slot in messages[0].lines] == [None, None, *range(1, 11)]
    assert [slot for _, slot in messages[1].lines] == [1]


def test_mentions_and_control_characters_are_neutralised():
    text = neutralize("JERRY: hi @everyone and @here, <@123456789012345678> <@&42>\x07\u202e")
    assert "@everyone" not in text and "@here" not in text
    assert "@\u200beveryone" in text and "<@123456789012345678>" not in text
    assert "<@&42>" not in text and "\x07" not in text and "\u202e" not in text


def test_keycap_slots():
    assert [slot_of(k) for k in KEYCAPS] == list(range(1, 11))
    assert slot_of("👍") is None and slot_of("1") is None


def test_checkpoint_names_are_looked_up_never_joined(tmp_path):
    (tmp_path / "ft-1").mkdir()
    (tmp_path / "ft-1" / "config.json").write_text("{}")
    (tmp_path / "empty").mkdir()
    # The shipped tuned default first, then the untouched base, then trained checkpoints.
    assert available(tmp_path) == ["seinfeld", "smollm2", "ft-1"]
    assert resolve("ft-1", tmp_path) == str((tmp_path / "ft-1").resolve())
    assert resolve("SmolLM2", tmp_path) == "smollm2"
    assert resolve("Seinfeld", tmp_path) == "seinfeld"
    for bad in ("../x", "/etc", "ft-1/..", "..", "a/b", "empty", "x" * 500, ""):
        with pytest.raises(CheckpointError):
            resolve(bad, tmp_path)
    # A stored name that vanished falls back to DEFAULT_CHECKPOINT (which may be a path,
    # shown by its name only; a hub id is shown as it is).
    assert startup_model("gone", "/models/base", tmp_path) == ("base", "/models/base")
    assert startup_model(None, "org/model-x", tmp_path) == ("org/model-x", "org/model-x")
    assert startup_model("ft-1", "smollm2", tmp_path)[0] == "ft-1"


def test_config_from_environment():
    config = Config.from_env(
        {
            "DISCORD_TOKEN": "secret",
            "ADMIN_USER_IDS": "1, 2 U0ADMIN",
            "DEV_GUILD_ID": "77",
            "QUEUE_SIZE": "5",
            "BOT_DB": "x.db",
        }
    )
    assert config.admin_user_ids == {"1", "2", "U0ADMIN"} and config.dev_guild_id == 77
    assert config.max_queue == 5 and config.db_path == Path("x.db")
    assert "secret" not in repr(config)
    empty = Config.from_env({})
    assert empty.token is None and empty.default_checkpoint == "seinfeld"
    for bad in (
        {"QUEUE_SIZE": "lots"},
        {"QUEUE_SIZE": "0"},
        {"ADMIN_USER_IDS": "bob"},
        {"DEV_GUILD_ID": "-1"},
        {"LOG_LEVEL": "LOUD"},
        {"ADMIN_USER_IDS": "u0lower"},
        {"SLACK_BOT_TOKEN": "xoxb-1"},  # neither Socket Mode nor HTTP mode
        {"SLACK_BOT_TOKEN": "xoxp-user-token", "SLACK_APP_TOKEN": "xapp-1"},
        {"SLACK_APP_TOKEN": "xapp-1"},
        {"SLACK_PORT": "http"},
    ):
        with pytest.raises(ConfigError) as caught:
            Config.from_env(bad)
        assert "xoxp-user-token" not in str(caught.value)


def test_slack_config_from_environment():
    socket = Config.from_env({"SLACK_BOT_TOKEN": "xoxb-1-2", "SLACK_APP_TOKEN": "xapp-1-2"})
    assert (socket.slack_bot_token, socket.slack_app_token) == ("xoxb-1-2", "xapp-1-2")
    assert "xoxb" not in repr(socket) and "xapp" not in repr(socket)
    http = Config.from_env(
        {"SLACK_BOT_TOKEN": "xoxb-1", "SLACK_SIGNING_SECRET": "abc", "SLACK_PORT": "8080"}
    )
    assert (http.slack_signing_secret, http.slack_port, http.slack_app_token) == ("abc", 8080, None)
