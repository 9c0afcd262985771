"""training.judge and training.verdicts: openings from val, scenes by the real engine,
blinded packs, strict scoring, pooled sets, picked scenes."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from training.__main__ import main
from training.judge import (
    JudgeError,
    load_scenes,
    make_openings,
    pack,
    read_jsonl,
    render_line,
    render_scene,
)
from training.verdicts import score, wilson

CAST = ("JERRY", "GEORGE", "ELAINE", "KRAMER")


def write_corpus(path: Path, train: list[str], val: list[str]) -> Path:
    path.mkdir(parents=True)
    for name, episodes in (("train", train), ("val", val)):
        (path / f"{name}.txt").write_text("\n<|endoftext|>\n".join(episodes) + "\n")
    return path


def episode(tag: str, scenes: int = 3, turns: int = 16) -> str:
    lines = []
    for s in range(scenes):
        lines += [f"[Scene: Place {tag}-{s}]", f"(Jerry enters, {tag} scene {s})"]
        for t in range(turns):
            lines.append(f"{CAST[t % 4]}: Line {t} of scene {s} in episode {tag}.")
            if t == 5:
                lines.append(f"(a direction in {tag} scene {s})")
    return "\n".join(lines)


@pytest.fixture
def corpus(tmp_path) -> Path:
    return write_corpus(
        tmp_path / "corpus",
        [episode(f"train{i}") for i in range(3)],
        [episode(f"val{i}") for i in range(5)],
    )


def run_cli(capsys, *args: str) -> tuple[int, str, str]:
    rc = main(["judge", *map(str, args)])
    out, err = capsys.readouterr()
    return rc, out, err


def one_line_error(rc: int, err: str, message: str) -> None:
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err


# ------------------------------------------------------------------------------- openings


def test_openings_come_from_val_spread_over_episodes_and_follow_the_seed(corpus):
    val = (corpus / "val.txt").read_text().split("\n<|endoftext|>\n")
    openings = make_openings(corpus, 10, seed=1)
    assert len(openings) == 10
    assert sorted({o["episode"] for o in openings}) == [0, 1, 2, 3, 4]
    assert all(sum(o["episode"] == e for o in openings) == 2 for e in range(5))
    for o in openings:
        text = val[o["episode"]]
        lines = text.strip().splitlines()
        assert lines[o["line"]] == o["opening"][0]
        assert f"episode val{o['episode']}." in o["opening"][0]
        assert 1 <= len(o["opening"]) <= 2 and all(":" in x for x in o["opening"])
        # the opening and its real continuation are the show's next lines, in one scene
        assert "\n".join(o["opening"] + o["continuation"]) in text
        assert not any(x.startswith("[Scene") for x in o["continuation"])
        assert len(o["continuation"]) <= 12
        assert sum(len(x) + 1 for x in o["continuation"]) <= 1000
        assert o["id"] == f"ep{o['episode']}:{o['line']}"
    ids = {o["id"] for o in openings}
    assert {o["id"] for o in make_openings(corpus, 10, seed=1)} == ids
    assert {o["id"] for o in make_openings(corpus, 10, seed=2)} != ids
    # windows of one set never overlap
    spans = sorted(
        (o["episode"], o["line"], o["line"] + len(o["opening"]) + len(o["continuation"]))
        for o in openings
    )
    for a, b in zip(spans, spans[1:], strict=False):
        assert a[0] != b[0] or a[2] <= b[1]


def test_train_openings_come_from_the_train_split_only(corpus, tmp_path, capsys):
    """`--split train`: openings for `training prefer`, never from the val split."""
    openings = make_openings(corpus, 6, seed=1, split="train")
    assert len(openings) == 6 and {o["split"] for o in openings} == {"train"}
    assert all("episode train" in o["opening"][0] for o in openings)
    assert sorted({o["episode"] for o in openings}) == [0, 1, 2]
    args = f"openings --data {corpus} --n 3 --seed 1 --split train --out {tmp_path / 't.jsonl'}"
    rc, text, _ = run_cli(capsys, *args.split())
    assert rc == 0 and "3 train episodes" in text
    with pytest.raises(JudgeError, match="--split must be train or val"):
        make_openings(corpus, 3, seed=1, split="test")


def test_openings_cli_and_its_errors(corpus, tmp_path, capsys):
    out = tmp_path / "openings.jsonl"
    rc, text, _ = run_cli(
        capsys,
        "openings",
        "--data",
        corpus,
        "--n",
        6,
        "--seed",
        3,
        "--out",
        out,
        "--max-lines",
        4,
        "--max-chars",
        120,
    )
    assert rc == 0 and "6 openings from 5 val episodes" in text
    records = read_jsonl(out, "openings")
    assert len(records) == 6
    assert all(
        len(r["continuation"]) <= 4 and sum(len(x) + 1 for x in r["continuation"]) <= 120
        for r in records
    )
    one_line_error(
        *run_cli(capsys, "openings", "--data", corpus, "--n", 500, "--seed", 1, "--out", out)[::2],
        "usable openings",
    )
    one_line_error(
        *run_cli(capsys, "openings", "--data", tmp_path / "nope", "--seed", 1, "--out", out)[::2],
        "does not exist",
    )


# ------------------------------------------------------------------------------- write


def test_write_uses_the_engine_resumes_and_checks_settings(
    corpus, tmp_path, tiny_model_dir, capsys
):
    openings = tmp_path / "openings.jsonl"
    assert (
        run_cli(capsys, "openings", "--data", corpus, "--n", 2, "--seed", 0, "--out", openings)[0]
        == 0
    )
    out = tmp_path / "tiny.jsonl"
    args = (
        "write",
        "--openings",
        openings,
        "--model",
        tiny_model_dir,
        "--set",
        "max_new_tokens=16",
        "--set",
        "temperature=0.7",
        "--label",
        "tiny",
        "--out",
        out,
        "--concurrency",
        2,
    )
    rc, _, err = run_cli(capsys, *args)
    assert rc == 0, err
    records = read_jsonl(out, "scenes")
    by_id = {o["id"]: o for o in read_jsonl(openings, "openings")}
    assert sorted(r["id"] for r in records) == sorted(by_id)
    for r in records:
        assert r["label"] == "tiny" and r["model"] == str(tiny_model_dir)
        assert r["settings"]["max_new_tokens"] == 16 and r["settings"]["temperature"] == 0.7
        assert r["settings"]["top_p"] == 0.95  # the rest are the bot's defaults
        assert r["opening"] == by_id[r["id"]]["opening"]
        assert not set(r["lines"]) & set(r["opening"])  # the prompt lines are not repeated
        assert 0 < r["new_tokens"] <= 16 and r["seconds"] > 0
    # resumable: only the missing scene is written again
    out.write_text(json.dumps(records[0]) + "\n")
    rc, text, err = run_cli(capsys, *args)
    assert rc == 0 and "1 scenes (2 of 2)" in text, err
    again = read_jsonl(out, "scenes")
    assert again[0] == records[0] and {r["id"] for r in again} == set(by_id)
    rc, text, _ = run_cli(capsys, *args)
    assert rc == 0 and "already written" in text and read_jsonl(out, "scenes") == again
    # the same file with other settings is refused, not mixed
    one_line_error(
        *run_cli(capsys, *args[:-4], "--set", "top_k=5", "--out", out)[::2], "another --out"
    )
    for bad, message in [
        ("bogus=1", "unknown setting: bogus"),
        ("temperature=9", "temperature must be between"),
        ("temperature", "expected key=value"),
        ("top_k=many", "top_k=many: not a number"),
    ]:
        one_line_error(
            *run_cli(
                capsys,
                "write",
                "--openings",
                openings,
                "--model",
                tiny_model_dir,
                "--set",
                bad,
                "--out",
                tmp_path / "x.jsonl",
            )[::2],
            message,
        )


def test_write_show_copies_the_real_continuations(corpus, tmp_path, capsys):
    openings = tmp_path / "openings.jsonl"
    run_cli(capsys, "openings", "--data", corpus, "--n", 4, "--seed", 5, "--out", openings)
    out = tmp_path / "show.jsonl"
    rc, _, err = run_cli(capsys, "write", "--openings", openings, "--model", "show", "--out", out)
    assert rc == 0, err
    by_id = {o["id"]: o for o in read_jsonl(openings, "openings")}
    records = read_jsonl(out, "scenes")
    assert len(records) == 4
    for r in records:
        assert r["label"] == "show" and r["lines"] == by_id[r["id"]]["continuation"]
    one_line_error(
        *run_cli(
            capsys, "write", "--openings", tmp_path / "none.jsonl", "--model", "show", "--out", out
        )[::2],
        "does not exist",
    )


# ------------------------------------------------------------------------------- pack

SECRETS = (
    "SECRETALPHA",
    "secret-model-x",
    "0.123",
    "BRAVOLABEL",
    "bravo-model",
    "0.456",
    "fileone",
    "filetwo",
    "temperature",
    "top_p",
)


def scene_files(tmp_path: Path, n: int = 10) -> tuple[Path, Path]:
    """Two systems' scenes for n openings, written differently (case, spacing, quotes)."""
    a, b = tmp_path / "fileone.jsonl", tmp_path / "filetwo.jsonl"
    rows_a, rows_b = [], []
    for i in range(n):
        opening = [f"JERRY: Opening number {i}."]
        base = {
            "id": f"ep{i % 3}:{10 * i}",
            "opening": opening,
            "seconds": 1.0,
            "new_tokens": 50,
            "partial": False,
        }
        rows_a.append(
            {
                **base,
                "label": "SECRETALPHA",
                "model": "/m/secret-model-x",
                "settings": {"temperature": 0.123},
                "lines": [f"Kramer :  It\u2019s pair {i},   first writer.", "(he leaves)"],
            }
        )
        rows_b.append(
            {
                **base,
                "label": "BRAVOLABEL",
                "model": "bravo-model",
                "settings": {"top_p": 0.456},
                "lines": [f"GEORGE: It's pair {i}, second writer."],
            }
        )
    a.write_text("".join(json.dumps(r) + "\n" for r in rows_a))
    b.write_text("".join(json.dumps(r) + "\n" for r in reversed(rows_b)))
    return a, b


