"""The scene engine: a Discord-free core any chat frontend (Discord, console, Slack) uses.

API CONTRACT (frontends code against this; the implementation may change):

    engine = SceneEngine(model="seinfeld" | "smollm2" | checkpoint dir | hub id,
                         max_queue=32, per_user_limit=2, timeout_s=120.0, max_batch=8)
    await engine.start()                      # loads the model off the event loop
    job = await engine.submit(prompt, settings, user_id="123")   # SceneSettings
        # raises QueueFull / TooManyPending / BadPrompt (user-facing messages),
        # EngineError when not started or shutting down
    job.position                              # 1-based place in the queue when submitted
    async for partial in job.stream(): ...    # optional: partial Scene snapshots, one per
                                              # finished line; ends when the job is done
    scene = await job.result()                # Scene; raises GenerationTimeout / EngineError
    scene.lines                               # clean script lines, prompt lines first
    scene.text, scene.new_tokens, scene.seconds, scene.model_name
    job.cancel()                              # stop generating it (result raises EngineError)
    await engine.swap(model)                  # hot swap; raises ModelLoadError, old stays
    engine.model_name                         # name of the active model
    await engine.close()                      # stop taking jobs, cancel queued ones,
                                              # finish the running batch, join the thread

One worker thread runs every generation; it takes up to `max_batch` queued jobs at a time
and writes them as one batch, so concurrent requests share the model's forward passes.
A model with a GGUF (the packaged default, or a checkpoint holding model.gguf) is served by
llama.cpp (sitcom.llamacpp), anything else by transformers (sitcom.generation); both run
the same guards. SITCOM_BACKEND=torch forces transformers. Models load in other threads,
never on the event loop.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
import unicodedata
from collections import Counter, deque
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

from sitcom.generation import DeadlineStop, LineStreamer
from sitcom.llamacpp import generate_scenes_any, load_serving_model
from sitcom.models import DEFAULT_MODEL, ModelLoadError
from sitcom.settings import SceneSettings

log = logging.getLogger(__name__)

__all__ = [
    "BadPrompt", "EngineError", "GenerationTimeout", "Job", "ModelLoadError", "QueueFull",
    "Scene", "SceneEngine", "TooManyPending",
]


class EngineError(RuntimeError):
    """Base class; str(e) is a polite, user-facing one-liner."""


class QueueFull(EngineError):
    pass


class TooManyPending(EngineError):
    pass


class BadPrompt(EngineError):
    pass


class GenerationTimeout(EngineError):
    """`partial` holds the scene as far as it got (None if it never started)."""

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


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    name: str


def clean_prompt(prompt: str, max_chars: int) -> str:
    """Control characters removed (newlines kept); BadPrompt when nothing usable is left."""
    text = "".join(
        c if c == "\n" else " " if c == "\t" else c
        for c in str(prompt)
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
        self.position = 0
        self.cancelled = False  # read by the worker thread
        self.deadline = float("inf")  # time.monotonic() at which the worker gives up
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


class SceneEngine:
    def __init__(
        self,
        model: str | Path = DEFAULT_MODEL,
        *,
        max_queue: int = 32,
        per_user_limit: int = 2,
        timeout_s: float = 120.0,
        max_batch: int = 8,
        max_prompt_chars: int = 1000,
        precision: str | None = None,
        loader: Callable[[str], tuple[object, object]] = load_serving_model,
    ):
        self._requested = str(model)
        self._loader = loader  # name -> (model, tokenizer); tests wrap the real loader
        self.max_queue = max_queue
        self.per_user_limit = per_user_limit
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.max_prompt_chars = max_prompt_chars
        self.precision = precision
        self._active: _Loaded | None = None
        self._queue: deque[Job] = deque()
        self._pending: Counter[str] = Counter()  # queued + running jobs per user
        self._cond = threading.Condition()
        self._closing = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swap_lock = asyncio.Lock()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # recent batches, for stats

    # ------------------------------------------------------------------ lifecycle

    @property
    def model_name(self) -> str:
        return self._active.name if self._active else self._requested

    @property
    def queued(self) -> int:
        return len(self._queue)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        self._active = await self._load(self._requested)
        self._thread = threading.Thread(target=self._work, name="scene-worker", daemon=True)
        self._thread.start()

    async def swap(self, model: str | Path) -> str:
        """Load `model` beside the active one and switch; queued jobs run on the new one.
        Raises ModelLoadError and keeps the old model when it cannot be loaded."""
        async with self._swap_lock:
            loaded = await self._load(str(model))
            with self._cond:
                self._active = loaded
            return loaded.name

    async def close(self) -> None:
        """Refuse new jobs, cancel queued ones, let the running batch finish, join."""
        with self._cond:
            self._closing = True
            dropped = list(self._queue)
            self._queue.clear()
            self._stopping = True
            self._cond.notify_all()
        for job in dropped:
            self._finish(job, EngineError("The scene engine is shutting down; scene cancelled."))
        if self._thread is not None:
            await asyncio.to_thread(self._thread.join)
            self._thread = None

    async def _load(self, name: str) -> _Loaded:
        # Loading takes seconds (the default model ~20 s the first time): a plain thread.
        model, tokenizer = await asyncio.to_thread(self._loader, name)
        return _Loaded(model, tokenizer, name)

    # ------------------------------------------------------------------ submitting

    async def submit(
        self, prompt: str, settings: SceneSettings | None = None, user_id: str = "local"
    ) -> Job:
        if self._closing:
            raise EngineError("The scene engine is shutting down; try again in a moment.")
        if self._thread is None:
            raise EngineError("The scene engine is still starting; try again in a moment.")
        text = clean_prompt(prompt, self.max_prompt_chars)
        try:
            settings = (settings or SceneSettings()).validated()
        except ValueError as e:
            raise BadPrompt(f"Bad setting: {e}.") from e
        job = Job(text, settings, str(user_id))
        with self._cond:
            if self._pending[job.user_id] >= self.per_user_limit:
                raise TooManyPending(
                    f"You already have {self._pending[job.user_id]} scene(s) in the works; "
                    "wait for one to finish."
                )
            if len(self._queue) >= self.max_queue:
                raise QueueFull(
                    f"The writers' room is full ({self.max_queue} scenes waiting); "
                    "try again in a minute."
                )
            self._queue.append(job)
            self._pending[job.user_id] += 1
            job.position = len(self._queue)
            self._cond.notify()
        return job

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                take = min(self.max_batch, len(self._queue))
                batch = [self._queue.popleft() for _ in range(take)]
                loaded = self._active  # a swap after this point applies to the next batch
            live = []
            for job in batch:
                if job.cancelled:
                    self._finish(job, EngineError("That scene was cancelled."))
                else:
                    live.append(job)
            if live:
                self._run_batch(loaded, live)

    def _run_batch(self, loaded: _Loaded, batch: list[Job]) -> None:
        self.batch_sizes.append(len(batch))
        start = time.monotonic()
        for job in batch:
            job.deadline = start + self.timeout_s

        def should_stop(row: int) -> bool:
            return batch[row].cancelled or time.monotonic() > batch[row].deadline

        def on_lines(row: int, lines: list[str]) -> None:
            partial = Scene(lines, "\n".join(lines), 0, time.monotonic() - start, loaded.name)
            self._call(batch[row]._publish, partial)

        try:
            scenes = generate_scenes_any(
                loaded.model, loaded.tokenizer, [j.prompt for j in batch],
                [j.settings for j in batch],
                streamer=LineStreamer(loaded.tokenizer, [j.prompt for j in batch], on_lines),
                stopping_criteria=[DeadlineStop(should_stop)],
                precision=self.precision,
            )
        except Exception as e:
            if len(batch) > 1:  # isolate the job that broke it; the others still get scenes
                for job in batch:
                    self._run_batch(loaded, [job])
                return
            if isinstance(e, ValueError) and "too long" in str(e):
                # Expected, and any user can cause it: one line, never a traceback at ERROR.
                log.warning("scene refused: %s", e)
                message = "That opening is too long for the model; please shorten it."
            else:
                log.exception("generation failed")
                message = "Something went wrong writing that scene; please try again."
            self._finish(batch[0], EngineError(message))
            return
        seconds = time.monotonic() - start
        for job, scene in zip(batch, scenes, strict=True):
            text = "\n".join(scene.lines)
            done = Scene(scene.lines, text, scene.new_tokens, seconds, loaded.name)
            if job.cancelled:
                self._finish(job, EngineError("That scene was cancelled."))
            elif time.monotonic() > job.deadline and not scene.finished:
                self._finish(job, GenerationTimeout(
                    f"That scene took longer than {self.timeout_s:g} s and was stopped; "
                    "try fewer tokens or again later.",
                    partial=done,
                ))
            else:
                self._finish(job, done)

    def _finish(self, job: Job, outcome: Scene | BaseException) -> None:
        with self._cond:
            self._pending[job.user_id] -= 1
            if self._pending[job.user_id] <= 0:
                del self._pending[job.user_id]
        self._call(job._settle, outcome)

    def _call(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            pass
