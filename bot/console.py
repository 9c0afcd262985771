"""The local console: the bot's commands on stdin/stdout, same engine and database.

Used when DISCORD_TOKEN is unset, so a fresh machine can write a scene with no account.
The console user is the local admin and lives in "guild 0, channel 0". Piped input works:
commands run in order, the process exits at EOF, with status 1 if any command failed.
"""

from __future__ import annotations

import asyncio
import logging
import re
import signal
import sys
import threading
import uuid
from collections.abc import Callable
from typing import TextIO

from sitcom.engine import EngineError
from sitcom.model.catalog import ModelLoadError
from sitcom.settings import RANGES

from .checkpoints import CheckpointError
from .commands import UsageError, parse_checkpoint, parse_settings
from .core import FAILED, Core
from .db import DatabaseError, Place
from .markup import CONTROL_RE
from .posting import Posted

log = logging.getLogger(__name__)

LOCAL = Place("console", "0", "0")  # the console's "server" and "channel"
USER = "0"
SETTINGS_TITLE = "Scene settings"
ID_RE = re.compile(r"[0-9]{1,18}")  # ASCII digits only (not ², ١) and within SQLite's int64
NO_INPUT = (
    "the local console ended: no commands on stdin. It runs because DISCORD_TOKEN is not set; "
    "set DISCORD_TOKEN (or the Slack tokens, SLACK_BOT_TOKEN and SLACK_APP_TOKEN) to run the "
    "real bots"
)
HELP = (
    """Commands:
  /scene TEXT              write a scene that opens with TEXT, e.g. /scene Elaine: Jerry!
  /scene #ID               show saved scene ID, if it was never shown
  /vote SCENE_ID LINE_NO   vote for a line of a scene
  /best                    the most-voted lines
  /settings show | set KEY VALUE [KEY VALUE ...] | reset     keys: """
    + ", ".join(RANGES)
    + """
  /checkpoint list | use NAME
  /help | /quit"""
)


class CommandError(UsageError):
    """Bad console input; the message is shown as is."""


class ConsoleSurface:
    """bot.posting.Surface for the terminal: a "message" is printed; lines are numbered with
    their line number in the scene (what /vote takes), the user's own ones marked `you`."""

    platform = LOCAL.platform
    max_chars = 100_000  # no message limit; bot.posting still splits every 10 votable lines
    line_chars = 2000
    keycaps = "/vote SCENE_ID LINE_NO"

    def __init__(self, say: Callable[[str], None]) -> None:
        self.say = say

    def escape(self, text: str) -> str:
        return _plain(text)

    def header(self, scene_id: int, part: int, note: str | None) -> str:
        text = f"Scene {scene_id}" + (f" (part {part})" if part > 1 else "")
        text += f" — vote with /vote {scene_id} LINE_NO"
        return text + (f"\n({_plain(note)})" if note and part == 1 else "")

    def line(self, slot: int | None, text: str, line_no: int = 0) -> str:
        return f"{'you' if slot is None else line_no:>3}. {text}"

    def link(self, url: str, label: str) -> str:
        return url

    async def send(self, text: str) -> Posted:
        self.say(text)
        return Posted(f"console-{uuid.uuid4().hex}")

    async def react(self, ref: str, slot: int) -> None:
        pass  # /vote LINE_NO stands for the keycap


