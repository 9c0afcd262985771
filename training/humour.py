"""Train the humour model (sitcom/scenes/humour.py) on real laughter, and update it with votes.

Laughs: PyPI `seinfeld-laugh-corpus` (MIT) holds 96 episodes as `.merged` files: subtitle
fragments under `# SPEAKER` headers, each with its start and end time, and `**LOL**` where the
studio audience laughs. The fragments of one speaker up to the next speaker make a turn; a
turn is funny when a laugh falls in it or right after it, before the next turn. Files are
read with the package's own parser (`Screenplay.from_file`, standard library only), but not
through `seinfeld_laugh_corpus.corpus.load()`: importing that module sets the root logger
to DEBUG and `load()` prints and skips a file it cannot read instead of failing.
This corpus trains the humour model only; the LM's text stays the transcripts.

Episodes are split for evaluation by episode (held-out fraction 0.2, fixed seed); the model
is fitted on the training episodes and its held-out ROC AUC is reported next to baselines.

Votes: in the bot's database, the generated lines of a stored scene that got votes are
positives (weighted by their votes), its other generated lines negatives; the prompt's lines
are context only. The update starts from a model (default: the shipped one) and stays close
to it: an L2 pull towards its weights, and, when the laugh corpus is installed, its training
episodes rehearsed next to the votes. So it still scores the laugh corpus sensibly while
ranking what the users voted for higher.
"""

from __future__ import annotations

import importlib.util
import re
import shutil
import sqlite3
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from sitcom.files import publish_dir
from sitcom.scenes.humour import (
    DEFAULT_DIR,
    DENSE_FEATURES,
    HumourModel,
    featurize,
)
from sitcom.scenes.script import HEADING_RE

DIM = 2**18  # hash buckets
L2 = 3e-3  # chosen on a split of the training episodes (see the default's card)
VOTE_SHARE = 0.3  # votes: their weight next to the rehearsed laugh corpus (1.0)
ANCHOR = 0.2  # votes without the corpus at hand: L2 pull towards the init model's weights
HELD_OUT = 0.2
STEPS = 300
VOTE_STEPS = 200
SCENE_GAP = 8.0  # seconds without speech taken for a scene change
SCENE_BREAK = "[Scene: (a pause in the subtitles)]"


class HumourTrainError(ValueError):
    """Bad input to the humour training; str(e) is one line."""


# -- the laugh corpus ----------------------------------------------------------------------


@dataclass
class Episode:
    name: str
    lines: list[str]  # `SPEAKER: speech` turns and scene headings
    labels: list[int]  # 1: the audience laughed in or right after it; -1: a heading


def corpus_dir() -> Path:
    """The `.merged` files of the installed seinfeld-laugh-corpus package."""
    spec = importlib.util.find_spec("seinfeld_laugh_corpus")
    if spec is None or not spec.submodule_search_locations:
        raise HumourTrainError(
            "the laugh corpus is not installed: pip install seinfeld-laugh-corpus"
        )
    return Path(next(iter(spec.submodule_search_locations))) / "the_corpus"


def _speaker(name: str) -> str:
    """A corpus speaker as a script speaker: `UNCLELEO` stays, odd characters go."""
    cleaned = re.sub(r"[^A-Z0-9.'#&\- ]", "", name.upper()).strip()
    cleaned = re.sub(r"^[^A-Z]+", "", cleaned)
    return cleaned[:40] or "SOMEONE"


def _seconds(value, default: float = 0.0) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        return default


