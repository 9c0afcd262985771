"""`python -m data prepare` on fixture folders: splits, duplicates, manifest, bad input."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.prepare import Options, prepare, write_outputs
from data.split import episode_group, split_episodes
from sitcom.scenes.script import END_OF_TEXT, is_well_formed

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "tests" / "fixtures" / "data"


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def files_by_name(manifest: dict) -> dict[str, dict]:
    return {entry["file"]: entry for entry in manifest["files"]}


@pytest.mark.e2e
def test_prepare_fixture_site(tmp_path):
    result = run_cli(
        "prepare",
        str(FIXTURES / "sitcom"),
        str(tmp_path),
        "--min-turns",
        "5",
        "--val-fraction",
        "0.3",
    )
    assert result.returncode == 0, result.stderr
    assert "episodes kept" in result.stdout
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    files = files_by_name(manifest)
    assert len(files) == len(list((FIXTURES / "sitcom").iterdir()))
    for name in ("quotes.txt", "cast-page.txt", "The-Clip-Show-1.txt"):
        assert files[name]["status"] == "dropped" and files[name]["reason"]
    dup = [e for e in files.values() if e.get("duplicate_of")]
    assert len(dup) == 1
    assert {dup[0]["file"], dup[0]["duplicate_of"]} == {"TheFakeColon.txt", "TheFakeColonCopy.txt"}
    kept = [e for e in files.values() if e["status"] == "kept"]
    assert len(kept) == 5
    assert files["TheFakeUpper1.txt"]["split"] == files["TheFakeUpper2.txt"]["split"]
    parts = [(tmp_path / name).read_text() for name in ("train.txt", "val.txt")]
    episodes = [e.strip() for part in parts for e in part.split(f"{END_OF_TEXT}\n") if e.strip()]
    text = "".join(parts)
    assert len(episodes) == 5
    assert all(is_well_formed(line) for line in text.splitlines() if line != END_OF_TEXT)
    assert "Home" not in text and "Copyright" not in text
    assert not list(tmp_path.glob(".*"))  # no temporary files left behind


def test_another_show_goes_through_the_same_code(tmp_path):
    result = prepare(FIXTURES / "other_show", Options(min_turns=5))
    assert set(result.manifest["main_cast"]) == {"MARGO", "TEDDY", "LUCILLE"}
    text = "\n".join(line for ep in result.train + result.val for line in ep)
    assert "MARGO: Lucille, why do you know Morse code?" in text  # `Magro:` repaired
    assert "LUCILLE: Except the lighthouse." in text  # `Luclile:` repaired
    assert "COMMODORE: Entrants must register by noon!" in text
    assert "DOCKMASTER: Nobody leaves until the nets are mended!" in text
    assert "MARGO AND TEDDY: The nets are always mended!" in text
    assert "Copyright" not in text and "Transcribed" not in text and "Menu" not in text
    assert "TEDDY: It always blinks, Margo. That's the job of a lighthouse." in text
    assert "TEDDY: (from the hallway) Has anyone seen the foghorn?" in text


def test_main_cast_option_overrides_the_derived_cast():
    result = prepare(FIXTURES / "other_show", Options(min_turns=5, main_cast=["Teddy"]))
    assert result.manifest["main_cast"] == ["TEDDY"]
    text = "\n".join(line for ep in result.train + result.val for line in ep)
    assert "MAGRO: Lucille, why do you know Morse code?" in text  # Margo no longer main cast


def test_same_seed_same_split_and_parts_together():
    names = [f"Ep{i}.txt" for i in range(40)] + [
        "TheTrip1.txt",
        "TheTrip2.txt",
        "ThePilot.txt",
        "ThePilot2.txt",
    ]
    a = split_episodes(names, 0.2, seed=3)
    assert a == split_episodes(list(reversed(names)), 0.2, seed=3)
    assert a != split_episodes(names, 0.2, seed=4)
    assert 6 <= sum(side == "val" for side in a.values()) <= 11
    assert a["TheTrip1.txt"] == a["TheTrip2.txt"] and a["ThePilot.txt"] == a["ThePilot2.txt"]
    assert episode_group("The-Clip-Show-2.txt") == episode_group("The-Clip-Show-1.txt")


def test_non_utf8_and_binary_files(tmp_path):
    raw = tmp_path / "raw"
    shutil.copytree(FIXTURES / "other_show", raw)
    page = (raw / "HarborLights-Ep01.txt").read_text().replace("bait shop", "caf\u00e9")
    (raw / "HarborLights-Ep01.txt").write_bytes(page.encode("cp1252"))
    (raw / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00")
    result = prepare(raw, Options(min_turns=5))
    files = files_by_name(result.manifest)
    assert files["HarborLights-Ep01.txt"]["status"] == "kept"
    assert "cp1252" in files["HarborLights-Ep01.txt"]["note"]
    assert files["image.png"]["status"] == "dropped"
    assert "binary" in files["image.png"]["reason"]
    text = "\n".join(line for ep in result.train + result.val for line in ep)
    assert "[Scene: The caf\u00e9, morning]" in text


@pytest.mark.e2e
@pytest.mark.parametrize("setup", ["missing", "empty", "no_episodes"])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(tmp_path, setup):
    raw = tmp_path / "raw"
    if setup != "missing":
        raw.mkdir()
    if setup == "no_episodes":
        shutil.copy(FIXTURES / "sitcom" / "quotes.txt", raw)
        (raw / "blob.bin").write_bytes(b"\x00\x01\x02")
    out = tmp_path / "out"
    result = run_cli("prepare", str(raw), str(out))
    assert result.returncode == 2
    assert result.stderr.startswith("error: ") and result.stderr.count("\n") == 1
    assert "Traceback" not in result.stderr
    assert not out.exists()


@pytest.mark.e2e
def test_bad_option_values_are_rejected():
    result = run_cli("prepare", "x", "y", "--val-fraction", "1.5")
    assert result.returncode == 2 and "Traceback" not in result.stderr


def test_write_outputs_replaces_a_previous_corpus(tmp_path):
    result = prepare(FIXTURES / "other_show", Options(min_turns=5, val_fraction=0.0))
    (tmp_path / "train.txt").write_text("old")
    write_outputs(tmp_path, result)
    assert (tmp_path / "train.txt").read_text().count(END_OF_TEXT) == 2  # 3 episodes
    assert (tmp_path / "val.txt").read_text() == ""
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.json", "train.txt", "val.txt"]