def parse_pairs(text: str) -> dict[str, dict[str, list[str]]]:
    pairs = {}
    for block in text.split("## Pair ")[1:]:
        number = block.split("\n", 1)[0].strip()
        parts = re.findall(r"### (Opening|Scene 1|Scene 2)\n\n```text\n(.*?)\n```", block, re.S)
        pairs[number] = {name: body.splitlines() for name, body in parts}
    return pairs


def test_pack_blinds_balances_and_keeps_the_key_apart(tmp_path, capsys):
    a, b = scene_files(tmp_path)
    out = tmp_path / "pack"
    rc, text, err = run_cli(capsys, "pack", a, b, "--out", out, "--seed", 4, "--repeat", 3)
    assert rc == 0 and "10 pairs + 3 repeats" in text, err
    shown = (out / "pairs.md").read_text() + (out / "instructions.md").read_text()
    for secret in SECRETS:
        assert secret.lower() not in shown.lower(), secret
    key = json.loads((out / "key.json").read_text())
    assert key["systems"]["A"]["label"] == "SECRETALPHA"
    assert key["systems"]["B"]["model"] == "bravo-model"
    pairs = parse_pairs((out / "pairs.md").read_text())
    assert sorted(pairs, key=int) == [str(n) for n in range(1, 14)] == sorted(key["pairs"], key=int)
    originals = {k: p for k, p in key["pairs"].items() if p["repeat_of"] is None}
    repeats = {k: p for k, p in key["pairs"].items() if p["repeat_of"] is not None}
    assert len(originals) == 10 and len(repeats) == 3
    assert sum(p["scene1"] == "A" for p in originals.values()) == 5  # balanced
    assert len({p["opening"] for p in originals.values()}) == 10
    scenes = {s: {r["id"]: r for r in read_jsonl(f, "s")} for s, f in (("A", a), ("B", b))}
    for number, p in key["pairs"].items():
        shown_pair = pairs[number]
        assert shown_pair["Opening"] == scenes["A"][p["opening"]]["opening"]
        for slot in ("1", "2"):
            system = p[f"scene{slot}"]
            assert shown_pair[f"Scene {slot}"] == render_scene(
                scenes[system][p["opening"]]["lines"], 1000, 12
            )
        assert {p["scene1"], p["scene2"]} == {"A", "B"}
    for p in repeats.values():
        original = key["pairs"][str(p["repeat_of"])]
        assert original["repeat_of"] is None and original["opening"] == p["opening"]
        assert original["scene1"] == p["scene2"]  # shown the other way round
    # both writers' lines look the same on the page: case, spacing and quotes folded
    first = next(
        v for v in pairs.values() if any("first writer" in x for x in v["Scene 1"] + v["Scene 2"])
    )
    line = next(x for x in first["Scene 1"] + first["Scene 2"] if "first writer" in x)
    assert re.fullmatch(r"KRAMER: It's pair \d+, first writer\.", line)
    # another seed, another order; an existing pack is not overwritten by accident
    other = pack([a, b], tmp_path / "pack2", seed=5)
    assert [p["opening"] for p in other["pairs"].values()] != [
        p["opening"] for p in key["pairs"].values()
    ]
    one_line_error(*run_cli(capsys, "pack", a, b, "--out", out)[::2], "already holds a pack")
    assert run_cli(capsys, "pack", a, b, "--out", out, "--force")[0] == 0
    one_line_error(
        *run_cli(capsys, "pack", a, b, "--out", tmp_path / "p3", "--repeat", 11)[::2],
        "more than the 10 pairs",
    )


