"""What every frontend (Discord, Slack, the local console) shares: the database, the engine,
the checkpoint, and the platform-free parts of the commands: the /scene flow from queue to
posted scene (bot.posting does the posting), votes and their bookkeeping."""

from __future__ import annotations

import asyncio
import logging
import os
import socket
from collections.abc import Awaitable, Callable, Collection, Sequence

from sitcom.engine import EngineError, Scene, SceneEngine
from sitcom.model.catalog import (
    ModelLoadError,
    forget_tuned_fallback,
)
from sitcom.model.serving import load_model
from sitcom.scenes.humour import HumourModel, HumourModelError, load_default
from sitcom.settings import SceneSettings

from . import checkpoints
from .commands import MAX_PROMPT_CHARS, UsageError, repost_id
from .config import Config
from .db import Database, DatabaseError, LeaseHeld, Place, StoredScene
from .posting import Delivery, RetryPolicy, Surface, deliver
from .storage import open_database
from .texts import FAILED, describe, leaderboard, queue_text

log = logging.getLogger(__name__)

CHECKPOINT_KEY = "active_checkpoint"
HUMOUR_KEY = "active_humour"
SETTINGS_TITLE = "Scene settings for this channel"
LEASE_TTL_S = 30.0  # a process's lease outlives it by at most this; renewed every third