def episode_turns(items: Sequence, scene_gap: float = SCENE_GAP) -> tuple[list[str], list[int]]:
    """Script lines and laugh labels (1 / 0; -1 for a scene heading) from the package's
    Line / Laugh sequence. Subtitles have no scenes: a pause of over `scene_gap` seconds
    between two fragments is taken for a scene change and gets a heading."""
    lines: list[str] = []
    labels: list[int] = []
    speaker = None
    parts: list[str] = []
    funny = 0
    last_end = None

    def close() -> None:
        text = " ".join(parts).strip()
        if speaker is not None and text:
            lines.append(f"{speaker}: {text}")
            labels.append(funny)

    for item in items:
        if not hasattr(item, "character"):  # a Laugh
            if speaker is not None:
                funny = 1
            continue
        who = _speaker(item.character)
        pause = last_end is not None and _seconds(item.start) - last_end > scene_gap
        last_end = _seconds(item.end, _seconds(item.start))
        if pause:
            close()
            speaker, parts, funny = None, [], 0
            lines.append(SCENE_BREAK)
            labels.append(-1)
        if who != speaker:
            close()
            speaker, parts, funny = who, [], 0
        text = " ".join(str(item.txt).split())
        if text:
            parts.append(text)
    close()
    return lines, labels


def load_laugh_corpus(folder: Path | None = None) -> list[Episode]:
    """Every `.merged` episode in `folder` (default: the installed package's), by name."""
    folder = corpus_dir() if folder is None else Path(folder)
    if importlib.util.find_spec("seinfeld_laugh_corpus") is None:
        raise HumourTrainError(
            "the laugh corpus parser is not installed: pip install seinfeld-laugh-corpus"
        )
    from seinfeld_laugh_corpus.humor_recogniser.screenplay import Screenplay

    if not folder.is_dir():
        raise HumourTrainError(f"laugh corpus {folder}: no such directory")
    files = sorted(folder.glob("*.merged"))
    if not files:
        raise HumourTrainError(f"laugh corpus {folder}: no .merged files")
    episodes = []
    for file in files:
        try:
            screenplay = Screenplay.from_file(str(file))
        except Exception as e:  # the package's parser raises whatever it hits
            raise HumourTrainError(
                f"laugh corpus {file.name}: cannot parse ({type(e).__name__}: {e})"
            ) from None
        lines, labels = episode_turns(screenplay.lines)
        if lines:
            episodes.append(Episode(file.stem, lines, labels))
    if not episodes:
        raise HumourTrainError(f"laugh corpus {folder}: no turns in any episode")
    return episodes


def split_episodes(
    names: Sequence[str], seed: int, held_out: float = HELD_OUT
) -> tuple[list[str], list[str]]:
    """(train, held-out) episode names: a seeded shuffle of the sorted names."""
    ordered = sorted(names)
    order = np.random.default_rng(seed).permutation(len(ordered))
    n_test = max(1, round(held_out * len(ordered))) if len(ordered) > 1 else 0
    test = sorted(ordered[i] for i in order[:n_test])
    train = sorted(ordered[i] for i in order[n_test:])
    return train, test


# -- metrics -------------------------------------------------------------------------------


def roc_auc(labels: Sequence[int] | np.ndarray, scores: Sequence[float] | np.ndarray) -> float:
    """Area under the ROC curve (ties count half): the chance a random positive outscores
    a random negative. nan when one class is missing."""
    y = np.asarray(labels, dtype=np.float64)
    s = np.asarray(scores, dtype=np.float64)
    n_pos = float(y.sum())
    n_neg = float(len(y) - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(s, kind="mergesort")
    sorted_s = s[order]
    ranks = np.empty(len(s), dtype=np.float64)
    # average ranks over ties
    boundaries = np.flatnonzero(np.diff(sorted_s)) + 1
    starts = np.concatenate(([0], boundaries))
    ends = np.concatenate((boundaries, [len(s)]))
    for a, b in zip(starts, ends, strict=True):
        ranks[order[a:b]] = (a + b + 1) / 2.0
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2.0) / (n_pos * n_neg))


# -- data as matrices ----------------------------------------------------------------------


@dataclass
class Examples:
    """Dialogue lines as a sparse (hashed) + dense design, with labels and weights."""

    indptr: np.ndarray
    indices: np.ndarray
    dense: np.ndarray
    labels: np.ndarray
    weights: np.ndarray
    position: np.ndarray = field(default_factory=lambda: np.zeros(0))  # turn no. in script
    scene_position: np.ndarray = field(default_factory=lambda: np.zeros(0))  # ... in scene

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def row_of(self) -> np.ndarray:
        return np.repeat(np.arange(len(self)), np.diff(self.indptr))