def test_render_line_normalises_format_only():
    assert render_line("  jerry :\tHello,   Newman\u2026 ") == "JERRY: Hello, Newman..."
    assert render_line("(Kramer  enters)") == "(Kramer enters)"
    assert render_line("He walks in.") == "He walks in."
    assert render_scene(["JERRY: " + "a" * 600, "GEORGE: " + "b" * 600], 1000) == [
        "JERRY: " + "a" * 600
    ]
    assert render_scene(["JERRY: a", "", "GEORGE: b", "ELAINE: c"], 0, 2) == [
        "JERRY: a",
        "GEORGE: b",
    ]
    assert len(render_scene(["JERRY: a"] * 30, 0)) == 30


def test_pack_refuses_mismatched_files(tmp_path):
    a, b = scene_files(tmp_path)
    rows = read_jsonl(b, "s")
    rows[0]["opening"] = ["GEORGE: another opening"]
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(JudgeError, match="differs between"):
        pack([a, b], tmp_path / "p")
    rows[0]["opening"], rows[1]["label"] = read_jsonl(a, "s")[9]["opening"], "other"
    b.write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(JudgeError, match="more than one system"):
        pack([a, b], tmp_path / "p")


# ------------------------------------------------------------------------------- score


def verdicts_for(key: dict, a_wins: set[str]) -> list[dict]:
    """A wins the openings in a_wins; B's scene is taken for real; A scores 4/3/2, B 2/2/2."""
    out = []
    for number, p in key["pairs"].items():
        slot = {p["scene1"]: 1, p["scene2"]: 2}
        winner = "A" if p["opening"] in a_wins else "B"
        scores = {
            "A": {"coherence": 4, "humour": 3, "voice": 2},
            "B": {"coherence": 2, "humour": 2, "voice": 2},
        }
        out.append(
            {
                "pair": int(number),
                "better": slot[winner],
                "real": slot["B"],
                "scene1": scores[p["scene1"]],
                "scene2": scores[p["scene2"]],
            }
        )
    return out


