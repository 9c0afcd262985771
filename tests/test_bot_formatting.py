"""Message splitting, mention neutralising, checkpoint names and configuration parsing."""

from __future__ import annotations

from pathlib import Path

import pytest

from bot.checkpoints import CheckpointError, available, resolve, startup_model
from bot.config import Config, ConfigError
from bot.utils.formatting import KEYCAPS, neutralize, scene_messages, slot_of


def shown_lines(messages):
    return [row.split(" ", 1)[1] for content, _ in messages for row in content.split("\n")[1:]]


def test_scene_split_on_line_boundaries_ten_lines_and_2000_chars_per_message():
    lines = [f"JERRY: line {i}" for i in range(23)] + ["GEORGE: " + "a" * 1700] * 3
    messages = scene_messages(7, lines)
    assert [n for _, n in messages] == [10, 10, 4, 1, 1]  # a 1500-char line fits once
    assert all(len(content) <= 2000 for content, _ in messages)
    assert shown_lines(messages)[:23] == lines[:23]
    for content, count in messages:  # each message numbers its own lines 1..count
        rows = content.split("\n")[1:]
        assert [row.split(" ", 1)[0] for row in rows] == list(KEYCAPS[:count])
    assert shown_lines(messages)[-1].endswith("…")  # an over-long line is shortened, not split


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
    # A stored name that vanished falls back to DEFAULT_CHECKPOINT (which may be a path).
    assert startup_model("gone", "/models/base", tmp_path) == ("/models/base", "/models/base")
    assert startup_model("ft-1", "smollm2", tmp_path)[0] == "ft-1"


def test_config_from_environment():
    config = Config.from_env({"DISCORD_TOKEN": "secret", "ADMIN_USER_IDS": "1, 2 3",
                              "DEV_GUILD_ID": "77", "QUEUE_SIZE": "5", "BOT_DB": "x.db"})
    assert config.admin_user_ids == {1, 2, 3} and config.dev_guild_id == 77
    assert config.max_queue == 5 and config.db_path == Path("x.db")
    assert "secret" not in repr(config)
    assert Config.from_env({}).token is None and Config.from_env({}).default_checkpoint == "seinfeld"
    for bad in ({"QUEUE_SIZE": "lots"}, {"QUEUE_SIZE": "0"}, {"ADMIN_USER_IDS": "bob"},
                {"DEV_GUILD_ID": "-1"}, {"LOG_LEVEL": "LOUD"}):
        with pytest.raises(ConfigError):
            Config.from_env(bad)