def examples(
    scripts: Sequence[tuple[list[str], dict[int, tuple[int, float]]]], dim: int
) -> Examples:
    """Scripts with labels: each is (lines, {line index: (label, weight)}); lines without
    a label are context only."""
    hashed, dense, labels, weights, position, scene_position = [], [], [], [], [], []
    for lines, labelled in scripts:
        feats = featurize(lines, dim)
        in_scene, count, dialogue = {}, 0, set(feats.rows)
        for i, line in enumerate(lines):
            if HEADING_RE.match(line.strip()):
                count = 0
            elif i in dialogue:
                in_scene[i], count = count, count + 1
        for k, row in enumerate(feats.rows):
            if row in labelled:
                label, weight = labelled[row]
                hashed.append(feats.hashed[k])
                dense.append(feats.dense[k])
                labels.append(label)
                weights.append(weight)
                position.append(k)
                scene_position.append(in_scene[row])
    if not labels:
        raise HumourTrainError("no labelled dialogue lines")
    indptr = np.concatenate(([0], np.cumsum([len(h) for h in hashed]))).astype(np.int64)
    return Examples(
        indptr,
        np.concatenate(hashed).astype(np.int64),
        np.asarray(dense, dtype=np.float32),
        np.asarray(labels, dtype=np.float64),
        np.asarray(weights, dtype=np.float64),
        np.asarray(position, dtype=np.float64),
        np.asarray(scene_position, dtype=np.float64),
    )


def episode_examples(episodes: Sequence[Episode], dim: int) -> Examples:
    return examples(
        [(e.lines, {i: (y, 1.0) for i, y in enumerate(e.labels) if y >= 0}) for e in episodes], dim
    )


# -- fitting -------------------------------------------------------------------------------


def _logits(
    data: Examples, w: np.ndarray, v: np.ndarray, b: float, scaled: np.ndarray
) -> np.ndarray:
    sparse = np.bincount(data.row_of, weights=w[data.indices], minlength=len(data))
    return sparse + scaled @ v + b


def fit(
    data: Examples,
    dim: int,
    *,
    l2: float = L2,
    steps: int = STEPS,
    lr: float = 0.05,
    init: HumourModel | None = None,
    card: dict | None = None,
    name: str = "humour",
) -> HumourModel:
    """Weighted logistic regression by full-batch Adam.

    Without `init`: weights start at 0, the dense features are standardised on `data` and
    the penalty is l2/2 * |weights|^2. With `init`: start from its weights and keep its
    standardisation; the penalty pulls towards its weights instead."""
    if init is not None:
        if init.dim != dim:
            raise HumourTrainError(f"init model has {init.dim} hash buckets, data {dim}")
        mean, std = init.mean.astype(np.float64), init.std.astype(np.float64)
        w0 = init.hashed.astype(np.float64)
        v0 = init.dense.astype(np.float64)
        b0 = init.bias
    else:
        total = data.weights.sum()
        mean = (data.dense * data.weights[:, None]).sum(0) / total
        var = ((data.dense - mean) ** 2 * data.weights[:, None]).sum(0) / total
        std = np.sqrt(var)
        std[std < 1e-6] = 1.0
        w0 = np.zeros(dim)
        v0 = np.zeros(len(DENSE_FEATURES))
        pos = float((data.labels * data.weights).sum() / data.weights.sum())
        b0 = float(np.log(max(pos, 1e-6) / max(1 - pos, 1e-6)))
    scaled = (data.dense - mean) / std
    sw = data.weights / data.weights.sum()
    row_of = data.row_of
    # Only the buckets the data touches move: the others have no loss gradient and start
    # where the penalty pulls them, so optimising the touched ones alone is exact (and fast).
    active, local = np.unique(data.indices, return_inverse=True)
    if len(active) and active[-1] >= dim:
        raise HumourTrainError(f"data hashed into more than {dim} buckets")
    anchors = [w0[active], v0, None]
    params = [w0[active].copy(), v0.copy(), np.array([b0])]
    m = [np.zeros_like(p) for p in params]
    s = [np.zeros_like(p) for p in params]
    beta1, beta2, eps = 0.9, 0.999, 1e-8
    for t in range(1, steps + 1):
        w, v, b = params
        sparse = np.bincount(row_of, weights=w[local], minlength=len(data))
        z = sparse + scaled @ v + b[0]
        p = 1.0 / (1.0 + np.exp(-np.clip(z, -30, 30)))
        r = (p - data.labels) * sw
        grads = [
            np.bincount(local, weights=r[row_of], minlength=len(active)) + l2 * (w - anchors[0]),
            scaled.T @ r + l2 * (v - anchors[1]),
            np.array([r.sum()]),
        ]
        for i, (param, g) in enumerate(zip(params, grads, strict=True)):
            m[i] = beta1 * m[i] + (1 - beta1) * g
            s[i] = beta2 * s[i] + (1 - beta2) * g * g
            mhat = m[i] / (1 - beta1**t)
            shat = s[i] / (1 - beta2**t)
            param -= lr * mhat / (np.sqrt(shat) + eps)
    hashed = w0.copy()
    hashed[active] = params[0]
    return HumourModel(
        hashed.astype(np.float32),
        params[1].astype(np.float32),
        mean.astype(np.float32),
        std.astype(np.float32),
        float(params[2][0]),
        dict(card or {}),
        name,
    )


