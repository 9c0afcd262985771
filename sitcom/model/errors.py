"""The one error every model lookup, load and conversion raises: its message is user-facing
(one line), so the frontends show it as it is. Its own module so that the model modules can
all raise it without importing one another (catalog imports lora_gguf)."""

from __future__ import annotations


class ModelLoadError(RuntimeError):
    """A model name or directory that cannot be loaded; the message is user-facing."""
