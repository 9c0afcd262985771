"""The humour model: laugh-corpus parsing, training and scoring on tiny data, its files, the
shipped default, and the votes-to-labels update on a real bot database."""

from __future__ import annotations

import importlib.util
import json
import math
import random
import time
from pathlib import Path

import numpy as np
import pytest

from sitcom.scenes.humour import (
    CARD_FILE,
    DEFAULT_DIR,
    WEIGHTS_FILE,
    HumourModel,
    HumourModelError,
    load_default,
)
from training.__main__ import main as training_main

HAVE_CORPUS = importlib.util.find_spec("seinfeld_laugh_corpus") is not None
needs_parser = pytest.mark.skipif(
    not HAVE_CORPUS,
    reason="seinfeld-laugh-corpus (its parser) is not installed; "
    "pip install seinfeld-laugh-corpus (in the dev extra)",
)

FILLER = (
    "so",
    "what",
    "is",
    "the",
    "deal",
    "with",
    "this",
    "thing",
    "you",
    "know",
    "coffee",
    "apartment",
    "car",
    "date",
    "work",
    "today",
    "yesterday",
    "there",
    "really",
    "okay",
)
CAST = ("JERRY", "GEORGE", "ELAINE", "KRAMER")


def write_merged(
    path: Path, turns: list[tuple[str, list[str], bool]], pauses: frozenset[int] = frozenset()
) -> None:
    """A `.merged` file as the corpus writes it: `# SPEAKER`, then per fragment its start,
    text, end; `**LOL**` with its time where the audience laughs (after the turn when its
    flag is set). A turn whose index is in `pauses` starts 20 s after the one before."""
    out, t, last = [], 1.0, None
    for i, (speaker, fragments, laugh) in enumerate(turns):
        if i in pauses:
            t += 20.0
        if speaker != last:
            out.append(f"# {speaker}")
            last = speaker
        for fragment in fragments:
            out += [f"{t:.3f}", fragment, f"{t + 1.5:.3f}"]
            t += 2.0
        if laugh:
            out += [f"{t - 0.3:.3f}", "**LOL**"]
    path.write_text("\n".join(out) + "\n", encoding="utf-8")