class Console:
    def __init__(self, core: Core, out: TextIO = sys.stdout, err: TextIO = sys.stderr) -> None:
        self.core = core
        self.out, self.err = out, err
        # REDIS_URL: a scene asked for before a restart is shown here when it is written
        core.surfaces[LOCAL.platform] = lambda place: ConsoleSurface(self.say)
        self._command: asyncio.Task | None = None  # the command in progress
        self._signals = 0
        self._closing: asyncio.Task | None = None

    def stop(self) -> None:
        """SIGINT/SIGTERM: read no more commands and shut down, bounded: a running scene
        gets until the shutdown deadline, then it is shown and stored as it is. A second
        signal cuts it at once; neither skips storing it or closing the database."""
        self._signals += 1
        if getattr(self, "_lines", None) is not None:
            self._lines.put_nowait(None)
        running = [self._command] if self._command and not self._command.done() else []
        self._closing = asyncio.ensure_future(
            self.core.close(posting=running, now=self._signals > 1)
        )

    def say(self, text: str = "") -> None:
        print(text, file=self.out, flush=True)

    async def run(self, stdin: TextIO = sys.stdin) -> int:
        interactive = stdin.isatty()
        if interactive:
            self.say(f"Sitcom console ({self.core.checkpoint}). /help lists the commands.")
        if hasattr(stdin, "reconfigure"):
            # Bytes that are not UTF-8 become U+FFFD here, at the edge; a strict decoder
            # would end the reader thread and leave the console waiting forever.
            stdin.reconfigure(errors="replace")
        failed = False
        commands = 0
        self._lines = lines = _read_lines(stdin)
        while True:
            if interactive:
                print("> ", end="", file=self.out, flush=True)
            line = await lines.get()
            if line is None:  # stop(): a signal
                return 0
            if not line:  # EOF
                if not commands and not interactive:  # e.g. under a service manager
                    print(f"error: {NO_INPUT}", file=self.err, flush=True)
                    return 1
                break
            line = line.strip()
            if not line:
                continue
            commands += 1
            if line in ("/quit", "/exit"):
                break
            self._command = asyncio.ensure_future(self.handle(line))
            try:
                await asyncio.shield(self._command)  # a signal lets the command finish
            except (UsageError, EngineError, ModelLoadError, CheckpointError, DatabaseError) as e:
                failed = True
                print(f"error: {e}", file=self.err, flush=True)
            except Exception:  # a bug in one command: one line here, the traceback in the log
                failed = True
                log.exception("console command %r failed", line[:80])
                print(
                    "error: sorry, that command failed on my side; the details are in the log",
                    file=self.err,
                    flush=True,
                )
            if self._signals:
                return 0
        return 1 if failed and not interactive else 0

    async def handle(self, line: str) -> None:
        command, _, rest = line.partition(" ")
        rest = rest.strip()
        handler = {
            "/scene": self.scene,
            "/vote": self.vote,
            "/best": self.best,
            "/settings": self.settings,
            "/checkpoint": self.checkpoint,
            "/help": self.help,
        }.get(command.lower())
        if handler is None:
            raise CommandError(f"unknown command {command[:40]!r}; /help lists the commands")
        await handler(rest)

    async def help(self, _: str) -> None:
        self.say(HELP)

    async def scene(self, prompt: str) -> None:
        """`/scene TEXT` or `/scene #ID`: Core.scene_command, shown on this terminal. A
        failure after the acknowledgement (the model wrote nothing, a timeout) is an error
        line like any other (exit status 1 for piped input)."""
        failure: list[str] = []

        async def acknowledge(text: str) -> None:
            self.say(text)

        async def update(text: str) -> None:
            if text.startswith(FAILED):
                failure.append(text.removeprefix(FAILED))
            else:
                self.say(text)

        await self.core.scene_command(
            place=LOCAL,
            user_id=USER,
            prompt=prompt,
            surface=ConsoleSurface(self.say),
            acknowledge=acknowledge,
            update=update,
        )
        if failure:
            raise CommandError(failure[0])

    async def vote(self, args: str) -> None:
        parts = args.split()
        if len(parts) != 2 or not all(ID_RE.fullmatch(p) for p in parts):
            raise CommandError("usage: /vote SCENE_ID LINE_NO (two numbers)")
        scene_id, line_no = map(int, parts)
        line = await self.core.db.scene_line(LOCAL.platform, scene_id, line_no)
        if line is None:
            raise CommandError(f"scene {scene_id} has no line {line_no}")
        if line.from_prompt:
            raise CommandError(f"line {line_no} is your own opening; vote for what the model wrote")
        if line.message_id is None or line.slot is None:
            raise CommandError(
                f"scene {scene_id} is not shown yet; show it with /scene #{scene_id}"
            )
        # The same path as a keycap reaction on Discord or Slack.
        if await self.core.vote(
            platform=LOCAL.platform,
            message_id=line.message_id,
            slot=line.slot,
            user_id=USER,
            add=True,
        ):
            self.say(f"Voted for line {line_no} of scene {scene_id}.")
        else:
            self.say("You already voted for that line.")

    async def best(self, _: str) -> None:
        self.say(await self.core.best_text(LOCAL, escape=_plain))

    async def settings(self, args: str) -> None:
        action, changes = parse_settings(args)
        if action == "show":
            text = await self.core.show_settings(LOCAL, title=SETTINGS_TITLE)
        elif action == "reset":
            text = await self.core.reset_settings(LOCAL, title=SETTINGS_TITLE)
        else:
            text = await self.core.change_settings(LOCAL, USER, changes, title=SETTINGS_TITLE)
        self.say(text)

    async def checkpoint(self, args: str) -> None:
        action, name = parse_checkpoint(args)
        if action == "list":
            for row in self.core.checkpoint_listing():
                self.say(f"  {row}")
        else:
            self.say(self.core.switched_text(await self.core.use_checkpoint(name)))


def _plain(text: str) -> str:
    """Text for the terminal: as written, less control characters (escape sequences)."""
    return CONTROL_RE.sub("", text)


def _read_lines(stdin: TextIO) -> asyncio.Queue[str | None]:
    """stdin lines ('' at EOF) from a daemon thread. Not asyncio.to_thread: a worker blocked
    in readline() would keep the process alive after a SIGTERM until stdin closed."""
    loop = asyncio.get_running_loop()
    queue: asyncio.Queue[str | None] = asyncio.Queue()

    def pump() -> None:
        try:
            for line in iter(stdin.readline, ""):
                loop.call_soon_threadsafe(queue.put_nowait, line)
            loop.call_soon_threadsafe(queue.put_nowait, "")
        except (RuntimeError, ValueError):  # the loop or stdin closed under us: exiting
            pass

    threading.Thread(target=pump, name="console-stdin", daemon=True).start()
    return queue


async def main(config) -> int:
    try:
        core = await Core.start(config)
    except (ModelLoadError, DatabaseError, EngineError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    # SIGINT/SIGTERM: stop taking commands, let the one in progress finish within the
    # shutdown deadline, close the engine and the database (a message, not task
    # cancellation, so close() itself is never cancelled; see Console.stop).
    console = Console(core)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, console.stop)
    try:
        return await console.run()
    finally:
        await core.close()
        if console._signals:
            print("stopped; the database is closed cleanly", file=sys.stderr, flush=True)