def test_score_computes_rates_means_and_self_agreement(tmp_path, capsys):
    a, b = scene_files(tmp_path)
    key = pack([a, b], tmp_path / "pack", seed=1, repeat=2)
    openings = sorted({p["opening"] for p in key["pairs"].values()})
    verdicts = verdicts_for(key, set(openings[:7]))
    # the judge changes its mind on one repeat: another winner and one score 1 point off
    repeat = next(v for v in verdicts if key["pairs"][str(v["pair"])]["repeat_of"])
    repeat["better"] = 3 - repeat["better"]
    repeat["scene1"] = {**repeat["scene1"], "humour": repeat["scene1"]["humour"] + 1}
    path = tmp_path / "verdicts.jsonl"
    path.write_text("\n".join(json.dumps(v) for v in verdicts) + "\n")
    result = score(tmp_path / "pack", path)
    sa, sb = result["systems"]["A"], result["systems"]["B"]
    assert result["pairs"] == 10 and result["repeats"] == 2
    assert (sa["wins"], sa["win_rate"], sb["wins"], sb["win_rate"]) == (7, 0.7, 3, 0.3)
    assert sa["win_rate_ci95"] == pytest.approx([0.3968, 0.8922], abs=1e-4)
    assert (sa["taken_for_real_rate"], sb["taken_for_real_rate"]) == (0.0, 1.0)
    assert (sa["coherence"], sa["humour"], sa["voice"]) == (4, 3, 2)
    assert (sb["coherence"], sb["humour"], sb["voice"]) == (2, 2, 2)
    assert sa["label"] == "SECRETALPHA" and sb["name"] == "BRAVOLABEL"
    assert sa["speed"] == {
        "scenes": 10,
        "mean_seconds": 1.0,
        "mean_new_tokens": 50,
        "tokens_per_s": 50.0,
        "concurrency": None,
    }
    agree = result["self_agreement"]
    assert (agree["repeats"], agree["same_winner"], agree["same_real"]) == (2, 1, 2)
    assert agree["mean_abs_score_diff"] == pytest.approx(1 / 12)
    # the CLI prints a table and writes the same numbers as JSON; a JSON array is accepted
    path.write_text(json.dumps(verdicts))
    rc, text, err = run_cli(
        capsys,
        "score",
        tmp_path / "pack",
        "--verdicts",
        path,
        "--json",
        tmp_path / "r" / "score.json",
    )
    assert rc == 0, err
    assert "SECRETALPHA" in text and "70.0%" in text and "same winner 1/2" in text
    saved = json.loads((tmp_path / "r" / "score.json").read_text())
    assert saved["systems"]["A"]["wins"] == 7