def tiny_corpus(folder: Path, episodes: int = 10, turns: int = 40, seed: int = 0) -> Path:
    """Episodes where a turn mentioning a banana gets a laugh (and 5 % of the rest do)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for e in range(episodes):
        script, speaker = [], None
        for _ in range(turns):
            speaker = rng.choice([c for c in CAST if c != speaker])
            words = [rng.choice(FILLER) for _ in range(rng.randint(3, 9))]
            funny = rng.random() < 0.35
            if funny:
                words.insert(rng.randrange(len(words) + 1), "banana")
            text = " ".join(words).capitalize() + rng.choice([".", "?", "!"])
            script.append((speaker, [text], funny or rng.random() < 0.05))
        write_merged(
            folder / f"Seinfeld.S0{1 + e // 9}E{e % 9 + 1:02d}.Tiny.merged",
            script,
            frozenset({turns // 2}),
        )
    return folder


# -- parsing and metrics ---------------------------------------------------------------------


@needs_parser
def test_turns_and_laughs_from_merged_files(tmp_path):
    from training.humour import SCENE_BREAK, load_laugh_corpus

    write_merged(
        tmp_path / "Seinfeld.S01E01.Pilot.merged",
        [
            ("JERRY", ["What is the deal", "with airline food?"], True),  # laugh right after
            ("GEORGE", ["I'm not going."], False),
            ("ELAINE", ["Get out!"], False),
            ("ELAINE", ["Get OUT!"], True),  # the same speaker goes on: one turn, laugh in it
            ("KRAMER", ["Giddyup."], False),
            ("jerry", ["Hello,  Newman."], False),  # after a 20 s pause: a new scene
        ],
        pauses=frozenset({5}),
    )
    (episode,) = load_laugh_corpus(tmp_path)
    assert episode.name == "Seinfeld.S01E01.Pilot"
    assert episode.lines == [
        "JERRY: What is the deal with airline food?",
        "GEORGE: I'm not going.",
        "ELAINE: Get out! Get OUT!",
        "KRAMER: Giddyup.",
        SCENE_BREAK,
        "JERRY: Hello, Newman.",
    ]
    assert episode.labels == [1, 0, 1, 0, -1, 0]


@needs_parser
def test_a_laugh_inside_a_turn_marks_it(tmp_path):
    from training.humour import load_laugh_corpus

    path = tmp_path / "Seinfeld.S02E03.X.merged"
    path.write_text(
        "# ELAINE\n1.0\nOne.\n2.0\n2.1\n**LOL**\n3.0\nTwo.\n4.0\n# JERRY\n4.5\nThree.\n5.0\n",
        encoding="utf-8",
    )
    (episode,) = load_laugh_corpus(tmp_path)
    assert episode.lines == ["ELAINE: One. Two.", "JERRY: Three."]
    assert episode.labels == [1, 0]


@needs_parser
def test_bad_corpus_folders_are_one_line_errors(tmp_path):
    from training.humour import HumourTrainError, load_laugh_corpus

    with pytest.raises(HumourTrainError, match="no such directory"):
        load_laugh_corpus(tmp_path / "nope")
    with pytest.raises(HumourTrainError, match="no .merged files"):
        load_laugh_corpus(tmp_path)
    (tmp_path / "Seinfeld.S01E01.Bad.merged").write_text("# JERRY\nnot a time\nHi.\n1.0\n")
    with pytest.raises(HumourTrainError, match="cannot parse") as e:
        load_laugh_corpus(tmp_path)
    assert "\n" not in str(e.value)


def test_roc_auc():
    from training.humour import roc_auc

    assert roc_auc([0, 0, 1, 1], [0.1, 0.4, 0.35, 0.8]) == 0.75
    assert roc_auc([0, 1, 0, 1], [1, 2, 3, 4]) == 0.75
    assert roc_auc([0, 1], [0.5, 0.5]) == 0.5  # ties count half
    assert roc_auc([1, 0, 1, 0], [3.0, 1.0, 2.0, 2.0]) == 0.875
    assert math.isnan(roc_auc([1, 1], [0.1, 0.2]))


def test_split_is_by_episode_and_seeded():
    from training.humour import split_episodes

    names = [f"ep{i:02d}" for i in range(20)]
    train, test = split_episodes(names, seed=3)
    assert len(test) == 4 and not set(train) & set(test) and set(train) | set(test) == set(names)
    assert split_episodes(list(reversed(names)), seed=3) == (train, test)
    assert split_episodes(names, seed=4) != (train, test)


# -- training and scoring --------------------------------------------------------------------


@needs_parser
def test_train_on_a_tiny_corpus_learns_the_obvious_signal(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "corpus")
    out = tmp_path / "model"
    assert training_main(["humour", "--out", str(out), "--corpus", str(corpus), "--seed", "1"]) == 0
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: held-out ROC AUC")
    card = json.loads((out / CARD_FILE).read_text())
    assert card["episodes"] == {"train": 8, "held_out": 2}
    auc = card["held_out_auc"]
    assert auc["model"] > 0.9 > auc["length"]
    assert "--corpus" in card["command"]
    model = HumourModel.load(out)
    assert model.name == "model"
    scene = [
        "[Scene: Monk's]",
        "JERRY: So what is the deal with the coffee?",
        "(George sits)",
        "GEORGE: I have a banana in my car.",
        "ELAINE: Okay.",
    ]
    scores = model.line_scores(scene)
    assert scores[0] == scores[2] == 0.0
    assert scores[3] > 0.8 and scores[1] < 0.3 and scores[4] < 0.3
    assert model.line_scores([]) == []
    assert model.line_scores(["(only a stage direction)"]) == [0.0]

    # an existing OUT is refused without --overwrite, with one line on stderr
    assert training_main(["humour", "--out", str(out), "--corpus", str(corpus)]) == 2
    err = capsys.readouterr().err
    assert "exists; pass --overwrite" in err and err.count("\n") == 1
    assert training_main(["humour", "--out", str(out), "--corpus", str(corpus), "--overwrite"]) == 0
    assert sorted(p.name for p in out.parent.iterdir()) == ["corpus", "model"]  # no temp left


def test_cli_usage_errors(tmp_path, capsys):
    assert training_main(["humour", "--out", str(tmp_path / "m"), "--guild", "5"]) == 2
    assert capsys.readouterr().err == "error: --guild needs --votes\n"
    assert training_main(["humour", "--out", str(tmp_path / "m"), "--init", str(tmp_path)]) == 2
    assert capsys.readouterr().err == "error: --init needs --votes\n"
    (tmp_path / "file").write_text("x")
    assert (
        training_main(["humour", "--out", str(tmp_path / "file"), "--corpus", str(tmp_path)]) == 2
    )
    assert "is a file" in capsys.readouterr().err


# -- files -----------------------------------------------------------------------------------


def small_model(dim: int = 64) -> HumourModel:
    from sitcom.scenes.humour import DENSE_FEATURES

    rng = np.random.default_rng(0)
    k = len(DENSE_FEATURES)
    hashed = rng.normal(size=dim).astype(np.float16).astype(np.float32)  # exact in the file
    return HumourModel(
        hashed, rng.normal(size=k), np.zeros(k), np.ones(k), -0.5, {"note": "test"}, "small"
    )


def test_save_load_round_trip(tmp_path):
    model = small_model()
    model.save(tmp_path / "m")
    again = HumourModel.load(tmp_path / "m")
    assert again.name == "small" and again.dim == 64 and again.card["note"] == "test"
    lines = ["JERRY: Hi there.", "GEORGE: What? Hi? Why hi?", "(pause)", "ELAINE: Hi!"]
    assert again.line_scores(lines) == pytest.approx(model.line_scores(lines), abs=1e-6)
    scores = again.line_scores(lines)
    assert scores[2] == 0.0 and all(0.0 < s < 1.0 for i, s in enumerate(scores) if i != 2)


def damage(path: Path, how: str) -> None:
    card = json.loads((path / CARD_FILE).read_text())
    if how == "no card":
        (path / CARD_FILE).unlink()
    elif how == "bad json":
        (path / CARD_FILE).write_text("{not json")
    elif how == "not a card":
        (path / CARD_FILE).write_text("[1, 2]")
    elif how == "version":
        (path / CARD_FILE).write_text(json.dumps({**card, "version": 99}))
    elif how == "features":
        (path / CARD_FILE).write_text(json.dumps({**card, "dense_features": ["x"]}))
    elif how == "dim":
        (path / CARD_FILE).write_text(json.dumps({**card, "dim": 65}))
    elif how == "no weights":
        (path / WEIGHTS_FILE).unlink()
    elif how == "garbage weights":
        (path / WEIGHTS_FILE).write_bytes(b"PK\x03\x04 not really a zip")
    elif how == "missing array":
        np.savez(path / WEIGHTS_FILE, hashed=np.zeros(64, dtype=np.float16))
    elif how == "nan":
        with np.load(path / WEIGHTS_FILE) as a:
            arrays = dict(a)
        arrays["dense"][0] = np.nan
        np.savez(path / WEIGHTS_FILE, **arrays)


@pytest.mark.parametrize(
    "how, message",
    [
        ("no card", "card.json is missing"),
        ("bad json", "card.json is damaged"),
        ("not a card", "not a sitcom-humour card"),
        ("version", "unknown version 99"),
        ("features", "other features"),
        ("dim", "hashed has shape (64,), expected float (65,)"),
        ("no weights", "weights.npz is missing"),
        ("garbage weights", "weights.npz is damaged"),
        ("missing array", "lacks the array 'dense'"),
        ("nan", "dense holds non-finite values"),
    ],
)
def test_damaged_model_dirs_are_one_line_errors(tmp_path, how, message):
    small_model().save(tmp_path / "m")
    damage(tmp_path / "m", how)
    with pytest.raises(HumourModelError, match="humour model .*m: ") as e:
        HumourModel.load(tmp_path / "m")
    assert message in str(e.value) and "\n" not in str(e.value)
    assert isinstance(e.value, ValueError)


def test_a_missing_dir_is_an_error(tmp_path):
    with pytest.raises(HumourModelError, match="no such directory"):
        HumourModel.load(tmp_path / "absent")


# -- the shipped default ---------------------------------------------------------------------


def test_shipped_default_is_small_and_fast():
    model = load_default()
    assert model.card["format"] == "sitcom-humour" and model.name
    size = sum(p.stat().st_size for p in DEFAULT_DIR.iterdir())
    assert size < 2_000_000
    lines = ["[Scene: Jerry's apartment]", "(Kramer enters)"] + [
        f"{CAST[i % 4]}: Line number {i}, and what is the deal with that? I don't know!"
        for i in range(48)
    ]
    model.line_scores(lines)
    started = time.perf_counter()
    scores = model.line_scores(lines)
    assert time.perf_counter() - started < 0.05
    assert scores[:2] == [0.0, 0.0] and all(0.0 < s < 1.0 for s in scores[2:])


@pytest.mark.skipif(
    not HAVE_CORPUS,
    reason="seinfeld-laugh-corpus is not installed; "
    "pip install seinfeld-laugh-corpus to check the default on it",
)
def test_shipped_default_beats_the_length_baseline_on_held_out_episodes():
    from training.humour import evaluate, load_laugh_corpus

    model = load_default()
    held = set(model.card["held_out_episodes"])
    test = [e for e in load_laugh_corpus() if e.name in held]
    assert len(test) == len(held) >= 10
    auc = evaluate(model, test)
    assert auc["model"] > auc["length"] + 0.03
    assert auc["model"] == pytest.approx(model.card["held_out_auc"]["model"], abs=1e-3)


# -- votes teach the model -------------------------------------------------------------------

OPENINGS = (
    "I can't believe",
    "What about",
    "Let me tell you about",
    "Nobody cares about",
    "You know what I think of",
    "Don't talk to me about",
)
TOPICS = (
    "the coffee",
    "the car",
    "my date",
    "the parking space",
    "the soup",
    "the library",
    "the doctor",
    "your father",
    "the apartment",
    "the show",
)
LIKED = ("festivus", "the festivus pole", "this festivus")
ENDINGS = (".", "?", "!", ", Jerry.", ", George.")


def candidate(rng: random.Random, speaker: str, liked: bool) -> str:
    topic = rng.choice(LIKED if liked else TOPICS)
    return f"{speaker}: {rng.choice(OPENINGS)} {topic}{rng.choice(ENDINGS)}"


def liked(line: str) -> bool:
    return "festivus" in line


async def fill_votes_db(
    path: Path, *, seed: int = 0, scenes: int = 30, guild: str = "1", prefer=liked
) -> None:
    """Scenes as the bot stores them (the prompt line first, not votable), with votes from
    simulated users who mostly vote for the lines `prefer` picks."""
    from bot.db import Database, Place

    rng = random.Random(seed)
    db = await Database.open(path)
    for _ in range(scenes):
        lines = ["JERRY: So, what's new?"]
        for k in range(6):
            lines.append(candidate(rng, CAST[(k + 1) % 4], rng.random() < 0.4))
        scene = await db.add_scene(
            place=Place("discord", guild, "2"),
            user_id="3",
            prompt=lines[0],
            model_name="tiny",
            lines=lines,
            prompt_lines=1,
            new_tokens=60,
            seconds=1.0,
        )
        await db.add_vote("99", scene.lines[0].id)  # a prompt line: context, never a label
        for user in range(5):
            for line in scene.lines[1:]:
                if rng.random() < (0.7 if prefer(line.text) else 0.05):
                    await db.add_vote(str(user), line.id)
    await db.close()


def preference_auc(model: HumourModel, seed: int = 123) -> float:
    """How well the model's scores rank the liked lines above the others in fresh scenes."""
    from training.humour import roc_auc

    rng = random.Random(seed)
    labels, scores = [], []
    for _ in range(40):
        lines = ["[Scene: Monk's]", "GEORGE: So, what's new?"]
        lines += [candidate(rng, CAST[k % 4], rng.random() < 0.4) for k in range(6)]
        scored = model.line_scores(lines)
        labels += [int(liked(line)) for line in lines[2:]]
        scores += scored[2:]
    return roc_auc(labels, scores)


