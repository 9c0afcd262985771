"""What the engine hands frontends: jobs, scenes and the user-facing errors (see the API
contract in sitcom.engine, which re-exports every name here)."""

from __future__ import annotations

import asyncio
import unicodedata
from collections import deque
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sitcom.settings import SceneSettings


class EngineError(RuntimeError):
    """Base class; str(e) is a polite, user-facing one-liner."""


class QueueFull(EngineError):
    pass


class TooManyPending(EngineError):
    pass


class BadPrompt(EngineError):
    pass


class GenerationTimeout(EngineError):
    """A scene that ran out of time before writing a line. `partial` holds the scene as far
    as it got (None if it never started). One that did write lines is delivered instead,
    as a Scene with partial=True."""

    def __init__(self, message: str, partial: Scene | None = None):
        super().__init__(message)
        self.partial = partial


@dataclass
class Scene:
    lines: list[str]
    text: str
    new_tokens: int
    seconds: float
    model_name: str
    partial: bool = False  # stopped before it ended (timeout or shutdown)
    note: str = ""  # for the user when partial, e.g. why it stops mid-scene
    prompt_lines: int = 0  # how many of `lines` are the user's opening
    candidates: int = 1  # scenes written for this one (best of n); this one ranked best


def clean_prompt(prompt: str, max_chars: int) -> str:
    """Control characters removed; every line break (\\r\\n, \\r, U+2028/U+2029, NEL, \\v,
    \\f: whatever str.splitlines() splits on) made a newline; BadPrompt when nothing usable
    is left."""
    text = "".join(
        c if c == "\n" else " " if c == "\t" else c
        for c in "\n".join(str(prompt).splitlines())
        if c in "\n\t" or not unicodedata.category(c).startswith("C")
    ).strip()
    if not any(c.isalnum() for c in text):
        raise BadPrompt("Give the scene an opening line, e.g. `Elaine: Jerry! George! Listen!`")
    if len(text) > max_chars:
        raise BadPrompt(
            f"That opening is {len(text)} characters; please keep it under {max_chars}."
        )
    return text


class Job:
    """One requested scene. Created by SceneEngine.submit; awaited by the frontend."""

    def __init__(self, prompt: str, settings: SceneSettings, user_id: str):
        self.prompt = prompt
        self.settings = settings
        self.user_id = user_id
        self.position = 0  # 1 + scenes ahead (running included) when submitted
        self.eta_s: float | None = None  # estimated seconds until done, when submitted
        self.cancelled = False  # read by the worker thread
        self.started = 0.0  # time.monotonic() when the worker took it
        self.deadline = float("inf")  # time.monotonic() at which the worker gives up
        self.produced = 0  # tokens written so far (set by the worker)
        self.expected = 1  # candidates being written (best of n); set by the worker
        self.candidates: list = []  # finished candidates (GeneratedScene), worker thread only
        self._future: asyncio.Future[Scene] = asyncio.get_running_loop().create_future()
        self._latest: Scene | None = None
        self._version = 0
        self._changed = asyncio.Event()

    def done(self) -> bool:
        return self._future.done()

    def cancel(self) -> None:
        """Stop generating this scene (queued or running); result() raises EngineError."""
        self.cancelled = True

    async def result(self) -> Scene:
        return await asyncio.shield(self._future)

    async def stream(self) -> AsyncIterator[Scene]:
        """Partial scenes as lines complete; coalesces if the consumer is slow."""
        seen = 0
        while True:
            if self._version > seen and self._latest is not None:
                seen = self._version
                yield self._latest
                continue
            if self._future.done():
                return
            self._changed.clear()
            waiter = asyncio.ensure_future(self._changed.wait())
            await asyncio.wait([waiter, self._future], return_when=asyncio.FIRST_COMPLETED)
            waiter.cancel()

    # Called on the event loop (via call_soon_threadsafe) by the worker.
    def _publish(self, scene: Scene) -> None:
        if not self._future.done():
            self._latest = scene
            self._version += 1
            self._changed.set()

    def _settle(self, outcome: Scene | BaseException) -> None:
        if self._future.done():
            return
        if isinstance(outcome, BaseException):
            self._future.set_exception(outcome)
        else:
            self._future.set_result(outcome)
        self._changed.set()


class _Speed:
    """Recent decoding speed: aggregate tokens/s and one scene's tokens/s."""

    def __init__(self, window: int = 256):
        self._steps: deque[tuple[int, float, int]] = deque(maxlen=window)

    def add(self, tokens: int, seconds: float, row_tokens: int) -> None:
        self._steps.append((tokens, seconds, row_tokens))

    def rates(self) -> tuple[float, float] | None:
        seconds = sum(s for _, s, _ in self._steps)
        if seconds <= 0:
            return None
        return (
            sum(t for t, _, _ in self._steps) / seconds,
            sum(r for _, _, r in self._steps) / seconds,
        )
