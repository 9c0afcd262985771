"""The humour model: the chance that a script line gets a laugh, given the lines before it.

A logistic regression over features that are cheap to compute from text (hashed words and
word pairs of the line and of the line before, its length and punctuation, question and
answer, words taken up again from earlier lines, the speaker). Serving needs numpy only: a
scene of ~50 lines scores in about 2 ms on one core. `training/humour.py` fits it
on the studio audience's laughs of `seinfeld-laugh-corpus` and updates it with the bot's votes.

A model is a directory holding `card.json` (format, version, sizes, how it was trained and
measured) and `weights.npz` (the weights, float arrays; no pickles).
"""

from __future__ import annotations

import json
import math
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sitcom.scenes.script import HEADING_RE, MAIN_CHARACTERS, TURN_RE

FORMAT = "sitcom-humour"
VERSION = 1
CARD_FILE = "card.json"
WEIGHTS_FILE = "weights.npz"
DEFAULT_DIR = Path(__file__).resolve().parent.parent / "humour_default"

# The dense features, in the order of the model's `dense` weights.
DENSE_FEATURES: tuple[str, ...] = (
    "log_words",  # log(1 + words in the speech)
    "log_chars",  # log(1 + characters)
    "sentences",  # sentence ends (. ? !), at most 6
    "questions",  # '?' count, at most 3
    "exclaims",  # '!' count, at most 3
    "ellipses",  # '...' or '--' count, at most 3
    "ends_question",  # the line ends with '?'
    "quotes",  # quotes something ("...")
    "prev_ends_question",  # it answers a question
    "prev_log_words",  # length of the line before
    "first_turn",  # no line before it in this scene
    "prev_overlap",  # share of its content words the line before used too
    "repeat_bigram",  # takes up a word pair of the line before
    "callback",  # content words from earlier lines (not the one before), at most 3
    "back_and_forth",  # the speaker of two lines ago speaks again (A B A)
    "main_cast",  # one of the main four speaks
)

_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z]+)*|\.\.\.|--|[?!]")
_STOPWORDS = frozenset(
    "the a an and or but if of to in on at for with from by is are was were be been am i you "
    "he she it we they me him her us them my your his its our their this that these those "
    "what who how why when where there here do does did don't not no yes so just oh well "
    "yeah okay ok hey all can i'm you're it's that's gonna get got have has had will would "
    "could should about like know what's out up one".split()
)
_CALLBACK_WINDOW = 20  # earlier lines searched for a callback
_ARRAYS = ("hashed", "dense", "mean", "std", "bias")


class HumourModelError(ValueError):
    """A model directory that cannot be used; str(e) is one line."""


@dataclass(frozen=True)
class LineFeatures:
    """Features of the dialogue lines of a script: `rows[i]` is the index of the i-th
    dialogue line in the input, `hashed[i]` its active hash buckets, `dense[i]` the rest."""

    rows: list[int]
    hashed: list[np.ndarray]
    dense: np.ndarray  # (len(rows), len(DENSE_FEATURES)) float32


def tokens(speech: str) -> list[str]:
    return _TOKEN_RE.findall(speech.lower())


def _bucket(feature: str, dim: int) -> int:
    return zlib.crc32(feature.encode("utf-8")) % dim


def _content(words: list[str]) -> set[str]:
    return {w for w in words if len(w) > 2 and w[0].isalpha() and w not in _STOPWORDS}


def _speaker_tag(speaker: str) -> str:
    return speaker if speaker in MAIN_CHARACTERS else "OTHER"


