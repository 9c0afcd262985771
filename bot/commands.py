"""The text grammar of the commands where they arrive as one string (Slack's slash
commands, the local console): parsed here once, validated against the same ranges as
Discord's typed options (sitcom.settings.RANGES via SceneSettings.with_changes)."""

from __future__ import annotations

import math
import re

from sitcom.settings import RANGES

MAX_PROMPT_CHARS = 1000  # the engine's limit and the /scene option's max_length

SETTINGS_USAGE = (
    "Usage: `/settings show`, `/settings set KEY VALUE [KEY VALUE …]` or `/settings reset`; "
    "keys: " + ", ".join(f"{k} ({lo:g}–{hi:g})" for k, (lo, hi) in RANGES.items())
)
CHECKPOINT_USAGE = "Usage: `/checkpoint list` or `/checkpoint use NAME`"
BEST_USAGE = "Usage: `/best` (this workspace/server) or `/best channel` (this channel only)"
MAX_SCENE_ID = 999_999_999
REPOST_USAGE = (
    "Usage: `/scene PROMPT` writes a new scene (e.g. `/scene Elaine: Jerry! George!`); "
    f"`/scene #ID` posts saved scene ID again (1–{MAX_SCENE_ID:,})."
)
REPOST_RE = re.compile(r"#([0-9]{1,9})")  # ASCII digits only: \d also takes "２", "٢"
# A plain decimal: int()/float() also read "٣٠٠", "1_0", "nan", "1e3" and " 5".
DECIMAL_RE = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]+)?|\.[0-9]+)")


class UsageError(ValueError):
    """Bad command text; str(e) says what was wrong and how to write it."""


def repost_id(prompt: str) -> int | None:
    """`/scene #12` re-posts stored scene 12 instead of writing a new one; None for a
    prompt. A prompt starting with `#` is always meant as an id (a scene opens with a
    speaker, a heading or a direction), so anything but `#` and ASCII digits in range
    (`#２`, `#-1`, `# 2`, `#2 extra`, `#9999999999`) is a UsageError, not a new scene."""
    text = prompt.strip()
    if not text.startswith("#"):
        return None
    m = REPOST_RE.fullmatch(text)
    if m is None or not 1 <= int(m.group(1)) <= MAX_SCENE_ID:
        raise UsageError(REPOST_USAGE)
    return int(m.group(1))


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
                if key in changes:  # `top_k 5 top_k 50`: which one was meant?
                    raise UsageError(f"`{key}` is given twice; give each setting once.")
                number = float(value) if DECIMAL_RE.fullmatch(value) else math.nan
                if not math.isfinite(number):
                    raise UsageError(
                        f"`{key}` needs a number written with the digits 0-9 "
                        f"(such as 200 or 0.9), not `{value[:20]}`."
                    )
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
    """ "server" (the whole server/workspace) or "channel"."""
    match text.lower().split():
        case [] | ["server"] | ["workspace"]:
            return "server"
        case ["channel"]:
            return "channel"
    raise UsageError(BEST_USAGE)