class Core:
    def __init__(self, config: Config, db: Database, engine: SceneEngine, checkpoint: str) -> None:
        self.config = config
        self.db = db
        self.engine = engine
        self.checkpoint = checkpoint  # the name users see; engine.model_name may be a path
        self.humour = checkpoints.HUMOUR_OFF  # the humour model ranking best-of-n candidates
        # engine model -> the name users saw when it was chosen: a scene is labelled with
        # the model that wrote it, even when a swap lands before it is stored.
        self._labels: dict[str, str] = {engine.model_name: checkpoint}
        self.accepting = True
        self.retry = RetryPolicy()
        self._closing: asyncio.Future | None = None
        self._hurrying: asyncio.Future | None = None
        self._leases: dict[tuple[str, tuple[tuple[int, int], ...]], asyncio.Task] = {}
        self.lease_ttl_s = LEASE_TTL_S
        self._switching = 0  # use_checkpoint calls in progress
        self._unfollowable: str | None = None  # a checkpoint another process chose that
        # does not load here
        self.queue = None  # REDIS_URL: the bot.queue.Gateway workers write scenes behind
        # platform -> a Surface for a Place (None: not served here); frontends register
        # theirs, so a scene whose asking gateway died can be posted by this one
        self.surfaces: dict[str, Callable[[Place], Surface | None]] = {}

    @classmethod
    async def start(cls, config: Config, loader=None) -> Core:
        """Open the database, then load the stored checkpoint (or DEFAULT_CHECKPOINT).
        `loader` replaces SceneEngine's model loader (tests use scripted models). With
        REDIS_URL this is a gateway instead: no model, scenes go to the workers' queue."""
        if config.redis_url:
            return await cls._start_gateway(config)
        db = await open_database(config.database_url or config.db_path, timeout=config.db_timeout_s)
        try:
            stored = await db.get_state(CHECKPOINT_KEY)
            name, model = checkpoints.startup_model(
                stored, config.default_checkpoint, config.checkpoints_dir
            )
            try:
                engine = await cls._start_engine(config, model, loader)
            except ModelLoadError:
                default = checkpoints.startup_model(
                    None, config.default_checkpoint, config.checkpoints_dir
                )
                if (name, model) == default:
                    raise
                log.exception("stored checkpoint %s failed to load; using the default", name)
                name, model = default
                engine = await cls._start_engine(config, model, loader)
        except BaseException:
            await db.close()
            raise
        served, why = served_label(engine, name)
        if served != name:
            log.warning(
                "scene engine ready with checkpoint %s in place of %s: %s", served, name, why
            )
        else:
            log.info("scene engine ready with checkpoint %s", name)
        core = cls(config, db, engine, served)
        try:
            await core._start_humour()
        except BaseException:
            await core.close(now=True)
            raise
        return core

    @classmethod
    async def _start_gateway(cls, config: Config) -> Core:
        from .queue import Gateway

        db = await open_database(config.database_url or config.db_path, timeout=config.db_timeout_s)
        try:
            stored = await db.get_state(CHECKPOINT_KEY)
            name, model = checkpoints.startup_model(
                stored, config.default_checkpoint, config.checkpoints_dir
            )
            gateway = await Gateway.connect(config, model)
            humour = await db.get_state(HUMOUR_KEY)
        except BaseException:
            await db.close()
            raise
        core = cls(config, db, gateway, name)
        core.queue, core.humour = gateway, humour or config.humour_model
        gateway.start(core)
        log.info("gateway %s: scenes are written by `python -m bot worker`", gateway.id)
        return core

    async def _start_humour(self) -> None:
        """The stored humour model, else HUMOUR_MODEL, else the shipped one; one that cannot
        be loaded is logged and the next is tried (ranking then falls back to coherence)."""
        stored = await self.db.get_state(HUMOUR_KEY)
        for name in dict.fromkeys(
            n for n in (stored, self.config.humour_model, checkpoints.HUMOUR_DEFAULT) if n
        ):
            try:
                self.engine.scorer = await asyncio.to_thread(
                    load_humour, name, self.config.checkpoints_dir, True
                )
            except (checkpoints.CheckpointError, HumourModelError) as e:
                log.warning("humour model %s not used: %s", name, e)
                continue
            self.humour = name
            log.info("best-of-n candidates ranked by humour model %s", name)
            return

    @staticmethod
    async def _start_engine(config: Config, model: str, loader=None) -> SceneEngine:
        forget_tuned_fallback()  # each start tries the tuned default's build again
        engine = SceneEngine(
            model=model,
            max_queue=config.max_queue,
            per_user_limit=config.per_user_limit,
            timeout_s=config.timeout_s,
            max_prompt_chars=MAX_PROMPT_CHARS,
            loader=loader or load_model,
            shutdown_timeout_s=max(0.0, config.shutdown_timeout_s - posting_margin(config)),
        )
        await engine.start()
        return engine

    async def submit(self, prompt: str, settings: SceneSettings, user_id: str | int):
        """A queued job (see sitcom.engine); EngineError subclasses carry polite messages.
        `user_id` should be platform-qualified ("slack:U1") so per-user limits never mix
        two platforms' ids."""
        if not self.accepting:
            raise EngineError("I'm shutting down for a moment; please try again shortly.")
        return await self.engine.submit(prompt, settings, user_id=str(user_id))

    def model_label(self, scene: Scene) -> str:
        """The checkpoint name of the model that wrote `scene` (not necessarily the active)."""
        return self._labels.get(scene.model_name, scene.model_name)

    async def record(
        self,
        scene: Scene,
        *,
        place: Place,
        user_id: str | int,
        prompt: str,
        note: str | None = None,
        claimed: bool = False,
        job_id: str | None = None,
    ) -> StoredScene:
        """Store a finished scene; `prompt` should be the cleaned one (job.prompt);
        `claimed`: for the caller to post (db.claim_posting), release it after; `job_id`:
        the queue job it was written for (a job stored already gets its scene back, see
        db.add_scene)."""
        return await self.db.add_scene(
            place=place,
            user_id=str(user_id),
            prompt=prompt,
            model_name=self.model_label(scene),
            lines=list(scene.lines),
            prompt_lines=min(scene.prompt_lines, len(scene.lines)),
            new_tokens=int(scene.new_tokens),
            seconds=float(scene.seconds),
            note=note,
            claimed=claimed,
            job_id=job_id,
        )

    # -- /scene, the same on every chat platform -------------------------------------------

    async def scene_command(
        self,
        *,
        place: Place,
        user_id: str,
        prompt: str,
        surface: Surface,
        acknowledge: Callable[[str], Awaitable[None]],
        update: Callable[[str], Awaitable[None]],
    ) -> None:
        """Queue (or re-post with `#ID`), acknowledge at once with the queue position, wait,
        store, post through `surface`, then update the acknowledgement with the outcome.
        Raises EngineError/DatabaseError/UsageError (a bad `#ID`) before acknowledging (the
        frontend answers them politely); after that every outcome goes into `update`. Texts
        are ready to send on `surface` (escaped there)."""
        scene_id = repost_id(prompt)
        if scene_id is not None:
            await self._repost(scene_id, place, surface, acknowledge, update)
            return
        if self.queue is not None:  # REDIS_URL: a worker writes it (bot.queue)
            await self.queue.scene_command(
                self,
                place=place,
                user_id=user_id,
                prompt=prompt,
                surface=surface,
                acknowledge=acknowledge,
                update=update,
            )
            return
        settings = await self.db.get_settings(place.platform, place.channel_id)
        user_key = f"{place.platform}:{user_id}"
        job = await self.submit(prompt, settings, user_key)
        try:
            await acknowledge(queue_text(job))
        except BaseException:  # nobody would ever see this scene: don't write it
            job.cancel()
            raise
        note = None
        for attempt in (1, 2):
            try:
                scene = await job.result()
                if scene.partial:  # cut at the time limit or by a shutdown: posted as it is
                    note = f"⏱️ {scene.note}"
            except EngineError as e:  # GenerationTimeout too: it wrote nothing by then
                await update(FAILED + surface.escape(str(e)))
                return
            if wrote_lines(scene):
                break
            # The model ended the scene right after the user's own lines: once more.
            log.info(
                "scene for %s: nothing written beyond the prompt (attempt %d)", user_key, attempt
            )
            if attempt == 2 or scene.partial:
                await update(
                    FAILED + "The model wrote nothing beyond your lines this time; "
                    "try again, perhaps with a different opening."
                )
                return
            try:
                job = await self.submit(job.prompt, settings, user_key)
            except EngineError as e:
                await update(FAILED + surface.escape(str(e)))
                return
        # Stored before it is posted: whatever happens next, the scene is not lost.
        stored = await self.record(
            scene, place=place, user_id=user_id, prompt=job.prompt, note=note, claimed=True
        )
        try:  # claimed for this posting: a `/scene #ID` meanwhile is told it is under way
            delivery = await self._deliver(stored, surface)
        finally:
            await self._release(stored.id)
        await update(self._outcome(stored, delivery, surface, scene))

    async def _repost(
        self,
        scene_id: int,
        place: Place,
        surface: Surface,
        acknowledge: Callable[[str], Awaitable[None]],
        update: Callable[[str], Awaitable[None]],
    ) -> None:
        """`/scene #ID`: post what of a stored scene is not out yet. Anyone who may use
        /scene in the scene's own channel may do it (it only finishes what its author asked
        for there); a scene that is out, or is being posted right now, is not posted again."""
        stored = await self.db.get_scene(scene_id)
        if (
            stored is None
            or stored.place.platform != place.platform
            or stored.place.channel_id != place.channel_id
        ):
            raise EngineError(f"There is no scene {scene_id} in this channel.")
        claim = await self.db.claim_posting(scene_id)  # one transaction: one poster
        if claim == "posted":
            raise EngineError(f"Scene {scene_id} is posted already; scroll up to vote.")
        if claim != "claimed":
            raise EngineError(
                f"Scene {scene_id} is being posted right now; it will be up in a moment."
            )
        try:
            stored = await self.db.get_scene(scene_id)  # what is out now, after the claim
            await acknowledge(f"🎬 Posting scene {scene_id} again…")
            delivery = await self._deliver(stored, surface)
        finally:
            await self._release(scene_id)
        await update(self._outcome(stored, delivery, surface))

    async def _release(self, scene_id: int) -> None:
        try:
            await self.db.release_posting(scene_id)
        except DatabaseError as e:  # the claim goes stale by itself (db.CLAIM_STALE)
            log.warning("could not release the posting claim on scene %d: %s", scene_id, e)

    async def _deliver(self, stored: StoredScene, surface: Surface) -> Delivery:
        return await deliver(self.db, stored, surface, self.retry)

    def _outcome(
        self, stored: StoredScene, delivery: Delivery, surface: Surface, scene=None
    ) -> str:
        if not delivery.posted:
            return (
                f"{FAILED}Scene {stored.id} is written and saved, but I couldn't post it: "
                f"{surface.escape(delivery.problem or 'unknown error')}. "
                f"Post it with `/scene #{stored.id}` once that is fixed."
            )
        where = surface.link(delivery.link, "here") if delivery.link else "in this channel"
        text = f"🎬 Scene {stored.id} is ready {where}"
        if scene is not None:
            text += (
                f" ({len(scene.lines)} lines, {scene.seconds:.1f} s, "
                f"{surface.escape(self.model_label(scene))})"
            )
        if delivery.reactions_problem:
            text += (
                f". I couldn't add the voting reactions: "
                f"{surface.escape(delivery.reactions_problem)}; react with "
                f"{surface.keycaps} on a line yourselves to vote"
            )
        return text + "."

    # -- /settings and /best: the texts to send, ready for the platform's markup -------------

    async def show_settings(
        self, place: Place, *, title: str = SETTINGS_TITLE, bold: str = "**"
    ) -> str:
        """`/settings show`: the channel's scene settings."""
        settings = await self.db.get_settings(place.platform, place.channel_id)
        return describe(settings, title, bold=bold)

    async def change_settings(
        self,
        place: Place,
        user_id: str,
        changes: dict[str, float],
        *,
        title: str = SETTINGS_TITLE,
        bold: str = "**",
    ) -> str:
        """`/settings set`: the channel's settings with `changes`, saved (the caller has
        checked the user may). UsageError (one line) for no change or a value out of range."""
        if not changes:
            raise UsageError(
                "Give at least one setting to change, e.g. `/settings set temperature 0.9`."
            )
        current = await self.db.get_settings(place.platform, place.channel_id)
        try:
            settings = current.with_changes(**changes)
        except ValueError as e:
            raise UsageError(str(e)) from None
        await self.db.save_settings(place, str(user_id), settings)
        return describe(settings, f"Saved. {title}", bold=bold)

    async def reset_settings(
        self, place: Place, *, title: str = SETTINGS_TITLE, bold: str = "**"
    ) -> str:
        """`/settings reset`: back to the defaults (the caller has checked the user may)."""
        await self.db.reset_settings(place.platform, place.channel_id)
        return describe(SceneSettings(), f"Reset. {title}", bold=bold)

    async def best_text(
        self,
        place: Place,
        *,
        channel_only: bool = False,
        where: str | None = None,
        escape: Callable[[str], str],
        bold: str = "**",
        keycaps: str = "1️⃣…🔟",
    ) -> str:
        """`/best`: the most-voted lines in `place`'s server/workspace (`where` names it in
        the title), or in its channel only."""
        channel = place.channel_id if channel_only else None
        rows = await self.db.best(place.platform, place.guild_id, channel)
        title = (
            "Best lines in this channel"
            if channel_only
            else f"Best lines in this {where}"
            if where
            else "Best lines"
        )
        return leaderboard(title, rows, escape=escape, bold=bold, keycaps=keycaps)

    # -- votes ------------------------------------------------------------------------------

    async def vote(
        self,
        *,
        platform: str,
        message_id: str,
        slot: int | None,
        user_id: str,
        add: bool,
        event_id: str | None = None,
        event_time: int | None = None,
    ) -> bool:
        """A keycap reaction added or removed on a scene message; True when it changed a
        vote. Unknown messages, other emoji and prompt lines are ignored; an `event_id`
        seen before (a redelivery) changes nothing; with `event_time` (when the reaction
        happened, integer microseconds), an event older than the latest one applied for
        this user and line (a late redelivery) changes nothing either."""
        if slot is None:
            return False
        line_id = await self.db.line_at(platform, message_id, slot)
        if line_id is None:
            return False
        event = (platform, event_id) if event_id else None
        if add:
            return await self.db.add_vote(str(user_id), line_id, event, event_time)
        return await self.db.remove_vote(str(user_id), line_id, event, event_time)

    def list_checkpoints(self) -> list[str]:
        return checkpoints.available(self.config.checkpoints_dir)

    def checkpoint_listing(self) -> list[str]:
        """One row per checkpoint, the active one marked (it may be an unlisted
        DEFAULT_CHECKPOINT, shown by its name), then one per humour model (they rank best-of-n
        candidates), the active one marked."""
        names = self.list_checkpoints()
        if self.checkpoint not in names:
            names.append(self.checkpoint)
        rows = [f"{n}  ← active" if n == self.checkpoint else n for n in names]
        humour = checkpoints.humour_available(self.config.checkpoints_dir)
        if self.humour not in humour:
            humour.append(self.humour)
        return rows + [
            f"humour model: {n}" + ("  ← active" if n == self.humour else "") for n in humour
        ]

    def is_humour_name(self, name: str) -> bool:
        """`/checkpoint use NAME` switches the humour model when NAME is one (and no writer)."""
        name = name.strip()
        return (
            name in checkpoints.humour_available(self.config.checkpoints_dir)
            and name not in self.list_checkpoints()
        )

    def check_checkpoint_name(self, name: str) -> None:
        """CheckpointError (user-facing) unless NAME is a listed checkpoint or humour model."""
        if not self.is_humour_name(name):
            checkpoints.resolve(name, self.config.checkpoints_dir)

    def switched_text(self, name: str, mark: str = "") -> str:
        """What the admin is told after `/checkpoint use NAME`; `mark` wraps the name
        (e.g. "`" for code on Discord and Slack; the name must need no escaping there)."""
        if name == self.humour and self.is_humour_name(name):
            if name == checkpoints.HUMOUR_OFF:
                return "Best-of-n candidates are now ranked by the coherence checks alone."
            return f"Best-of-n candidates are now ranked by the humour model {mark}{name}{mark}."
        return f"Scenes are now written by {mark}{name}{mark}."

    async def use_humour(self, name: str) -> str:
        """Rank best-of-n candidates with another humour model (or `off`) and remember it."""
        try:
            scorer = await asyncio.to_thread(load_humour, name, self.config.checkpoints_dir)
        except HumourModelError as e:
            raise checkpoints.CheckpointError(f"That humour model cannot be used: {e}") from None
        name = name.strip()
        await self.db.set_state(HUMOUR_KEY, name)
        self.engine.scorer, self.humour = scorer, name
        return name

    async def use_checkpoint(self, name: str) -> str:
        self._switching += 1
        try:
            served = await self._use_checkpoint(name)
        finally:
            self._switching -= 1
        if self.queue is not None:  # the workers load it (they read the database's choice)
            await self.queue.announce()
        return served

    async def _use_checkpoint(self, name: str) -> str:
        """Swap the engine to a listed checkpoint and remember it; returns the name of what
        is served (the base's, when the tuned default could not be used: the log says why).

        Both or neither: when the choice cannot be stored (a busy database), the old model
        is swapped back before the error is reported.
        """
        if self.is_humour_name(name):
            return await self.use_humour(name)
        model = checkpoints.resolve(name, self.config.checkpoints_dir)
        name = model if model in checkpoints.BUILT_IN else name.strip()
        previous = self.engine.model_name
        self._labels[model] = name  # scenes may be written by it as soon as the swap lands
        forget_tuned_fallback()  # a swap to the tuned default tries its build again
        try:
            await self.engine.swap(model)  # ModelLoadError leaves the old model running
        except ModelLoadError as e:  # said in chat: the name, not where the files are
            log.warning("checkpoint %s (%s) failed to load: %s", name, model, e)
            raise ModelLoadError(str(e).replace(model, name)) from e
        served, why = served_label(self.engine, name)
        if served != name:
            log.warning("serving %s in place of %s: %s", served, name, why)
        self._labels[model] = served
        try:
            await self.db.set_state(CHECKPOINT_KEY, name)  # the choice: tried again at a restart
        except DatabaseError:
            try:
                await self.engine.swap(previous)
            except ModelLoadError:  # the new one stays; say so truthfully in the listing
                log.exception("could not swap back to %s after a failed switch", previous)
                self.checkpoint = served
            raise
        self.checkpoint = served
        return served

    # -- one process per connection -----------------------------------------------------

    async def hold_lease(
        self, scope: str, shard: tuple[int, int], *, on_lost: Callable[[str], object] | None = None
    ) -> None:
        """hold_leases for one shard."""
        await self.hold_leases(scope, [shard], on_lost=on_lost)

    async def hold_leases(
        self,
        scope: str,
        shards: Sequence[tuple[int, int]],
        *,
        on_lost: Callable[[str], object] | None = None,
    ) -> None:
        """Take the database lease on `scope` for each of `shards` (id, count) for this
        process, all or none (raises LeaseHeld, naming the holder's host and pid, when a
        live other process has one of them: those taken already are given back), renew
        them in the background until close(), then release them. Should another process
        take one over (this one stalled past lease_ttl_s), `on_lost` is called with a
        one-line reason: the caller stops serving."""
        who = {"host": socket.gethostname(), "pid": os.getpid()}
        shards = sorted(set(shards))  # one order for every process: no two take half each
        taken: list[tuple[int, int]] = []

        async def release(held: Sequence[tuple[int, int]]) -> None:
            for shard in held:
                try:
                    await self.db.release_lease(scope, shard, **who)
                except DatabaseError as e:  # it expires by itself
                    log.warning("could not release the lease on %s: %s", scope, e)

        try:
            for shard in shards:
                await self.db.acquire_lease(scope, shard, ttl_s=self.lease_ttl_s, **who)
                taken.append(shard)
        except DatabaseError:
            await release(taken)
            raise

        async def renew() -> None:
            try:
                while True:
                    await asyncio.sleep(self.lease_ttl_s / 3)
                    try:
                        for shard in shards:
                            await self.db.acquire_lease(scope, shard, ttl_s=self.lease_ttl_s, **who)
                        await self._follow_checkpoint()
                    except LeaseHeld as e:
                        log.error("lost the lease: %s", e)
                        await release(shards)  # the rest: only rows still ours go
                        if on_lost is not None:
                            on_lost(str(e))
                        return
                    except DatabaseError as e:  # busy: the next renewal is well in time
                        log.warning("could not renew the lease on %s: %s", scope, e)
            except asyncio.CancelledError:
                await release(shards)
                raise

        self._leases[(scope, tuple(shards))] = asyncio.create_task(renew(), name=f"lease {scope}")

    async def _follow_checkpoint(self) -> None:
        """Processes on other shards share this database: a checkpoint one of them switched
        to is picked up here (at each lease renewal), so every shard writes with it."""
        stored = await self.db.get_state(CHECKPOINT_KEY)
        if stored in (None, self.checkpoint, self._unfollowable) or self._switching:
            return
        try:
            model = checkpoints.resolve(stored, self.config.checkpoints_dir)
            self._labels[model] = stored
            await self.engine.swap(model)
        except (checkpoints.CheckpointError, ModelLoadError) as e:
            log.warning("cannot switch to checkpoint %s like another process did: %s", stored, e)
            self._unfollowable = stored  # not again every renewal
            return
        self.checkpoint = stored
        log.info("switched to checkpoint %s, chosen in another process", stored)

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
            # never wait for itself: a command's own task may be the one closing
            posting = {t for t in posting if t is not asyncio.current_task()}
            self._closing = asyncio.ensure_future(self._close(posting, now))
        await asyncio.shield(self._closing)

    async def _close(self, posting: set[asyncio.Task], now: bool) -> None:
        loop = asyncio.get_running_loop()
        end = loop.time() + self.config.shutdown_timeout_s
        try:
            await self.engine.close(deadline_s=0 if now else None)
            if posting:
                await asyncio.wait(posting, timeout=max(1.0, end - loop.time()))
        finally:
            for task in self._leases.values():  # released before the database closes
                task.cancel()
            await asyncio.gather(*self._leases.values(), return_exceptions=True)
            if self.queue is not None:
                await self.queue.aclose()
            await self.db.close()


