"""What the Discord bot and the local console share: the database, the engine, the checkpoint."""

from __future__ import annotations

import asyncio
import errno
import logging
from collections.abc import Collection

from safetensors import SafetensorError

from sitcom.engine import EngineError, Scene, SceneEngine
from sitcom.llamacpp import load_serving_model
from sitcom.models import ModelLoadError, cache_root, is_base_model, is_tuned_default
from sitcom.settings import SceneSettings

from . import checkpoints
from .config import Config
from .db import Database, DatabaseError, StoredScene

log = logging.getLogger(__name__)

MAX_PROMPT_CHARS = 1000  # the engine's limit and the /scene option's max_length
CHECKPOINT_KEY = "active_checkpoint"


# A read-only, full or mistyped (a file in the path) cache directory.
_UNWRITABLE = {errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC, errno.EDQUOT,
               errno.ENOTDIR, errno.EEXIST, errno.EFBIG}


def load_model(name: str) -> tuple[object, object]:
    """The engine's loader, with the model cache's failures as one clear ModelLoadError.

    The built-in models are converted once into SITCOM_CACHE; a cache on a read-only or
    full disk would otherwise end the start-up in an OSError/SafetensorError traceback.
    """
    if not (is_base_model(name) or is_tuned_default(name)):
        return load_serving_model(name)
    cache = cache_root()
    try:
        cache.mkdir(parents=True, exist_ok=True)  # fails fast, before the slow conversion
        return load_serving_model(name)
    except (OSError, SafetensorError) as e:
        if isinstance(e, OSError) and e.errno not in _UNWRITABLE:
            raise
        why = getattr(e, "strerror", None) or str(e).splitlines()[0]
        raise ModelLoadError(
            f"cannot write the model cache {cache} ({why}); point SITCOM_CACHE at a writable "
            "directory with ~600 MB free"
        ) from e


class Core:
    def __init__(self, config: Config, db: Database, engine: SceneEngine, checkpoint: str) -> None:
        self.config = config
        self.db = db
        self.engine = engine
        self.checkpoint = checkpoint  # the name users see; engine.model_name may be a path
        # engine model -> the name users saw when it was chosen: a scene is labelled with
        # the model that wrote it, even when a swap lands before it is stored.
        self._labels: dict[str, str] = {engine.model_name: checkpoint}
        self.accepting = True

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
            timeout_s=config.timeout_s, max_prompt_chars=MAX_PROMPT_CHARS, loader=load_model,
        )
        await engine.start()
        return engine

    async def submit(self, prompt: str, settings: SceneSettings, user_id: int):
        """A queued job (see sitcom.engine); EngineError subclasses carry polite messages."""
        if not self.accepting:
            raise EngineError("I'm shutting down for a moment; please try again shortly.")
        return await self.engine.submit(prompt, settings, user_id=str(user_id))

    def model_label(self, scene: Scene) -> str:
        """The checkpoint name of the model that wrote `scene` (not necessarily the active)."""
        return self._labels.get(scene.model_name, scene.model_name)

    async def record(
        self, scene: Scene, *, guild_id: int, channel_id: int, user_id: int, prompt: str
    ) -> StoredScene:
        """Store a finished scene; `prompt` should be the cleaned one (job.prompt)."""
        return await self.db.add_scene(
            guild_id=guild_id, channel_id=channel_id, user_id=user_id, prompt=prompt,
            model_name=self.model_label(scene), lines=list(scene.lines),
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
        """Swap the engine to a listed checkpoint and remember it; returns the name.

        Both or neither: when the choice cannot be stored (a busy database), the old model
        is swapped back before the error is reported.
        """
        model = checkpoints.resolve(name, self.config.checkpoints_dir)
        name = model if model in checkpoints.BUILT_IN else name.strip()
        previous = self.engine.model_name
        self._labels[model] = name  # scenes may be written by it as soon as the swap lands
        await self.engine.swap(model)  # ModelLoadError leaves the old model running
        try:
            await self.db.set_state(CHECKPOINT_KEY, name)
        except DatabaseError:
            try:
                await self.engine.swap(previous)
            except ModelLoadError:  # the new one stays; say so truthfully in the listing
                log.exception("could not swap back to %s after a failed switch", previous)
                self.checkpoint = name
            raise
        self.checkpoint = name
        return name

    async def close(self, posting: Collection[asyncio.Task] = (), grace_s: float = 15.0) -> None:
        """Stop taking jobs, let the engine finish or cancel what it has, give the tasks
        posting finished scenes a moment to store them, then close the database."""
        if not self.accepting:
            return
        self.accepting = False
        try:
            await self.engine.close()
            if posting:
                await asyncio.wait(posting, timeout=grace_s)
        finally:
            await self.db.close()