def predict(model: HumourModel, data: Examples) -> np.ndarray:
    scaled = (data.dense - model.mean) / model.std
    return _logits(
        data, model.hashed.astype(np.float64), model.dense.astype(np.float64), model.bias, scaled
    )


def evaluate(model: HumourModel, episodes: Sequence[Episode]) -> dict[str, float]:
    """Held-out ROC AUC of the model and of the baselines on these episodes."""
    data = episode_examples(episodes, model.dim)
    length = data.dense[:, DENSE_FEATURES.index("log_words")]
    return {
        "model": roc_auc(data.labels, predict(model, data)),
        "length": roc_auc(data.labels, length),
        "position": roc_auc(data.labels, data.position),
        "scene_position": roc_auc(data.labels, data.scene_position),
        "lines": len(data),
        "laugh_rate": float(data.labels.mean()),
    }


# -- votes ---------------------------------------------------------------------------------


@dataclass
class VotedScene:
    scene_id: int
    lines: list[str]
    votes: dict[int, int]  # index in lines of a generated line -> its votes


def read_votes(db_path: str | Path, guild: str | None = None) -> list[VotedScene]:
    """Stored scenes with at least one vote on a generated line (optionally one server's)."""
    path = Path(db_path)
    if not path.is_file():
        raise HumourTrainError(f"--votes {path}: no such database file")
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
    except sqlite3.Error as e:
        raise HumourTrainError(f"--votes {path}: cannot open ({e})") from None
    try:
        tables = {row[0] for row in conn.execute("SELECT name FROM sqlite_master")}
        missing = {"scenes", "lines", "votes"} - tables
        if missing:
            raise HumourTrainError(
                f"--votes {path}: not a bot database (no table {sorted(missing)[0]})"
            )
        columns = {row[1] for row in conn.execute("PRAGMA table_info(lines)")}
        if "from_prompt" not in columns:
            raise HumourTrainError(
                f"--votes {path}: an old bot database; start the bot on it once to migrate it"
            )
        where, params = "", ()
        if guild is not None:
            where, params = "WHERE s.guild_id = ?", (str(guild),)
        rows = conn.execute(
            "SELECT s.id, l.line_no, l.text, l.from_prompt, COUNT(v.id) "
            "FROM scenes s JOIN lines l ON l.scene_id = s.id "
            f"LEFT JOIN votes v ON v.line_id = l.id {where} "
            "GROUP BY l.id ORDER BY s.id, l.line_no",
            params,
        ).fetchall()
    except sqlite3.Error as e:
        raise HumourTrainError(f"--votes {path}: cannot read ({e})") from None
    finally:
        conn.close()
    scenes: dict[int, VotedScene] = {}
    for scene_id, _, text, own, votes in rows:
        scene = scenes.setdefault(scene_id, VotedScene(scene_id, [], {}))
        if not own:
            scene.votes[len(scene.lines)] = int(votes)
        scene.lines.append(str(text))
    return [s for s in scenes.values() if any(s.votes.values())]