def test_pool_adds_sets_of_the_same_two_systems_and_refuses_others(tmp_path, capsys):
    a, b = scene_files(tmp_path)
    key = pack([a, b], tmp_path / "p1", seed=1)
    pack([b, a], tmp_path / "p2", seed=2)  # the same systems, the other way round
    openings = sorted({p["opening"] for p in key["pairs"].values()})
    results = []
    for name, a_wins in (("p1", openings[:7]), ("p2", openings[:7])):
        k = json.loads((tmp_path / name / "key.json").read_text())
        (tmp_path / name / "v.jsonl").write_text(
            "".join(json.dumps(v) + "\n" for v in verdicts_for(k, set(a_wins)))
        )
        verdicts, out = tmp_path / name / "v.jsonl", tmp_path / f"{name}.json"
        rc, _, err = run_cli(
            capsys, "score", tmp_path / name, "--verdicts", verdicts, "--json", out
        )
        assert rc == 0, err
        results.append(tmp_path / f"{name}.json")
    rc, text, err = run_cli(capsys, "pool", *results, "--json", tmp_path / "pooled.json")
    assert rc == 0, err
    pooled = json.loads((tmp_path / "pooled.json").read_text())
    alpha, bravo = pooled["systems"]["SECRETALPHA"], pooled["systems"]["BRAVOLABEL"]
    # p2 packed (b, a): its "A" is the second writer, so each writer's wins follow its name
    assert pooled["pairs"] == 20 and alpha["wins_by_set"] == [7, 3] and alpha["wins"] == 10
    assert bravo["wins_by_set"] == [3, 7] and alpha["win_rate"] == 0.5
    assert alpha["win_rate_ci95"] == pytest.approx(list(wilson(10, 20)))
    assert alpha["win_rate_sd_between_sets"] == pytest.approx(0.2828, abs=1e-4)
    assert "7 · 3" in text and "spread by 28.3%" in text
    # in verdicts_for the first system named in each key scores 4/3/2: p1's SECRETALPHA,
    # p2's BRAVOLABEL, so each writer averages over both sets
    assert alpha["coherence"] == 3 and bravo["coherence"] == 3
    # sets of other systems, or a file that is no result: one line, exit 2
    c = tmp_path / "third.jsonl"
    c.write_text(a.read_text().replace("SECRETALPHA", "CHARLIE"))
    k3 = pack([c, b], tmp_path / "p3", seed=3)
    (tmp_path / "p3" / "v.jsonl").write_text(
        "".join(json.dumps(v) + "\n" for v in verdicts_for(k3, set()))
    )
    assert run_cli(capsys, "score", tmp_path / "p3", "--verdicts", tmp_path / "p3" / "v.jsonl",
                   "--json", tmp_path / "p3.json")[0] == 0  # fmt: skip
    rc, _, err = run_cli(capsys, "pool", results[0], tmp_path / "p3.json")
    one_line_error(rc, err, "pool sets of the same two systems")
    rc, _, err = run_cli(capsys, "pool", results[0], a)
    one_line_error(rc, err, "is not a readable `judge score --json` result")
    (tmp_path / "odd.json").write_text('{"pairs": 10, "systems": {"A": {"wins": 3}}}')
    rc, _, err = run_cli(capsys, "pool", results[0], tmp_path / "odd.json")
    one_line_error(rc, err, "is not a result `judge score --json` writes")


