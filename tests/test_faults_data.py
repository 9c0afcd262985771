"""Issue 8, `python -m data prepare`: our own outputs, self-repeating and huge pages, UTF-16,
and a corpus too small to validate on."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from data.prepare import Options, PrepareError, prepare, write_outputs

ROOT = Path(__file__).resolve().parent.parent
OTHER_SHOW = ROOT / "tests" / "fixtures" / "data" / "other_show"
OPTS = Options(min_turns=5, val_fraction=0.3)


def run_cli(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "data", *args], cwd=ROOT, capture_output=True, text=True, timeout=60
    )


def by_name(manifest: dict) -> dict[str, dict]:
    return {entry["file"]: entry for entry in manifest["files"]}


def raw_copy(tmp_path: Path) -> Path:
    raw = tmp_path / "raw"
    shutil.copytree(OTHER_SHOW, raw)
    return raw


# -- 2. validation text never leaks into training ---------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("inside", [".", "corpus", "a/b"])
def test_out_inside_raw_is_refused(tmp_path, inside):
    raw = raw_copy(tmp_path)
    before = sorted(p.name for p in raw.iterdir())
    proc = run_cli("prepare", str(raw), str(raw / inside), "--min-turns", "5")
    assert proc.returncode == 2
    assert proc.stderr.startswith("error: ") and proc.stderr.count("\n") == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert sorted(p.name for p in raw.iterdir()) == before  # nothing written into RAW


def test_our_own_output_files_are_never_read_as_transcripts(tmp_path):
    raw = raw_copy(tmp_path)
    first = prepare(raw, OPTS)
    write_outputs(raw, first)  # e.g. an older version, or a corpus copied into RAW by hand
    again = prepare(raw, OPTS)
    files = by_name(again.manifest)
    for name in ("train.txt", "val.txt", "manifest.json"):
        assert files[name]["status"] == "dropped" and "prepare" in files[name]["reason"]
    assert again.manifest["totals"]["kept"] == first.manifest["totals"]["kept"]
    assert again.train == first.train and again.val == first.val


# -- 18. pages that repeat themselves; a cap on file size ---------------------------------


def test_a_page_repeating_itself_loses_to_the_genuine_one(tmp_path):
    raw = raw_copy(tmp_path)
    page = (raw / "HarborLights-Ep01.txt").read_text()
    (raw / "HarborLights-Ep01-mirror.txt").write_text(page * 4)
    result = prepare(raw, OPTS)
    files = by_name(result.manifest)
    assert files["HarborLights-Ep01.txt"]["status"] == "kept"
    mirror = files["HarborLights-Ep01-mirror.txt"]
    assert mirror["status"] == "dropped" and "repeats itself" in mirror["note"]
    assert mirror["duplicate_of"] == "HarborLights-Ep01.txt"
    assert len(result.train) + len(result.val) == 3


def test_a_self_repeating_page_alone_keeps_one_copy(tmp_path):
    raw = raw_copy(tmp_path)
    page = raw / "HarborLights-Ep01.txt"
    single = prepare(raw, OPTS)
    once = by_name(single.manifest)["HarborLights-Ep01.txt"]
    page.write_text((page.read_text() + "\n\n") * 4)
    result = prepare(raw, OPTS)
    entry = by_name(result.manifest)["HarborLights-Ep01.txt"]
    assert entry["status"] == "kept" and "kept its first copy" in entry["note"]
    assert entry["turns"] == once["turns"]
    # at most the next copy's page header (site furniture on a real site) is left over
    assert once["out_lines"] <= entry["out_lines"] <= once["out_lines"] + 2


def test_oversized_files_are_dropped_unread_with_a_reason(tmp_path):
    raw = raw_copy(tmp_path)
    big = raw / "HarborLights-Ep04.txt"
    big.write_text((raw / "HarborLights-Ep02.txt").read_text() * 200)
    result = prepare(raw, Options(min_turns=5, val_fraction=0.3, max_file_bytes=50_000))
    entry = by_name(result.manifest)["HarborLights-Ep04.txt"]
    assert entry["status"] == "dropped" and "too large" in entry["reason"]
    assert "50,000" in entry["reason"] and entry["bytes"] == big.stat().st_size
    assert Options().max_file_bytes >= 1_000_000  # real pages are ~30-150 KB


# -- 19. UTF-16 with a BOM ------------------------------------------------------------------


@pytest.mark.parametrize("encoding", ["utf-16", "utf-16-be", "utf-8-sig"])
def test_utf16_and_bom_transcripts_are_decoded(tmp_path, encoding):
    raw = raw_copy(tmp_path)
    page = raw / "HarborLights-Ep02.txt"
    text = page.read_text()
    data = text.encode(encoding)
    if encoding == "utf-16-be":
        data = b"\xfe\xff" + data
    page.write_bytes(data)
    result = prepare(raw, OPTS)
    entry = by_name(result.manifest)["HarborLights-Ep02.txt"]
    assert entry["status"] == "kept", entry
    joined = "\n".join(line for ep in result.train + result.val for line in ep)
    assert "\x00" not in joined and "\ufeff" not in joined


def test_nul_bytes_without_a_bom_name_the_likely_cause(tmp_path):
    raw = raw_copy(tmp_path)
    (raw / "HarborLights-Ep02.txt").write_bytes(
        (raw / "HarborLights-Ep02.txt").read_text().encode("utf-16-le")
    )
    result = prepare(raw, OPTS)
    entry = by_name(result.manifest)["HarborLights-Ep02.txt"]
    assert entry["status"] == "dropped" and "UTF-16 without a BOM" in entry["reason"]


# -- 20. too few episodes to validate on -------------------------------------------------


@pytest.mark.e2e
def test_one_episode_fails_in_prepare_with_the_minimum(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    shutil.copy(OTHER_SHOW / "HarborLights-Ep01.txt", raw)
    with pytest.raises(PrepareError, match="at least 2"):
        prepare(raw, OPTS)
    out = tmp_path / "out"
    proc = run_cli("prepare", str(raw), str(out), "--min-turns", "5")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert "at least 2" in proc.stderr and not out.exists()


def test_two_episodes_are_enough(tmp_path):
    raw = tmp_path / "raw"
    raw.mkdir()
    for name in ("HarborLights-Ep01.txt", "HarborLights-Ep02.txt"):
        shutil.copy(OTHER_SHOW / name, raw)
    result = prepare(raw, OPTS)
    assert len(result.train) == 1 and len(result.val) == 1
    json.dumps(result.manifest)


# -- 10. (data) nan is not a delay ---------------------------------------------------------


@pytest.mark.e2e
@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_download_delay_must_be_finite(tmp_path, value):
    proc = run_cli(
        "download", str(tmp_path / "raw"), "--delay", value, "--base-url", "http://127.0.0.1:9"
    )
    assert proc.returncode == 2 and "finite" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "raw").exists()