def featurize(lines: list[str], dim: int) -> LineFeatures:
    """Features of every dialogue line (`SPEAKER: speech`) given the lines before it.

    A scene heading starts a new scene (nothing before it counts); stage directions and
    other lines are skipped and get no row."""
    rows: list[int] = []
    hashed: list[np.ndarray] = []
    dense: list[list[float]] = []
    history: list[tuple[str, list[str], set[str]]] = []  # (speaker, tokens, content words)
    for i, line in enumerate(lines):
        line = line.strip()
        if HEADING_RE.match(line):
            history = []
            continue
        m = TURN_RE.match(line)
        if not m:
            continue
        speaker, speech = m.group("speaker").strip(), m.group("speech")
        words = tokens(speech)
        content = _content(words)
        tag = _speaker_tag(speaker)
        feats = {f"s:{tag}"}
        feats.update(f"w:{w}" for w in words)
        padded = ["<s>", *words, "</s>"]
        pairs = set(zip(padded, padded[1:], strict=False))
        feats.update(f"b:{a} {b}" for a, b in pairs)
        feats.update(f"e:{w}" for w in words[-3:])
        if history:
            prev_speaker, prev_words, prev_content = history[-1]
            feats.add(f"ss:{_speaker_tag(prev_speaker)}>{tag}")
            feats.update(f"p:{w}" for w in prev_words)
            prev_padded = ["<s>", *prev_words, "</s>"]
            prev_pairs = set(zip(prev_padded, prev_padded[1:], strict=False))
            prev_overlap = len(content & prev_content) / len(content) if content else 0.0
            repeat = float(
                any(a[0] != "<s>" and b != "</s>" and (a, b) in prev_pairs for a, b in pairs)
            )
            prev_q = float(bool(prev_words) and prev_words[-1] == "?")
            prev_len = math.log1p(len(prev_words))
            earlier: set[str] = set()
            for _, _, c in history[-_CALLBACK_WINDOW:-1]:
                earlier |= c
            callback = float(min(3, len((content & earlier) - prev_content)))
            back = float(
                len(history) >= 2 and history[-2][0] == speaker and prev_speaker != speaker
            )
            first = 0.0
        else:
            prev_overlap = repeat = prev_q = prev_len = callback = back = 0.0
            first = 1.0
        row = [
            math.log1p(len(words)),
            math.log1p(len(speech)),
            float(min(6, len(re.findall(r"[.?!]+(?:\s|$)", speech)))),
            float(min(3, speech.count("?"))),
            float(min(3, speech.count("!"))),
            float(min(3, speech.count("...") + speech.count("--"))),
            float(bool(words) and words[-1] == "?"),
            float('"' in speech),
            prev_q,
            prev_len,
            first,
            prev_overlap,
            repeat,
            callback,
            back,
            float(tag != "OTHER"),
        ]
        rows.append(i)
        hashed.append(np.fromiter(sorted({_bucket(f, dim) for f in feats}), dtype=np.int64))
        dense.append(row)
        history.append((speaker, words, content))
    array = np.asarray(dense, dtype=np.float32).reshape(len(rows), len(DENSE_FEATURES))
    return LineFeatures(rows, hashed, array)


def _sigmoid(z: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-np.clip(z, -30.0, 30.0)))


