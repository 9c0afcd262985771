"""Acceptance on the real transcripts (skipped when ../shared is absent); one prepare per module."""

import json
import re

import pytest
from helpers import RAW_CORPUS

from data.prepare import Options, episodes_text, prepare, write_outputs
from data.split import split_episodes
from sitcom.scenes.script import END_OF_TEXT, is_well_formed

# One worker runs the module, so the module-scoped prepare (~30 s) happens once (pyproject).
pytestmark = pytest.mark.xdist_group("real-corpus")

NOT_EPISODES = [
    "Highlights-of-100-1.txt",
    "Highlights-of-100-2.txt",
    "The-Clip-Show-1.txt",
    "The-Clip-Show-2.txt",
    "seinfeld-quotes.txt",
    "alpha.txt",
    "buy-seinfeld.txt",
    "episodes_oveview.txt",
    "festivus.txt",
    "seinfeld-cast.txt",
    "seinfeld-characters.txt",
    "seinfeld-dvd.txt",
    "seinfeld-superman.txt",
    "seinfeld-t-shirt.txt",
    "watch-seinfeld.txt",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    if not RAW_CORPUS.is_dir():
        pytest.skip("real transcripts absent")
    out = tmp_path_factory.mktemp("corpus")
    result = prepare(RAW_CORPUS, Options(seed=0))
    write_outputs(out, result)
    manifest = json.loads((out / "manifest.json").read_text())
    text = (out / "train.txt").read_text() + (out / "val.txt").read_text()
    return result, manifest, {e["file"]: e for e in manifest["files"]}, text


def test_episodes_kept_and_non_episodes_dropped(raw_corpus, corpus):
    _, manifest, files, _ = corpus
    assert len(files) == len(list(raw_corpus.iterdir()))
    assert manifest["totals"]["kept"] >= 155
    for name in NOT_EPISODES:
        assert files[name]["status"] == "dropped", name
    assert all(e["reason"] for e in files.values() if e["status"] == "dropped")


def test_near_duplicates_kept_once(raw_corpus, corpus):
    files = corpus[2]
    pair = {files["TheRaincoats.txt"]["status"], files["TheRaincoats2.txt"]["status"]}
    assert pair == {"kept", "dropped"}
    dup = next(e for e in files.values() if e.get("duplicate_of"))
    assert files[dup["duplicate_of"]]["status"] == "kept"


def test_no_site_junk_left(raw_corpus, corpus):
    text = corpus[3]
    for junk in (
        "Gift Guide",
        "SeinfeldScripts",
        "Copyright",
        "Written by",
        "Written By",
        "Directed by",
        "Transcribed by",
        "...........",
        "Home\nScripts",
        "Episodes Overview",
        "T-Shirts",
        "ACT ONE",
        "COMMERCIAL BREAK",
    ):
        assert junk not in text, junk
    assert not re.search(r"^\S.{0,40}\.{6,}\s*[A-Z][a-z]+ [A-Z]", text, re.M)  # cast lists


def test_lines_are_well_formed(raw_corpus, corpus):
    lines = [ln for ln in corpus[3].splitlines() if ln.strip() and ln != END_OF_TEXT]
    assert sum(map(is_well_formed, lines)) / len(lines) >= 0.98
    turns = [ln for ln in lines if not ln.startswith(("(", "["))]
    assert len(turns) / len(lines) >= 0.75  # mostly dialogue, not narration
    speakers = corpus[1]["top_speakers"]
    assert list(speakers)[:4] == ["JERRY", "GEORGE", "ELAINE", "KRAMER"]
    assert {"NEWMAN", "FRANK", "PUDDY"} <= set(corpus[1]["top_speakers"]) | {
        s for e in corpus[2].values() for s in e.get("speakers", {})
    }
    assert not re.search(r"^(KRMAER|ELAIEN|GEORG|JERY):", corpus[3], re.M)


def test_split_disjoint_parts_together_and_seeded(raw_corpus, corpus):
    result, manifest, files, _ = corpus
    kept = {n: e for n, e in files.items() if e["status"] == "kept"}
    assert {e["split"] for e in kept.values()} == {"train", "val"}
    assert 0.03 <= manifest["totals"]["val"] / len(kept) <= 0.08
    for a, b in [
        ("TheTrip1.txt", "TheTrip2.txt"),
        ("ThePilot.txt", "ThePilot2.txt"),
        ("TheCadillac1.txt", "TheCadillac2.txt"),
        ("TheBoyfriend1.txt", "TheBoyfriend2.txt"),
    ]:
        assert kept[a]["split"] == kept[b]["split"]
    assert not set(map(tuple, result.train)) & set(map(tuple, result.val))
    # same seed, same split (recomputed from the kept names, in another order)
    again = split_episodes(sorted(kept, reverse=True), manifest["val_fraction"], manifest["seed"])
    assert again == {n: e["split"] for n, e in kept.items()}
    assert episodes_text(result.val).count(END_OF_TEXT) == len(result.val) - 1
