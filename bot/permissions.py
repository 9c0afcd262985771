"""Who may do what, the same rules on every platform; frontends only supply the facts
(is the user a channel manager / workspace admin, the app's owner) from their own API."""

from __future__ import annotations

from .config import Config


class NotAllowed(Exception):
    """str(e) is the polite refusal shown to the user (ephemerally)."""


def check_settings(user_id: str | int, *, platform_admin: bool, config: Config, needs: str) -> None:
    """Changing a channel's settings: the platform's managers (`needs` names that role,
    e.g. "the Manage Channels permission") or anyone in ADMIN_USER_IDS."""
    if platform_admin or str(user_id) in config.admin_user_ids:
        return
    raise NotAllowed(f"You need {needs} to change this channel's scene settings.")


def check_checkpoint(user_id: str | int, *, owner: bool, config: Config) -> None:
    """Switching checkpoints: ADMIN_USER_IDS (and the Discord application's owner)."""
    if owner or str(user_id) in config.admin_user_ids:
        return
    raise NotAllowed("Only the bot's admins can switch checkpoints.")