def load_humour(name: str, checkpoints_dir, operator: bool = False) -> HumourModel | None:
    """A humour model by its listed name (`humour`: the shipped one, `off`: None); with
    `operator` (HUMOUR_MODEL) also a directory path. CheckpointError / HumourModelError
    (one line) when it is not there or cannot be read."""
    name = name.strip()
    if name == checkpoints.HUMOUR_OFF:
        return None
    if name == checkpoints.HUMOUR_DEFAULT:
        return load_default()
    if name in checkpoints.humour_available(checkpoints_dir):
        return HumourModel.load(checkpoints_dir / name)
    if operator and ("/" in name or name.startswith(".")):
        return HumourModel.load(name)
    shown = name if len(name) <= 40 else name[:40] + "…"
    raise checkpoints.CheckpointError(
        f"There is no humour model called `{shown}`; try /checkpoint list."
    )


def served_label(engine: SceneEngine, name: str) -> tuple[str, str | None]:
    """What `name` is served as, from the engine's own account (sitcom.model.serving.Served):
    the base's name when the tuned default fell back to it, and why; else `name`."""
    served = engine.served
    if served is not None and served.fell_back:
        return served.label, served.why
    return name, None


def wrote_lines(scene: Scene) -> bool:
    """Whether the model wrote anything beyond the user's own opening lines."""
    return len(scene.lines) > scene.prompt_lines


def posting_margin(config: Config) -> float:
    """Seconds of SHUTDOWN_TIMEOUT_S kept for storing and posting the scenes the engine
    delivers at its deadline (the rest is the engine's)."""
    return min(5.0, config.shutdown_timeout_s / 5)