class HumourModel:
    """Hashed-feature logistic regression; see the module docstring."""

    def __init__(
        self,
        hashed: np.ndarray,
        dense: np.ndarray,
        mean: np.ndarray,
        std: np.ndarray,
        bias: float,
        card: dict,
        name: str,
    ) -> None:
        self.hashed = np.asarray(hashed, dtype=np.float32)
        self.dense = np.asarray(dense, dtype=np.float32)
        self.mean = np.asarray(mean, dtype=np.float32)
        self.std = np.asarray(std, dtype=np.float32)
        self.bias = float(bias)
        self.card = card
        self.name = name

    @property
    def dim(self) -> int:
        return int(self.hashed.shape[0])

    def logits(self, features: LineFeatures) -> np.ndarray:
        sparse = np.array([self.hashed[idx].sum() for idx in features.hashed], dtype=np.float32)
        scaled = (features.dense - self.mean) / self.std
        return sparse + scaled @ self.dense + self.bias

    def line_scores(self, lines: list[str]) -> list[float]:
        """For each line, the probability it gets a laugh given the lines before it;
        0.0 for lines that are not dialogue (scene headings, stage directions)."""
        scores = [0.0] * len(lines)
        features = featurize(lines, self.dim)
        if features.rows:
            for row, p in zip(features.rows, _sigmoid(self.logits(features)), strict=True):
                scores[row] = float(p)
        return scores

    # -- files ---------------------------------------------------------------------------

    def save(self, path: str | Path) -> None:
        """Write card.json and weights.npz into `path` (created if missing)."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        np.savez_compressed(
            path / WEIGHTS_FILE,
            hashed=self.hashed.astype(np.float16),
            dense=self.dense,
            mean=self.mean,
            std=self.std,
            bias=np.array([self.bias], dtype=np.float32),
        )
        card = dict(self.card)
        card.update(
            format=FORMAT,
            version=VERSION,
            name=self.name,
            dim=self.dim,
            dense_features=list(DENSE_FEATURES),
        )
        (path / CARD_FILE).write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")

    @classmethod
    def load(cls, path: str | Path) -> HumourModel:
        path = Path(path)
        if not path.is_dir():
            raise HumourModelError(f"humour model {path}: no such directory")
        try:
            card = json.loads((path / CARD_FILE).read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise HumourModelError(f"humour model {path}: {CARD_FILE} is missing") from None
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise HumourModelError(f"humour model {path}: {CARD_FILE} is damaged ({e})") from None
        if not isinstance(card, dict) or card.get("format") != FORMAT:
            raise HumourModelError(f"humour model {path}: {CARD_FILE} is not a {FORMAT} card")
        if card.get("version") != VERSION:
            raise HumourModelError(
                f"humour model {path}: unknown version {card.get('version')!r} "
                f"(this code reads version {VERSION})"
            )
        if card.get("dense_features") != list(DENSE_FEATURES):
            raise HumourModelError(
                f"humour model {path}: made for other features than this code computes"
            )
        dim = card.get("dim")
        if not isinstance(dim, int) or dim <= 0:
            raise HumourModelError(f"humour model {path}: bad dim {dim!r} in {CARD_FILE}")
        try:
            with np.load(path / WEIGHTS_FILE, allow_pickle=False) as arrays:
                absent = [k for k in _ARRAYS if k not in arrays.files]
                if absent:
                    raise HumourModelError(
                        f"humour model {path}: {WEIGHTS_FILE} lacks the array {absent[0]!r}"
                    )
                weights = {k: arrays[k] for k in _ARRAYS}
        except HumourModelError:
            raise
        except FileNotFoundError:
            raise HumourModelError(f"humour model {path}: {WEIGHTS_FILE} is missing") from None
        except Exception as e:  # zipfile.BadZipFile, ValueError, OSError, EOFError...
            raise HumourModelError(
                f"humour model {path}: {WEIGHTS_FILE} is damaged ({type(e).__name__})"
            ) from None
        k = len(DENSE_FEATURES)
        expected = {"hashed": (dim,), "dense": (k,), "mean": (k,), "std": (k,), "bias": (1,)}
        for key, shape in expected.items():
            if weights[key].shape != shape or not np.issubdtype(weights[key].dtype, np.floating):
                raise HumourModelError(
                    f"humour model {path}: {key} has shape {weights[key].shape}, "
                    f"expected float {shape}"
                )
            if not np.all(np.isfinite(weights[key])):
                raise HumourModelError(f"humour model {path}: {key} holds non-finite values")
        if np.any(weights["std"] <= 0):
            raise HumourModelError(f"humour model {path}: std must be positive")
        name = card.get("name") if isinstance(card.get("name"), str) else path.name
        return cls(
            weights["hashed"],
            weights["dense"],
            weights["mean"],
            weights["std"],
            float(weights["bias"][0]),
            card,
            name,
        )


def load_default() -> HumourModel:
    """The shipped model, trained on the laugh corpus (see humour_default/README.md)."""
    return HumourModel.load(DEFAULT_DIR)
