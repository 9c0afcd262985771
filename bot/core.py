"""What the Discord bot and the local console share: the database, the engine, the checkpoint."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Collection

from sitcom.engine import EngineError, SceneEngine
from sitcom.models import DEFAULT_MODEL, ModelLoadError
from sitcom.settings import SceneSettings

from . import checkpoints
from .config import Config
from .db import Database, StoredScene

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1000  # the engine's limit and the /scene option's max_length
CHECKPOINT_KEY = "active_checkpoint"


class Core:
    def __init__(self, config: Config, db: Database, engine: SceneEngine, checkpoint: str) -> None:
        self.config = config
        self.db = db
        self.engine = engine
        self.checkpoint = checkpoint  # the name users see; engine.model_name may be a path
        self.accepting = True
        self._closing: asyncio.Future | None = None
        self._hurrying: asyncio.Future | None = None

    @classmethod
    async def start(cls, config: Config) -> Core:
        """Open the database, then load the stored checkpoint (or DEFAULT_CHECKPOINT)."""
        db = await Database.open(config.db_path, timeout=config.db_timeout_s)
        try:
            stored = await db.get_state(CHECKPOINT_KEY)
            name, model = checkpoints.startup_model(
                stored, config.default_checkpoint, config.checkpoints_dir
            )
            try:
                engine = await cls._start_engine(config, model)
            except ModelLoadError:
                if name == config.default_checkpoint:
                    raise
                log.exception("stored checkpoint %s failed to load; using the default", name)
                name, model = checkpoints.startup_model(
                    None, config.default_checkpoint, config.checkpoints_dir
                )
                engine = await cls._start_engine(config, model)
        except BaseException:
            await db.close()
            raise
        log.info("scene engine ready with checkpoint %s", name)
        return cls(config, db, engine, name)

    @staticmethod
    async def _start_engine(config: Config, model: str) -> SceneEngine:
        engine = SceneEngine(
            model=model, max_queue=config.max_queue, per_user_limit=config.per_user_limit,
            timeout_s=config.timeout_s, max_prompt_chars=MAX_PROMPT_CHARS,
            shutdown_timeout_s=max(0.0, config.shutdown_timeout_s - posting_margin(config)),
        )
        await engine.start()
        return engine

    async def submit(self, prompt: str, settings: SceneSettings, user_id: int):
        """A queued job (see sitcom.engine); EngineError subclasses carry polite messages."""
        if not self.accepting:
            raise EngineError("I'm shutting down for a moment; please try again shortly.")
        return await self.engine.submit(prompt, settings, user_id=str(user_id))

    async def record(
        self, scene, *, guild_id: int, channel_id: int, user_id: int, prompt: str
    ) -> StoredScene:
        return await self.db.add_scene(
            guild_id=guild_id, channel_id=channel_id, user_id=user_id, prompt=prompt,
            model_name=self.checkpoint, lines=list(scene.lines),
            new_tokens=int(scene.new_tokens), seconds=float(scene.seconds),
        )

    def list_checkpoints(self) -> list[str]:
        return checkpoints.available(self.config.checkpoints_dir)

    def checkpoint_listing(self) -> list[str]:
        """One row per checkpoint, the active one marked (it may be a DEFAULT_CHECKPOINT path)."""
        names = self.list_checkpoints()
        if self.checkpoint not in names:
            names.append(self.checkpoint)
        return [f"{n}  ← active" if n == self.checkpoint else n for n in names]

    async def use_checkpoint(self, name: str) -> str:
        """Swap the engine to a listed checkpoint and remember it; returns the name."""
        model = checkpoints.resolve(name, self.config.checkpoints_dir)
        name = DEFAULT_MODEL if model == DEFAULT_MODEL else name.strip()
        await self.engine.swap(model)  # ModelLoadError leaves the old model running
        self.checkpoint = name
        await self.db.set_state(CHECKPOINT_KEY, name)
        return name

    async def close(self, posting: Collection[asyncio.Task] = (), *, now: bool = False) -> None:
        """Stop taking jobs; give running scenes until the shutdown deadline, after which
        the engine delivers them as partial scenes (now=True: cut them at once); give the
        tasks posting finished scenes the rest of SHUTDOWN_TIMEOUT_S to store and post
        them; then close the database. Every call waits for that same shutdown: a second
        call (a second signal) can speed it up, never skip storing or closing."""
        if now and self._closing is not None and self._hurrying is None:
            self._hurrying = asyncio.ensure_future(self.engine.close(deadline_s=0))
        if self._closing is None:
            self.accepting = False
            self._closing = asyncio.ensure_future(self._close(set(posting), now))
        await asyncio.shield(self._closing)

    async def _close(self, posting: set[asyncio.Task], now: bool) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.shutdown_timeout_s
        try:
            await self.engine.close(deadline_s=0 if now else None)
            if posting:
                await asyncio.wait(posting, timeout=max(1.0, end - loop.time()))
        finally:
            await self.db.close()


def posting_margin(config: Config) -> float:
    """Seconds of SHUTDOWN_TIMEOUT_S kept for storing and posting the scenes the engine
    delivers at its deadline (the rest is the engine's)."""
    return min(5.0, config.shutdown_timeout_s / 5)