def vote_examples(scenes: Sequence[VotedScene], dim: int) -> Examples:
    """Voted generated lines are positives weighted by their votes; the scene's other
    generated lines negatives of weight 1."""
    return examples(
        [
            (s.lines, {i: (1, float(n)) if n else (0, 1.0) for i, n in s.votes.items()})
            for s in scenes
        ],
        dim,
    )


def combine(parts: Sequence[tuple[Examples, float]]) -> Examples:
    """One design from several, each part's weights rescaled to sum to its share."""
    offsets = np.cumsum([0] + [p.indptr[-1] for p, _ in parts])
    return Examples(
        np.concatenate(
            [p.indptr[:-1] + o for (p, _), o in zip(parts, offsets, strict=False)] + [offsets[-1:]]
        ),
        np.concatenate([p.indices for p, _ in parts]),
        np.concatenate([p.dense for p, _ in parts]),
        np.concatenate([p.labels for p, _ in parts]),
        np.concatenate([p.weights / p.weights.sum() * share for p, share in parts]),
        np.concatenate([p.position for p, _ in parts]),
        np.concatenate([p.scene_position for p, _ in parts]),
    )


def update_with_votes(
    init: HumourModel,
    scenes: Sequence[VotedScene],
    *,
    rehearsal: Sequence[Episode] = (),
    share: float = VOTE_SHARE,
    anchor: float = ANCHOR,
    steps: int = VOTE_STEPS,
    card: dict | None = None,
    name: str = "humour-votes",
) -> HumourModel:
    """Go on from `init` with the votes as labels. With `rehearsal` episodes of the laugh
    corpus the objective also keeps fitting them (the votes weigh `share` of the corpus) and
    the weights are pulled towards init's by L2; without, only the stronger `anchor` pull
    keeps the model near init."""
    votes = vote_examples(scenes, init.dim)
    if votes.labels.min() == votes.labels.max():
        raise HumourTrainError("the votes give no contrast: every labelled line was voted for")
    if rehearsal:
        data = combine([(episode_examples(rehearsal, init.dim), 1.0), (votes, share)])
        l2 = L2
    else:
        data, l2 = votes, anchor
    return fit(data, init.dim, l2=l2, steps=steps, lr=0.05, init=init, card=card, name=name)


# -- the command ---------------------------------------------------------------------------