@pytest.mark.asyncio
async def test_votes_become_labels(tmp_path):
    from training.humour import read_votes, vote_examples

    await fill_votes_db(tmp_path / "bot.db", scenes=4, guild="1")
    await fill_votes_db(tmp_path / "bot.db", scenes=3, guild="7", seed=1)
    scenes = read_votes(tmp_path / "bot.db")
    assert len(scenes) == 7
    for scene in scenes:
        assert scene.lines[0] == "JERRY: So, what's new?" and 0 not in scene.votes
        assert sorted(scene.votes) == [1, 2, 3, 4, 5, 6]
    assert len(read_votes(tmp_path / "bot.db", guild="7")) == 3
    assert read_votes(tmp_path / "bot.db", guild="8") == []
    data = vote_examples(scenes, 64)
    assert len(data) == 42  # the generated lines only
    votes = [n for s in scenes for _, n in sorted(s.votes.items())]
    assert list(data.labels) == [int(n > 0) for n in votes]
    assert list(data.weights) == [float(n) if n else 1.0 for n in votes]


@needs_parser
@pytest.mark.asyncio
async def test_votes_lift_the_lines_users_prefer(tmp_path, capsys):
    corpus = tiny_corpus(tmp_path / "corpus")
    init = tmp_path / "init"
    assert training_main(["humour", "--out", str(init), "--corpus", str(corpus)]) == 0
    await fill_votes_db(tmp_path / "bot.db", scenes=30, guild="1")
    # another server whose users like the opposite; filtered out by --guild
    await fill_votes_db(
        tmp_path / "bot.db", scenes=30, guild="2", seed=5, prefer=lambda line: not liked(line)
    )
    out = tmp_path / "voted"
    capsys.readouterr()
    assert (
        training_main(
            [
                "humour",
                "--out",
                str(out),
                "--votes",
                str(tmp_path / "bot.db"),
                "--guild",
                "1",
                "--init",
                str(init),
                "--corpus",
                str(corpus),
            ]
        )
        == 0
    )
    said = capsys.readouterr().out
    assert said.startswith(f"wrote {out}: 180 voted-on lines from 30 scenes")
    before, after = HumourModel.load(init), HumourModel.load(out)
    assert preference_auc(before) < 0.7
    assert preference_auc(after) > 0.9
    card = after.card
    assert card["init"] == "init" and card["guild"] == "1" and card["vote_scenes"] == 30
    assert card["vote_auc"]["updated"] > card["vote_auc"]["init"]
    # still scores the laugh corpus sensibly
    assert card["laugh_auc"]["updated"] > 0.85
    # a banana still beats a plain line
    scene = ["GEORGE: So what is the deal with the coffee?", "JERRY: I have a banana."]
    assert after.line_scores(scene)[1] > after.line_scores(scene)[0]

    # the other server's votes teach the opposite
    other = tmp_path / "other"
    assert (
        training_main(
            [
                "humour",
                "--out",
                str(other),
                "--votes",
                str(tmp_path / "bot.db"),
                "--guild",
                "2",
                "--init",
                str(init),
                "--corpus",
                str(corpus),
            ]
        )
        == 0
    )
    assert preference_auc(HumourModel.load(other)) < preference_auc(before)


