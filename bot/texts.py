"""Reply texts every frontend shows (settings, leaderboard), fitted to each platform's
markup by `bold` and `escape`."""

from __future__ import annotations

from collections.abc import Callable

from sitcom.settings import RANGES, SceneSettings

from .db import RankedLine
from .markup import shorten

FAILED = "😕 "  # how scene_command's update texts for a failure start


def describe(settings: SceneSettings, title: str, bold: str = "**") -> str:
    rows = [f"⚙️ {bold}{title}{bold}"]
    for name, value in settings.as_dict().items():
        low, high = RANGES[name]
        rows.append(f"`{name}` = {value:g}  (allowed {low:g}–{high:g})")
    return "\n".join(rows)


def leaderboard(
    title: str,
    rows: list[RankedLine],
    *,
    escape: Callable[[str], str],
    bold: str = "**",
    keycaps: str = "1️⃣…🔟",
) -> str:
    """The /best text: the most-voted lines the model wrote, each through the platform's
    `escape`."""
    if not rows:
        return (
            f"🏆 {bold}{title}{bold}\nNo votes yet — react to a scene's lines with "
            f"{keycaps} to vote."
        )
    out = [f"🏆 {bold}{title}{bold}"]
    for rank, row in enumerate(rows, start=1):
        votes = "vote" if row.votes == 1 else "votes"
        text = shorten(escape(row.text), 160)
        where = f"scene {row.scene_id}, line {row.line_no}"
        out.append(f"{rank}. {text} — {bold}{row.votes}{bold} {votes} ({where})")
    return "\n".join(out)


def queue_text(job) -> str:
    """The acknowledgement: the queue position the engine reports and, when it gives one,
    the estimated wait."""
    text = f"🎬 Writing your scene — #{job.position} in the queue"
    eta = getattr(job, "eta_s", None)
    if isinstance(eta, int | float) and eta > 0:
        text += f", about {eta:.0f} s" if eta < 90 else f", about {eta / 60:.0f} min"
    return text + "…"