def test_wilson_interval():
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(30, 30)
    assert hi == 1.0 and 0.88 < lo < 0.89
    assert wilson(5, 10)[0] == pytest.approx(1 - wilson(5, 10)[1])


def test_score_rejects_bad_verdicts_in_one_line(tmp_path, capsys):
    a, b = scene_files(tmp_path, n=4)
    key = pack([a, b], tmp_path / "pack", seed=2)
    good = verdicts_for(key, set())
    path = tmp_path / "v.jsonl"

    def case(verdicts: list, message: str, raw: str | None = None) -> None:
        path.write_text(
            raw if raw is not None else "\n".join(json.dumps(v) for v in verdicts) + "\n"
        )
        one_line_error(
            *run_cli(capsys, "score", tmp_path / "pack", "--verdicts", path)[::2], message
        )

    def changed(**kv) -> list:
        return [{**good[0], **kv}, *good[1:]]

    case(good[1:], f"no verdict for pair(s) {good[0]['pair']}")
    case(good + [good[0]], "judged twice")
    case(changed(better=3), "better must be 1 or 2")
    case(changed(better=True), "better must be 1 or 2")
    case(changed(real="maybe"), "real must be 1, 2")
    case(changed(pair=99), "there is no pair 99")
    case(changed(extra=1), "unknown key(s) extra")
    case(changed(scene1={"coherence": 6, "humour": 1, "voice": 1}), "scene1.coherence must")
    case(changed(scene2={"coherence": 2, "humour": 1}), "scene2 must hold exactly")
    case(changed(scene2={"coherence": 2, "humour": 1.5, "voice": 1}), "scene2.humour must")
    case([{k: v for k, v in good[0].items() if k != "better"}, *good[1:]], "missing key 'better'")
    case([], "not a JSON object", raw="```json\n" + json.dumps(good[0]) + "\n")
    one_line_error(*run_cli(capsys, "score", tmp_path, "--verdicts", path)[::2], "no key.json")
    one_line_error(
        *run_cli(capsys, "score", tmp_path / "pack", "--verdicts", tmp_path / "missing.jsonl")[::2],
        "does not exist",
    )
    # real may be "none" or null; a note is allowed
    path.write_text("\n".join(json.dumps({**v, "real": "none", "note": "meh"}) for v in good))
    assert score(tmp_path / "pack", path)["systems"]["B"]["taken_for_real"] == 0


# -------------------------------------------------------------------------------- pick