@needs_parser
@pytest.mark.asyncio
async def test_votes_update_the_shipped_default_by_default(tmp_path, capsys):
    from training.humour import read_votes, update_with_votes

    await fill_votes_db(tmp_path / "bot.db", scenes=30)
    corpus = tiny_corpus(tmp_path / "corpus")  # rehearsed instead of the real one: faster
    out = tmp_path / "voted"
    assert (
        training_main(
            [
                "humour",
                "--out",
                str(out),
                "--votes",
                str(tmp_path / "bot.db"),
                "--corpus",
                str(corpus),
            ]
        )
        == 0
    ), capsys.readouterr().err
    default = load_default()
    after = HumourModel.load(out)
    assert after.card["init"] == default.name and after.card["rehearsal_episodes"] == 8
    assert preference_auc(after) > max(0.9, preference_auc(default))
    # without the laugh corpus at hand only the pull towards the init keeps it close
    alone = update_with_votes(default, read_votes(tmp_path / "bot.db"))
    assert preference_auc(alone) > max(0.9, preference_auc(default))


@pytest.mark.asyncio
async def test_bad_vote_databases_are_one_line_errors(tmp_path, capsys):
    import sqlite3

    def run(db: Path, *extra: str) -> str:
        assert (
            training_main(["humour", "--out", str(tmp_path / "m"), "--votes", str(db), *extra]) == 2
        )
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1
        assert not (tmp_path / "m").exists()
        return err

    assert "no such database file" in run(tmp_path / "absent.db")
    (tmp_path / "text.db").write_text("hello, I am not SQLite" * 100)
    assert "cannot read" in run(tmp_path / "text.db")
    sqlite3.connect(tmp_path / "empty.db").execute("CREATE TABLE t (x)").connection.close()
    assert "not a bot database (no table lines)" in run(tmp_path / "empty.db")
    old = sqlite3.connect(tmp_path / "old.db")
    old.executescript(
        "CREATE TABLE scenes (id); CREATE TABLE lines (id, text); CREATE TABLE votes (id)"
    )
    old.close()
    assert "old bot database" in run(tmp_path / "old.db")
    await fill_votes_db(tmp_path / "bot.db", scenes=2, guild="1")
    assert "no votes on generated lines for guild 9" in run(tmp_path / "bot.db", "--guild", "9")
    assert "no such directory" in run(tmp_path / "bot.db", "--init", str(tmp_path / "nope"))
    everyone = tmp_path / "all.db"
    await fill_votes_db(everyone, scenes=2, prefer=lambda line: True)
    # (5 users at 0.7 each: nearly every line gets a vote; make sure all do)
    conn = sqlite3.connect(everyone)
    conn.execute(
        "INSERT OR IGNORE INTO votes (line_id, user_id) "
        "SELECT id, 'x' FROM lines WHERE NOT from_prompt"
    )
    conn.commit()
    conn.close()
    assert "no contrast" in run(everyone)