def _check_out(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise HumourTrainError(f"--out {out} is a file")
    if out.exists() and not overwrite:
        raise HumourTrainError(f"--out {out} exists; pass --overwrite to replace it")


def write_model(model: HumourModel, out: Path) -> None:
    """Save into a temp dir beside `out`, then rename it into place."""
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        model.save(tmp)
        publish_dir(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def train_on_corpus(
    out: Path,
    *,
    seed: int = 0,
    corpus: Path | None = None,
    dim: int = DIM,
    l2: float = L2,
    steps: int = STEPS,
    command: str = "",
    overwrite: bool = False,
) -> HumourModel:
    """Fit on the training episodes, measure on the held-out ones, write the model to out."""
    _check_out(out, overwrite)
    started = time.monotonic()
    episodes = load_laugh_corpus(corpus)
    train_names, test_names = split_episodes([e.name for e in episodes], seed)
    train = [e for e in episodes if e.name in set(train_names)]
    test = [e for e in episodes if e.name in set(test_names)]
    model = fit(episode_examples(train, dim), dim, l2=l2, steps=steps, name=out.name or "humour")
    auc = evaluate(model, test) if test else {}
    model.card.update(
        trained_on="seinfeld-laugh-corpus" if corpus is None else str(corpus),
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        seed=seed,
        l2=l2,
        steps=steps,
        episodes={"train": len(train), "held_out": len(test)},
        train_lines=sum(len(e.lines) for e in train),
        held_out_episodes=test_names,
        held_out_auc=auc,
        seconds=round(time.monotonic() - started, 1),
    )
    write_model(model, out)
    return model


def train_on_votes(
    out: Path,
    votes: Path,
    *,
    guild: str | None = None,
    init: Path | None = None,
    corpus: Path | None = None,
    seed: int = 0,
    command: str = "",
    overwrite: bool = False,
) -> HumourModel:
    """Update `init` (default: the shipped model) with the votes in the bot's database,
    rehearsing the laugh corpus (the init's training episodes) when it is at hand."""
    _check_out(out, overwrite)
    base = HumourModel.load(DEFAULT_DIR if init is None else init)
    scenes = read_votes(votes, guild)
    if not scenes:
        where = f" for guild {guild}" if guild is not None else ""
        raise HumourTrainError(f"--votes {votes}: no votes on generated lines{where}")
    try:
        episodes = load_laugh_corpus(corpus)
    except HumourTrainError:
        if corpus is not None:
            raise
        episodes = []  # not installed: the update leans on the anchor alone
    held = set(base.card.get("held_out_episodes") or [])
    if episodes and not held & {e.name for e in episodes}:  # another corpus than init's
        held = set(split_episodes([e.name for e in episodes], seed)[1])
    test = [e for e in episodes if e.name in held]
    rehearsal = [e for e in episodes if e.name not in held]
    model = update_with_votes(base, scenes, rehearsal=rehearsal, name=out.name or "humour")
    data = vote_examples(scenes, base.dim)
    card = {k: v for k, v in base.card.items() if k not in ("held_out_auc", "command")}
    card.update(
        init=base.name,
        created=datetime.now(UTC).isoformat(timespec="seconds"),
        command=command,
        votes_db=str(votes),
        guild=guild,
        rehearsal_episodes=len(rehearsal),
        vote_share=VOTE_SHARE if rehearsal else None,
        anchor=None if rehearsal else ANCHOR,
        vote_scenes=len(scenes),
        vote_lines=len(data),
        vote_auc={
            "init": roc_auc(data.labels, predict(base, data)),
            "updated": roc_auc(data.labels, predict(model, data)),
        },
    )
    if test:  # still sensible on real laughter?
        card["laugh_auc"] = {
            "init": evaluate(base, test)["model"],
            "updated": evaluate(model, test)["model"],
        }
    model.card = card
    write_model(model, out)
    return model


def humour_cli(args) -> int:
    command = f"python -m training humour --out {args.out} --seed {args.seed}" + "".join(
        f" --{flag} {value}"
        for flag, value in (
            ("votes", args.votes),
            ("guild", args.guild),
            ("init", args.init),
            ("corpus", args.corpus),
        )
        if value is not None
    )
    if args.guild is not None and args.votes is None:
        raise HumourTrainError("--guild needs --votes")
    if args.init is not None and args.votes is None:
        raise HumourTrainError("--init needs --votes")
    if args.votes is None:
        model = train_on_corpus(
            args.out, seed=args.seed, corpus=args.corpus, command=command, overwrite=args.overwrite
        )
        auc = model.card["held_out_auc"]
        if auc:
            print(
                f"wrote {args.out}: held-out ROC AUC {auc['model']:.3f} "
                f"(length {auc['length']:.3f}, position {auc['position']:.3f}, in scene "
                f"{auc['scene_position']:.3f}) on "
                f"{model.card['episodes']['held_out']} episodes"
            )
        else:
            print(f"wrote {args.out} (one episode: nothing held out)")
    else:
        model = train_on_votes(
            args.out,
            args.votes,
            guild=args.guild,
            init=args.init,
            corpus=args.corpus,
            seed=args.seed,
            command=command,
            overwrite=args.overwrite,
        )
        card = model.card
        text = (
            f"wrote {args.out}: {card['vote_lines']} voted-on lines from "
            f"{card['vote_scenes']} scenes; their ROC AUC {card['vote_auc']['init']:.3f} "
            f"-> {card['vote_auc']['updated']:.3f}"
        )
        if "laugh_auc" in card:
            text += (
                f"; laugh corpus {card['laugh_auc']['init']:.3f} -> "
                f"{card['laugh_auc']['updated']:.3f}"
            )
        print(text)
    return 0