def one_writer(tmp_path: Path, name: str, n: int = 6) -> Path:
    """Scenes of one writer (same model and settings) for n openings; lines tagged `name`."""
    path = tmp_path / f"{name}.jsonl"
    rows = [
        {
            "id": f"ep0:{10 * i}",
            "opening": [f"JERRY: Opening number {i}."],
            "label": name,
            "model": "seinfeld",
            "settings": {"temperature": 0.7},
            "lines": [f"GEORGE: Scene {name} of opening {i}."],
            "seconds": 1.0,
            "new_tokens": 9,
        }
        for i in range(n)
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def judged(key: dict, out: Path, winner: dict[str, str]) -> None:
    """Verdicts: system winner[opening] ('A'/'B') is better on every pair, repeats too."""
    rows = []
    for number, p in key["pairs"].items():
        slot = {p["scene1"]: 1, p["scene2"]: 2}
        score = {"coherence": 3, "humour": 2, "voice": 3}
        rows.append(
            {"pair": int(number), "better": slot[winner[p["opening"]]], "real": None}
            | {"scene1": score, "scene2": score}
        )
    out.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_pick_runs_a_tournament_to_the_best_and_worst_of_four(tmp_path, capsys):
    a, b, c, d = (one_writer(tmp_path, s) for s in "abcd")
    ids = [f"ep0:{10 * i}" for i in range(6)]
    # opening i: the readers' order, best first (the truth the tournament must find)
    order = {i: list("abcd"[k:] + "abcd"[:k]) for k, i in enumerate(ids)}
    rank = {i: {s: n for n, s in enumerate(o)} for i, o in order.items()}

    def play(x: Path, y: Path, name: str, lookup) -> Path:
        key = pack([x, y], tmp_path / name, seed=3, repeat=1)
        winner = {i: "A" if lookup(i, "A") < lookup(i, "B") else "B" for i in ids}
        judged(key, tmp_path / name / "verdicts.jsonl", winner)
        return tmp_path / name

    def who(path: Path):  # scene text -> writer name, from a scenes file
        return {r["id"]: r["lines"][0].split()[2] for r in map(json.loads, path.open())}

    ab = play(a, b, "ab", lambda i, s: rank[i]["ab"[s == "B"]])
    cd = play(c, d, "cd", lambda i, s: rank[i]["cd"[s == "B"]])
    rc, _, err = run_cli(capsys, "pick", ab, cd, "--out", tmp_path / "twice.jsonl")
    one_line_error(rc, err, "judged in an earlier pack too")  # one scene an opening a file

    wins_ab, wins_cd = tmp_path / "wab.jsonl", tmp_path / "wcd.jsonl"
    lose_ab, lose_cd = tmp_path / "lab.jsonl", tmp_path / "lcd.jsonl"
    for packdir, win, lose in ((ab, wins_ab, lose_ab), (cd, wins_cd, lose_cd)):
        assert run_cli(capsys, "pick", packdir, "--out", win)[0] == 0
        assert run_cli(capsys, "pick", packdir, "--side", "worse", "--out", lose)[0] == 0
    names_w = {i: (who(wins_ab)[i], who(wins_cd)[i]) for i in ids}
    names_l = {i: (who(lose_ab)[i], who(lose_cd)[i]) for i in ids}
    final = play(wins_ab, wins_cd, "final", lambda i, s: rank[i][names_w[i]["AB".index(s)]])
    last = play(lose_ab, lose_cd, "last", lambda i, s: rank[i][names_l[i]["AB".index(s)]])
    best, worst = tmp_path / "best.jsonl", tmp_path / "worst.jsonl"
    assert run_cli(capsys, "pick", final, "--out", best)[0] == 0
    assert run_cli(capsys, "pick", last, "--side", "worse", "--out", worst)[0] == 0
    assert who(best) == {i: order[i][0] for i in ids}
    assert who(worst) == {i: order[i][-1] for i in ids}
    records = [json.loads(x) for x in best.open()]
    assert {r["label"] for r in records} == {"better"} and len(records) == len(ids)  # no repeats
    assert load_scenes(best)[1]["ep0:0"]["opening"] == ["JERRY: Opening number 0."]


def test_pick_refuses_unjudged_packs_and_mixed_writers_in_one_line(tmp_path, capsys):
    a, b = scene_files(tmp_path, n=4)  # two different writers
    key = pack([a, b], tmp_path / "mixed", seed=1)
    rc, _, err = run_cli(capsys, "pick", tmp_path / "mixed", "--out", tmp_path / "x.jsonl")
    one_line_error(rc, err, "verdicts")
    judged(
        key,
        tmp_path / "mixed" / "verdicts.jsonl",
        {p["opening"]: "A" for p in key["pairs"].values()},
    )
    rc, _, err = run_cli(capsys, "pick", tmp_path / "mixed", "--out", tmp_path / "x.jsonl")
    one_line_error(rc, err, "one writer")
    rc, _, err = run_cli(capsys, "pick", tmp_path / "nope", "--out", tmp_path / "x.jsonl")
    one_line_error(rc, err, "key.json")
    assert not (tmp_path / "x.jsonl").exists()
