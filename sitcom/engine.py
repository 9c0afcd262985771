"""The scene engine: a Discord-free core any chat frontend (Discord, console, Slack) uses.

API CONTRACT (frontends code against this; the implementation may change):

    engine = SceneEngine(model="smollm2" | checkpoint dir | hub id,
                         max_queue=32, per_user_limit=2, timeout_s=120.0, max_batch=8)
    await engine.start()                      # loads the model off the event loop
    job = await engine.submit(prompt, settings, user_id="123")   # SceneSettings
        # raises QueueFull / TooManyPending / BadPrompt (user-facing messages)
    job.position                              # 1-based place in the queue when submitted
    async for partial in job.stream(): ...    # optional: partial Scene snapshots
    scene = await job.result()                # Scene; raises GenerationTimeout / EngineError
    scene.lines                               # clean script lines, prompt lines first
    scene.text, scene.new_tokens, scene.seconds, scene.model_name
    await engine.swap(model)                  # hot swap; raises ModelLoadError, old stays
    engine.model_name                         # name of the active model
    await engine.close()                      # stop taking jobs, finish/cancel, join thread
"""

from __future__ import annotations


class EngineError(RuntimeError):
    """Base class; str(e) is a polite, user-facing one-liner."""


class QueueFull(EngineError):
    pass


class TooManyPending(EngineError):
    pass


class BadPrompt(EngineError):
    pass


class GenerationTimeout(EngineError):
    pass
