"""Near-duplicate pages: the same episode transcribed or posted twice.

Jaccard similarity over word shingles of the cleaned turns; datasketch's MinHash would do
this for millions of documents, but a couple of hundred pages compare exactly in a second.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence

SHINGLE_WORDS = 5


def shingles(lines: Sequence[str], k: int = SHINGLE_WORDS) -> frozenset[tuple[str, ...]]:
    words = re.findall(r"[a-z0-9']+", " ".join(lines).lower())
    return frozenset(tuple(words[i : i + k]) for i in range(max(len(words) - k + 1, 0)))


def jaccard(a: frozenset, b: frozenset) -> float:
    return len(a & b) / len(a | b) if a or b else 0.0


def find_duplicates(
    episodes: Mapping[str, Sequence[str]], threshold: float = 0.6, demote: Collection[str] = ()
) -> dict[str, tuple[str, float]]:
    """{duplicate page: (page it duplicates, similarity)}; the page with more lines is kept,
    except that pages in `demote` (cut-down self-repeating pages) lose to any other.

    Ties keep the first name in sorted order, so the result does not depend on input order.
    """
    order = sorted(episodes, key=lambda name: (name in demote, -len(episodes[name]), name))
    sets = {name: shingles(episodes[name]) for name in order}
    dupes: dict[str, tuple[str, float]] = {}
    for i, name in enumerate(order):
        if name in dupes:
            continue
        for other in order[i + 1 :]:
            if other in dupes:
                continue
            # Cheap bound: Jaccard can't exceed the size ratio.
            small, big = sorted((len(sets[name]), len(sets[other])))
            if big and small / big < threshold:
                continue
            score = jaccard(sets[name], sets[other])
            if score >= threshold:
                dupes[other] = (name, round(score, 3))
    return dupes
