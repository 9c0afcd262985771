"""Seeded train/validation split by episode, keeping multi-part episodes together."""

from __future__ import annotations

import random
import re
from collections import defaultdict
from collections.abc import Iterable

# `TheTrip1` / `TheTrip2`, `ThePilot` / `ThePilot2`, `The-Clip-Show-1`, `Finale (Part 2)`;
# a single digit, so `Ep12` is not part 2 of `Ep1`.
_PART_RE = re.compile(r"[\s_\-]*(?:\(?\s*part\s*)?\(?(?<!\d)\d\)?$", re.I)
MAX_PARTS = 3  # more pages on one base name are numbered episodes (`Ep1` ... `Ep9`), not parts


def episode_group(name: str) -> str:
    """The episode a page belongs to: its file stem without a trailing part number."""
    stem = re.sub(r"\.[A-Za-z0-9]{1,5}$", "", name)
    return _PART_RE.sub("", stem).lower() or stem.lower()


def episode_groups(names: Iterable[str]) -> dict[str, list[str]]:
    """{group: pages}; a base name shared by more than MAX_PARTS pages is not a multi-part."""
    groups: dict[str, list[str]] = defaultdict(list)
    for name in sorted(names):
        groups[episode_group(name)].append(name)
    out: dict[str, list[str]] = {}
    for key, members in groups.items():
        if len(members) > MAX_PARTS:
            out.update({name.lower(): [name] for name in members})
        else:
            out[key] = members
    return out


def split_episodes(
    names: Iterable[str], val_fraction: float = 0.05, seed: int = 0
) -> dict[str, str]:
    """{page name: "train" | "val"}; about val_fraction of the pages go to validation."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val fraction must be in [0, 1), got {val_fraction}")
    groups = episode_groups(names)
    keys = sorted(groups)
    random.Random(seed).shuffle(keys)
    total = sum(len(v) for v in groups.values())
    want = round(total * val_fraction)
    if val_fraction > 0 and total >= 2:
        want = max(want, 1)  # a tiny corpus still gets something to validate on
    split: dict[str, str] = {}
    taken = 0
    for key in keys:
        side = "val" if taken < want and taken + len(groups[key]) < total else "train"
        taken += len(groups[key]) if side == "val" else 0
        for name in groups[key]:
            split[name] = side
    return split
