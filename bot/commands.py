"""The text grammar of the commands where they arrive as one string (Slack's slash
commands, the local console): parsed here once, validated against the same ranges as
Discord's typed options (sitcom.settings.RANGES via SceneSettings.with_changes)."""

from __future__ import annotations

import math
import re

from sitcom.settings import RANGES

SETTINGS_USAGE = (
    "Usage: `/settings show`, `/settings set KEY VALUE [KEY VALUE …]` or `/settings reset`; "
    "keys: " + ", ".join(f"{k} ({lo:g}–{hi:g})" for k, (lo, hi) in RANGES.items())
)
CHECKPOINT_USAGE = "Usage: `/checkpoint list` or `/checkpoint use NAME`"
BEST_USAGE = "Usage: `/best` (this workspace/server) or `/best channel` (this channel only)"
REPOST_RE = re.compile(r"#(\d{1,9})")


class UsageError(ValueError):
    """Bad command text; str(e) says what was wrong and how to write it."""


def repost_id(prompt: str) -> int | None:
    """`/scene #12` re-posts stored scene 12 instead of writing a new one."""
    m = REPOST_RE.fullmatch(prompt.strip())
    return int(m.group(1)) if m else None


def parse_settings(text: str) -> tuple[str, dict[str, float]]:
    """("show" | "reset", {}) or ("set", {key: number}); KEY VALUE and KEY=VALUE both work."""
    words = text.replace("=", " ").split()
    match words:
        case [] | ["show"]:
            return "show", {}
        case ["reset"]:
            return "reset", {}
        case ["set", *pairs] if pairs and len(pairs) % 2 == 0:
            changes = {}
            for key, value in zip(pairs[::2], pairs[1::2], strict=True):
                if key not in RANGES:
                    raise UsageError(f"There is no setting `{key[:30]}`. {SETTINGS_USAGE}")
                try:
                    number = float(value)
                except ValueError:
                    number = math.nan
                if not math.isfinite(number):
                    raise UsageError(f"`{key}` needs a number, not `{value[:20]}`.")
                changes[key] = number
            return "set", changes
    raise UsageError(SETTINGS_USAGE)


def parse_checkpoint(text: str) -> tuple[str, str | None]:
    match text.split(maxsplit=1):
        case [] | ["list"]:
            return "list", None
        case ["use", name]:
            return "use", name.strip()
    raise UsageError(CHECKPOINT_USAGE)


def parse_best(text: str) -> str:
    """"server" (the whole server/workspace) or "channel"."""
    match text.lower().split():
        case [] | ["server"] | ["workspace"]:
            return "server"
        case ["channel"]:
            return "channel"
    raise UsageError(BEST_USAGE)
