"""The scene engine: a Discord-free core any chat frontend (Discord, console, Slack) uses.

API CONTRACT (frontends code against this; the implementation may change):

    engine = SceneEngine(model="seinfeld" | "smollm2" | checkpoint dir | hub id,
                         max_queue=32, per_user_limit=2, timeout_s=120.0, max_batch=8,
                         shutdown_timeout_s=25.0)
    await engine.start()                      # loads the model off the event loop
    job = await engine.submit(prompt, settings, user_id="123")   # SceneSettings
        # raises QueueFull / TooManyPending / BadPrompt (user-facing messages),
        # EngineError when not started or shutting down
    job.position                              # 1 + the scenes ahead of it when submitted,
                                              # running ones included
    job.eta_s                                 # estimated seconds until it is done, from
                                              # how long recent scenes took (None until the
                                              # engine has measured some)
    async for partial in job.stream(): ...    # optional: partial Scene snapshots, one per
                                              # finished line; ends when the job is done
    scene = await job.result()                # Scene; raises EngineError (GenerationTimeout
                                              # when it timed out before writing a line)
    scene.lines                               # clean script lines, prompt lines first
    scene.text, scene.new_tokens, scene.seconds, scene.model_name
    scene.partial, scene.note                 # stopped early (timeout, shutdown): the lines
                                              # it had, and a one-line note for the user
    scene.prompt_lines                        # how many of scene.lines are the opening
    scene.candidates                          # settings.best_of > 1: that many scenes were
        # written in the same batch and the best-ranked one (sitcom.scenes.ranking: coherence
        # checks + engine.scorer, a humour model) is the result; stream() shows the first
        # candidate. With engine.trim (default) every scene ends before the first turn that
        # derails it (sitcom.scenes.ranking.keep_lines): the final Scene can have fewer
        # lines than the stream showed. With settings.pick_lines (llama.cpp only) the
        # candidates are compared after every line (ranking.best_next_line) and all go on
        # from the best line; the stream shows the kept lines.
    job.cancel()                              # stop generating it (result raises EngineError)
    await engine.swap(model)                  # hot swap; raises ModelLoadError, old stays
    engine.model_name                         # name of the active model
    engine.served                             # sitcom.model.serving.Served: label, files, backend,
                                              # whether the tuned default fell back (or None)
    await engine.close()                      # stop taking jobs, cancel queued ones, give
        # running scenes until shutdown_timeout_s, then stop them and deliver them as partial
        # scenes; a second close() stops them at once; returns once the worker has ended

One worker thread runs every generation. A model with a GGUF (the packaged default, or a
checkpoint holding model.gguf) is served by llama.cpp with continuous batching
(sitcom.decoding.batcher): up to `max_batch` scenes share each forward pass, a queued scene takes a
slot as soon as one frees, and each scene is delivered the moment it is done. Anything
else is served by transformers (sitcom.decoding.generation) a batch at a time: up to `max_batch`
queued jobs written as one generate() call (continuous batching there would need per-row
KV cache surgery inside transformers' generate()). Both run the same guards.
SITCOM_BACKEND=torch forces transformers. Models load in other threads, never on the
event loop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import heapq
import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sitcom.decoding.batcher import ContinuousBatcher
from sitcom.decoding.generation import generate_scenes
from sitcom.decoding.guards import DeadlineStop
from sitcom.decoding.plan import GeneratedScene
from sitcom.decoding.streaming import LineStreamer
from sitcom.decoding.threads import ThreadPolicy
from sitcom.jobs import (
    BadPrompt,
    EngineError,
    GenerationTimeout,
    Job,
    QueueFull,
    Scene,
    TooManyPending,
    _Speed,
    clean_prompt,
)
from sitcom.model.catalog import DEFAULT_MODEL, LOAD_LOCK, ModelLoadError
from sitcom.model.serving import Served, backend_of, load_amateur, load_served
from sitcom.scenes.ranking import LineScorer, best_next_line, keep_lines, rank
from sitcom.scenes.script import normalize_prompt
from sitcom.settings import SceneSettings

log = logging.getLogger(__name__)

__all__ = [
    "BadPrompt",
    "EngineError",
    "GenerationTimeout",
    "Job",
    "ModelLoadError",
    "QueueFull",
    "Scene",
    "SceneEngine",
    "TooManyPending",
]

SHUTDOWN_TIMEOUT_S = 25.0  # Procfile platforms kill a worker ~30 s after SIGTERM


@dataclass
class _Loaded:
    model: object
    tokenizer: object
    name: str
    backend: str  # "llamacpp": continuous batching; "torch": a batch at a time
    served: Served | None = None  # what the loader said is served (None: a custom loader)
    _amateur: object = None
    _tried: bool = False

    def amateur(self) -> object | None:
        """The untuned base for contrast (sitcom.decoding.contrast), loaded on first use in
        the worker thread; None when this model has none or it could not be loaded."""
        if not self._tried:
            self._tried = True
            try:
                self._amateur = load_amateur(self.served, self.model) if self.served else None
            except Exception:
                log.exception("could not load the base model for contrast")
        return self._amateur

    def base_for(self, job: Job) -> object | None:
        """The base for a job that asks for contrast; a job whose model has none is written
        without it (logged), as a guided job without room for its twin is unguided."""
        if job.settings.contrast <= 0:
            return None
        base = self.amateur()
        if base is None:
            log.info("contrast needs the untuned base of %s; it has none: without it", self.name)
            job.settings = job.settings.with_changes(contrast=0)
        return base


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
        shutdown_timeout_s: float = SHUTDOWN_TIMEOUT_S,
        precision: str | None = None,
        loader: Callable[[str], tuple] = load_served,
        scorer: LineScorer | None = None,
        trim: bool = True,
    ):
        self._requested = str(model)
        # name -> (model, tokenizer, Served) as sitcom.model.serving.load_served, or (model,
        # tokenizer) whose backend is told from the model; tests wrap the real loader
        self._loader = loader
        self.scorer = scorer  # ranks best-of-n candidates (a humour model); swappable
        self.trim = trim  # post a scene only up to the turn before it derails (ranking)
        self.max_queue = max_queue
        self.per_user_limit = per_user_limit
        self.timeout_s = timeout_s
        self.max_batch = max_batch
        self.max_prompt_chars = max_prompt_chars
        self.shutdown_timeout_s = shutdown_timeout_s
        self.precision = precision
        self._active: _Loaded | None = None
        self._queue: deque[Job] = deque()
        self._running: set[Job] = set()
        self._pending: Counter[str] = Counter()  # queued + running jobs per user
        self._cond = threading.Condition()
        self._closing = False
        self._stopping = False
        self._stop_at = float("inf")  # time.monotonic() at which running scenes are cut
        self._speed = _Speed()
        # (new tokens, wall seconds from start to done, cut before it ended) of recent
        # scenes, for job.eta_s
        self._finished: deque[tuple[int, float, bool]] = deque(maxlen=32)
        self._thread: threading.Thread | None = None
        self._joined: asyncio.Future | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._swap_lock = asyncio.Lock()
        self.batch_sizes: deque[int] = deque(maxlen=1000)  # scenes per batch (torch) or
        # per continuous run (llama.cpp: scenes written between two idle moments), for stats

    # ------------------------------------------------------------------ lifecycle

    @property
    def model_name(self) -> str:
        return self._active.name if self._active else self._requested

    @property
    def served(self) -> Served | None:
        """What the active model is served as (sitcom.model.serving), when its loader said so."""
        return self._active.served if self._active else None

    @property
    def queued(self) -> int:
        return len(self._queue)

    @property
    def running(self) -> int:
        return len(self._running)

    async def start(self) -> None:
        if self._thread is not None:
            return
        self._loop = asyncio.get_running_loop()
        try:
            ThreadPolicy()  # SITCOM_THREADS checked now, not at the first scene
        except ValueError as e:
            raise EngineError(str(e)) from None
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

    async def close(self, deadline_s: float | None = None) -> None:
        """Refuse new jobs and cancel queued ones; give running scenes `deadline_s`
        (default shutdown_timeout_s; a second call defaults to 0), then cut them: they
        are delivered as partial scenes. Returns when the worker has ended. Safe to call
        again (and concurrently): a later call can only bring the deadline closer."""
        with self._cond:
            again = self._closing
            if deadline_s is None:
                deadline_s = 0.0 if again else self.shutdown_timeout_s
            self._closing = self._stopping = True
            self._stop_at = min(self._stop_at, time.monotonic() + max(0.0, deadline_s))
            dropped = list(self._queue)
            self._queue.clear()
            self._cond.notify_all()
        if again:
            log.info("closing the scene engine now: running scenes are cut where they are")
        for job in dropped:
            self._finish(job, EngineError("The scene engine is shutting down; scene cancelled."))
        if self._thread is not None:
            if self._joined is None:
                self._joined = asyncio.ensure_future(asyncio.to_thread(self._thread.join))
            await asyncio.shield(self._joined)

    async def _load(self, name: str) -> _Loaded:
        # Loading takes seconds (the default model ~20 s the first time): a plain thread.
        # One load at a time in the process, whatever the loader (see LOAD_LOCK): two
        # engines (workers, a checkpoint switch) loading at once could break every later load.
        loaded = await asyncio.to_thread(_load_alone, self._loader, name)
        model, tokenizer, *rest = loaded
        served = rest[0] if rest else None
        backend = served.backend if served is not None else backend_of(model)
        return _Loaded(model, tokenizer, name, backend, served)

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
            job.position = len(self._running) + len(self._queue) + 1
            job.eta_s = self._estimate(job)
            self._queue.append(job)
            self._pending[job.user_id] += 1
            self._cond.notify()
        return job

    def _estimate(self, job: Job) -> float | None:
        """Seconds until `job` is done, from the measured speed of recent scenes: a scene
        takes as many tokens as recent ones did (within its budget: most end sooner) at
        the wall seconds per token they took, load and all. The scenes ahead of it are
        laid out on the engine's slots as the worker runs them: llama.cpp starts a queued
        scene as soon as a slot frees, transformers runs whole batches one after another.
        A best-of-n scene takes n slots (its candidates run side by side). None until a
        scene has finished (or, with llama.cpp, a step has run). Holds self._cond."""
        recent = list(self._finished)
        if recent:
            tokens = sum(t for t, _, _ in recent)
            seconds = sum(s for _, s, _ in recent)
            if tokens <= 0 or seconds <= 0:
                return None
            per_token = seconds / tokens
        else:
            rates = self._speed.rates()
            if rates is None or min(rates) <= 0:
                return None
            per_token = 1 / rates[1]

        def duration(j: Job) -> float:
            # As long as recent scenes were, under this one's budget; one that was cut at
            # its own budget might have gone on to this one's.
            budget = j.settings.max_new_tokens
            if not recent:
                return per_token * budget
            expected = sum(budget if cut else min(t, budget) for t, _, cut in recent)
            return per_token * expected / len(recent)

        now = time.monotonic()
        waiting = [*self._queue, job]
        if self._active is not None and self._active.backend == "llamacpp":
            slots: list[float] = []
            for j in self._running:
                left = max(0.0, duration(j) - (now - j.started)) if j.started else duration(j)
                slots += [left] * self._width(j)
            slots += [0.0] * max(0, self.max_batch - len(slots))
            heapq.heapify(slots)

            def place(j: Job) -> float:  # when j's candidates all have a slot, plus its time
                taken = [heapq.heappop(slots) for _ in range(min(self._width(j), len(slots)))]
                end = max(taken) + duration(j)
                for _ in taken:
                    heapq.heappush(slots, end)
                return end

            for ahead in waiting[:-1]:
                place(ahead)
            return place(job)
        left = [
            max(0.0, duration(j) - (now - j.started)) if j.started else duration(j)
            for j in self._running
        ]
        done = max(left, default=0.0)
        for first in range(0, len(waiting), self.max_batch):
            done += max(duration(j) for j in waiting[first : first + self.max_batch])
        return done

    def _width(self, job: Job) -> int:
        """llama.cpp sequences one job takes at once: one per candidate of its best_of (two
        with guidance: each candidate's twin without the opening), at most a batch."""
        return _per_candidate(job) * self._candidates(job, self.max_batch)

    def _candidates(self, job: Job, sequences: int) -> int:
        """Candidates of a job's best_of that fit in `sequences` llama.cpp sequences."""
        return max(1, min(job.settings.best_of, sequences // _per_candidate(job)))

    # ------------------------------------------------------------------ worker thread

    def _work(self) -> None:
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue:
                    return
                loaded = self._active  # a swap after this point applies to the next run
                if loaded.backend == "llamacpp":
                    batch = None
                else:
                    take = min(self.max_batch, len(self._queue))
                    batch = [self._queue.popleft() for _ in range(take)]
                    self._running.update(batch)
            if batch is None:
                self._run_continuous(loaded)
                continue
            live = []
            for job in batch:
                if job.cancelled:
                    self._finish(job, EngineError("That scene was cancelled."))
                else:
                    live.append(job)
            if live:
                self._run_batch(loaded, live)

    def _should_stop(self, job: Job) -> bool:
        now = time.monotonic()
        return job.cancelled or now > job.deadline or now > self._stop_at

    def _begin(self, job: Job) -> None:
        job.started = time.monotonic()
        job.deadline = job.started + self.timeout_s

    def _snapshot(self, job: Job, loaded: _Loaded) -> Callable[[int, list[str]], None]:
        def on_lines(_row: int, lines: list[str]) -> None:
            partial = Scene(lines, "\n".join(lines), 0, time.monotonic() - job.started, loaded.name)
            self._call(job._publish, partial)

        return on_lines

    def _run_continuous(self, loaded: _Loaded) -> None:
        """llama.cpp: keep every slot busy until the queue is empty (or the model was
        swapped: then the running scenes finish on the old model and the loop returns)."""
        batcher = ContinuousBatcher(
            loaded.model, loaded.tokenizer, slots=self.max_batch, choose_line=self._choose_line
        )
        scenes = 0
        with loaded.model.lock:
            while True:
                with self._cond:
                    new = []
                    free = batcher.free_slots
                    while (
                        self._queue
                        and self._active is loaded
                        and min(self._width(self._queue[0]), batcher.capacity) <= free
                    ):
                        free -= min(self._width(self._queue[0]), batcher.capacity)
                        new.append(self._queue.popleft())
                    self._running.update(new)
                    if not new and not batcher.rows:
                        break
                for job in new:
                    scenes += self._join(batcher, loaded, job)
                if not batcher.rows:
                    continue
                start = time.monotonic()
                try:
                    finished = batcher.step()
                except Exception:
                    log.exception("generation failed")
                    for job in dict.fromkeys(row.tag for row in batcher.rows):
                        self._finish(
                            job,
                            EngineError(
                                "Something went wrong writing that scene; please try again."
                            ),
                        )
                    batcher.abort()
                    continue
                rows = len(batcher.rows) + len(finished)
                with self._cond:
                    self._speed.add(rows, time.monotonic() - start, 1)
                for row in batcher.rows:
                    row.tag.produced = row.new_tokens
                for row, scene in finished:
                    self._collect(row.tag, scene, loaded)
        if scenes:
            self.batch_sizes.append(scenes)

    def _join(self, batcher: ContinuousBatcher, loaded: _Loaded, job: Job) -> int:
        if job.cancelled:
            self._finish(job, EngineError("That scene was cancelled."))
            return 0
        self._begin(job)
        while _per_candidate(job) > batcher.capacity:  # no room for a twin: voice, then guidance go
            off = {"voice": 0} if job.settings.voice > 0 else {"guidance": 1}
            log.info("%s needs another llama.cpp sequence, this engine has none: off", *off)
            job.settings = job.settings.with_changes(**off)
        base = loaded.base_for(job)
        if base is not None and batcher.amateur is None:
            batcher.amateur = base
        job.expected, job.candidates = self._candidates(job, batcher.capacity), []
        group = job if job.settings.pick_lines and job.expected > 1 else None
        try:
            for i in range(job.expected):  # the candidates of a best-of-n job
                batcher.add(
                    job.prompt,
                    job.settings,
                    tag=job,
                    streamer=None
                    if i
                    else LineStreamer(loaded.tokenizer, [job.prompt], self._snapshot(job, loaded)),
                    stopping_criteria=[DeadlineStop(lambda _row, job=job: self._should_stop(job))],
                    group=group,
                )
        except Exception as e:  # a prompt too long for the context, or a bug: this job only
            batcher.abort(job)
            if not isinstance(e, ValueError):
                log.exception("could not start a scene")
            self._finish(job, EngineError(_message(e)))
            return 0
        return 1

    def _choose_line(self, candidates: list[list[str]], job: Job) -> int:
        """Line by line (pick_lines): the candidate whose new line to keep."""
        try:
            return best_next_line(candidates, _prompt_count(job.prompt), self.scorer)
        except Exception:  # a broken scorer must not stop the scene: keep the first
            log.exception("choosing a line failed; keeping the first")
            return 0

    def _run_batch(self, loaded: _Loaded, batch: list[Job]) -> None:
        """transformers: the whole batch in one generate() call."""
        self.batch_sizes.append(len(batch))
        rows: list[tuple[Job, int]] = []  # (job, candidate) per generate() row
        amateur = None
        for job in batch:
            self._begin(job)
            base = loaded.base_for(job)
            amateur = base if base is not None else amateur
            # guidance and voice run inside generate() here, with no rows of their own
            job.expected, job.candidates = max(1, min(job.settings.best_of, self.max_batch)), []
            rows += [(job, i) for i in range(job.expected)]
        callbacks = [self._snapshot(job, loaded) if i == 0 else None for job, i in rows]

        def on_lines(row: int, lines: list[str]) -> None:
            if callbacks[row] is not None:
                callbacks[row](row, lines)

        start = time.monotonic()
        try:
            scenes = generate_scenes(
                loaded.model,
                loaded.tokenizer,
                [j.prompt for j, _ in rows],
                [j.settings for j, _ in rows],
                streamer=LineStreamer(loaded.tokenizer, [j.prompt for j, _ in rows], on_lines),
                stopping_criteria=[DeadlineStop(lambda row: self._should_stop(rows[row][0]))],
                precision=self.precision,
                amateur=amateur,
            )
        except Exception as e:
            if len(batch) > 1:  # isolate the job that broke it; the others still get scenes
                for job in batch:
                    self._run_batch(loaded, [job])
                return
            if isinstance(e, ValueError):
                # Expected, and any user can cause it: one line, never a traceback at ERROR.
                log.warning("scene refused: %s", e)
            else:
                log.exception("generation failed")
            self._finish(batch[0], EngineError(_message(e)))
            return
        with self._cond:
            self._speed.add(
                sum(s.new_tokens for s in scenes),
                time.monotonic() - start,
                max(s.new_tokens for s in scenes),
            )
        for (job, _), scene in zip(rows, scenes, strict=True):
            self._collect(job, scene, loaded)

    def _collect(self, job: Job, scene: GeneratedScene, loaded: _Loaded) -> None:
        """One candidate of `job` is done; once all are, the best-ranked one is delivered."""
        job.candidates.append(scene)
        if len(job.candidates) < job.expected:
            return
        best = job.candidates[0]
        try:
            prompt_count = _prompt_count(job.prompt)
            if len(job.candidates) > 1:
                ranked = rank([c.lines for c in job.candidates], prompt_count, self.scorer)
                best, keep = job.candidates[ranked[0].index], ranked[0].keep
                log.info(
                    "best of %d: candidate %d (score %.2f, coherence %.2f, humour %.2f%s)",
                    len(job.candidates),
                    ranked[0].index,
                    ranked[0].total,
                    ranked[0].coherence,
                    ranked[0].humour,
                    f"; {', '.join(ranked[0].problems)}" if ranked[0].problems else "",
                )
            else:
                keep = keep_lines(best.lines, prompt_count) if self.trim else len(best.lines)
            if self.trim and keep < len(best.lines):  # the scene ends before it derails
                best = dataclasses.replace(best, lines=best.lines[:keep], finished=True)
        except Exception:  # a broken scorer must not lose the scene: post the first
            log.exception("ranking failed; posting the first candidate")
        job.candidates = []
        self._deliver(job, best, loaded)

    def _deliver(self, job: Job, scene: GeneratedScene, loaded: _Loaded) -> None:
        now = time.monotonic()
        prompt_lines = _prompt_count(job.prompt)
        done = Scene(
            scene.lines,
            "\n".join(scene.lines),
            scene.new_tokens,
            now - job.started,
            loaded.name,
            prompt_lines=prompt_lines,
            candidates=job.expected,
        )
        cut = not scene.finished and scene.new_tokens < job.settings.max_new_tokens
        wrote = len(scene.lines) > prompt_lines
        if scene.new_tokens > 0 and job.started:
            with self._cond:
                self._finished.append((scene.new_tokens, now - job.started, not scene.finished))
        if job.cancelled:
            self._finish(job, EngineError("That scene was cancelled."))
        elif cut and now > self._stop_at:
            if wrote:
                done.partial = True
                done.note = "The bot was shutting down, so the scene stops here."
                self._finish(job, done)
            else:
                self._finish(
                    job,
                    EngineError("The scene engine shut down before that scene got its first line."),
                )
        elif cut and now > job.deadline:
            note = (
                f"That scene took longer than {self.timeout_s:g} s, so it stops here; "
                "try fewer tokens or again later."
            )
            if wrote:
                done.partial, done.note = True, note
                self._finish(job, done)
            else:
                self._finish(job, GenerationTimeout(note, partial=done))
        else:
            self._finish(job, done)

    def _finish(self, job: Job, outcome: Scene | BaseException) -> None:
        with self._cond:
            self._running.discard(job)
            self._pending[job.user_id] -= 1
            if self._pending[job.user_id] <= 0:
                del self._pending[job.user_id]
        self._call(job._settle, outcome)

    def _call(self, fn, arg) -> None:
        try:
            self._loop.call_soon_threadsafe(fn, arg)
        except RuntimeError:  # the event loop is gone: nobody is waiting any more
            pass


def _prompt_count(prompt: str) -> int:
    """How many script lines the opening becomes (they lead every scene's lines)."""
    return len([x for x in normalize_prompt(prompt).splitlines() if x.strip()])


def _per_candidate(job: Job) -> int:
    """llama.cpp sequences one candidate takes: one more with guidance (the scene without its
    opening, sitcom.decoding.guidance), one more with voice (sitcom.decoding.voice)."""
    return 1 + (job.settings.guidance > 1) + (job.settings.voice > 0)


def _message(error: Exception) -> str:
    if isinstance(error, ValueError) and "too long" in str(error):
        return "That opening is too long for the model; please shorten it."
    return "Something went wrong writing that scene; please try again."


def _load_alone(loader: Callable[[str], tuple], name: str) -> tuple:
    with LOAD_LOCK:
        return loader(name)
