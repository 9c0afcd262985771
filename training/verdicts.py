"""What blind readers' verdicts on `judge pack` packs give (training/JUDGING.md):

    python -m training judge score pack/ --verdicts pack/verdicts.jsonl --json result.json
    python -m training judge pool result.json result2.json ...   (several sets as one)
    python -m training judge pick pack/ [--side worse] --out picked.jsonl

`score` checks one reader's verdicts strictly and scores the two systems of a pack; `pool`
adds several sets' results of the same two systems; `pick` keeps the reader's better (or
worse) scene of each pair as a scenes file, for a tournament of scenes and for `training
prefer --chosen/--rejected`. Openings, scenes and packs are training/judge.py's.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Sequence
from pathlib import Path

from training.judge import (
    SCORES,
    SYSTEM_IDS,
    VERDICT_KEYS,
    JudgeError,
    check_out_file,
    load_scenes,
    write_jsonl,
    write_text_atomic,
)

# ----------------------------------------------------------------------------- pick

PICK_SIDES = ("better", "worse")


def pick(packs: Sequence[Path], side: str) -> list[dict]:
    """The reader's preferred scene (`side` "better") or the other one ("worse") of every
    judged pair of the packs (repeats left out), as the records of one scenes file, ready
    for `judge pack` again: the second round of a tournament of four scenes an opening
    (winners against winners, losers against losers) ends in the best and the worst of the
    four. The packs must hold scenes of one writer with one set of settings."""
    if side not in PICK_SIDES:
        raise JudgeError(f"--side must be one of {', '.join(PICK_SIDES)}, not {side!r}")
    if not packs:
        raise JudgeError("pick takes at least one judged pack")
    picked: dict[str, dict] = {}
    writer = None
    for pack_dir in packs:
        key = load_key(pack_dir)
        verdicts = read_verdicts(pack_dir / "verdicts.jsonl", key["pairs"])
        scenes = {}
        for s, meta in key["systems"].items():
            if writer is None:
                writer = (meta.get("model"), meta.get("settings"))
            elif (meta.get("model"), meta.get("settings")) != writer:
                raise JudgeError(
                    f"{pack_dir}: its scenes are not all of one writer and settings; "
                    "pick takes packs of one writer's own scenes"
                )
            scenes[s] = load_scenes(Path(meta["file"]))[1]
        for pid, p in key["pairs"].items():
            if p.get("repeat_of") is not None:
                continue
            better = verdicts[pid]["better"]
            taken = better if side == "better" else 3 - better
            opening = p["opening"]
            if opening in picked:
                raise JudgeError(f"{pack_dir}: opening {opening} is judged in an earlier pack too")
            record = scenes[p[f"scene{taken}"]].get(opening)
            if record is None:
                raise JudgeError(f"{pack_dir}: its key and scene files do not match ({opening})")
            picked[opening] = {**record, "label": side, "picked_from": str(pack_dir)}
    return [picked[i] for i in sorted(picked)]


def pick_cli(args) -> int:
    check_out_file(args.out)
    records = pick(args.packs, args.side)
    write_jsonl(args.out, records)
    print(f"wrote {args.out}: the {args.side} scene of {len(records)} judged pairs")
    return 0


# ----------------------------------------------------------------------------- score


def load_key(pack_dir: Path) -> dict:
    path = pack_dir / "key.json"
    try:
        key = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise JudgeError(
            f"{pack_dir} holds no key.json; give the folder `judge pack` wrote"
        ) from None
    except (OSError, ValueError) as e:
        raise JudgeError(f"{path} is not a readable key ({e})") from None
    if (
        not isinstance(key, dict)
        or not isinstance(key.get("pairs"), dict)
        or set(key.get("systems", {})) != set(SYSTEM_IDS)
    ):
        raise JudgeError(f"{path} is not a key `judge pack` writes")
    return key


def read_verdicts(path: Path, pair_ids: Iterable[str]) -> dict[str, dict]:
    """Verdicts by pair id, checked strictly: JSON lines (or one JSON array of objects),
    every pair exactly once, values in range, no unknown keys."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgeError(f"verdicts file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise JudgeError(f"verdicts file {path} cannot be read ({e})") from None
    items: list[tuple[str, object]] = []
    if text.lstrip().startswith("["):
        try:
            array = json.loads(text)
        except ValueError as e:
            raise JudgeError(f"{path}: not valid JSON ({e})") from None
        items = [(f"{path} item {k}", v) for k, v in enumerate(array, 1)]
    else:
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    items.append((f"{path}:{number}", json.loads(line)))
                except ValueError:
                    raise JudgeError(
                        f"{path}:{number}: not a JSON object (the file must "
                        "hold one JSON object per line, nothing else)"
                    ) from None
    wanted = set(pair_ids)
    verdicts: dict[str, dict] = {}
    for where, v in items:
        pair = _check_verdict(where, v)
        if pair not in wanted:
            raise JudgeError(f"{where}: there is no pair {pair}")
        if pair in verdicts:
            raise JudgeError(f"{where}: pair {pair} is judged twice")
        verdicts[pair] = v
    missing = sorted(wanted - set(verdicts), key=int)
    if missing:
        shown = ", ".join(missing[:10]) + (" ..." if len(missing) > 10 else "")
        raise JudgeError(f"{path}: no verdict for pair(s) {shown} ({len(missing)} missing)")
    return verdicts


def _is_int(value, lo: int, hi: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and lo <= value <= hi


def _check_verdict(where: str, v) -> str:
    if not isinstance(v, dict):
        raise JudgeError(f"{where}: expected a JSON object")
    unknown = set(v) - VERDICT_KEYS
    if unknown:
        raise JudgeError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}")
    for k in ("pair", "better", "real", "scene1", "scene2"):
        if k not in v:
            raise JudgeError(f"{where}: missing key {k!r}")
    if not _is_int(v["pair"], 1, 10**6):
        raise JudgeError(f"{where}: pair must be a pair number (got {v['pair']!r})")
    if not _is_int(v["better"], 1, 2):
        raise JudgeError(f"{where}: better must be 1 or 2 (got {v['better']!r})")
    if v["real"] in ("1", "2"):  # a scene number written as text, as the other answers read
        v["real"] = int(v["real"])
    if v["real"] not in (1, 2, "none", None) or isinstance(v["real"], bool):
        raise JudgeError(f'{where}: real must be 1, 2 or "none" (got {v["real"]!r})')
    for s in ("scene1", "scene2"):
        scores = v[s]
        if not isinstance(scores, dict) or set(scores) != set(SCORES):
            raise JudgeError(f"{where}: {s} must hold exactly {', '.join(SCORES)}")
        for k in SCORES:
            if not _is_int(scores[k], 1, 5):
                raise JudgeError(f"{where}: {s}.{k} must be a whole number 1-5 (got {scores[k]!r})")
    if "note" in v and not isinstance(v["note"], str):
        raise JudgeError(f"{where}: note must be text")
    return str(v["pair"])


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95 % Wilson score interval of a proportion k/n."""
    if n == 0:
        return (0.0, 1.0)
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def score(pack_dir: Path, verdicts_path: Path) -> dict:
    key = load_key(pack_dir)
    verdicts = read_verdicts(verdicts_path, key["pairs"])
    originals = {pid: p for pid, p in key["pairs"].items() if p.get("repeat_of") is None}
    repeats = {pid: p for pid, p in key["pairs"].items() if p.get("repeat_of") is not None}
    n = len(originals)
    result: dict = {
        "pack": str(pack_dir),
        "verdicts": str(verdicts_path),
        "pairs": n,
        "repeats": len(repeats),
        "systems": {},
    }
    labels = {s: key["systems"][s].get("label") or s for s in SYSTEM_IDS}
    if labels["A"] == labels["B"]:
        labels = {s: f"{labels[s]} [{s}]" for s in SYSTEM_IDS}
    for s in SYSTEM_IDS:
        wins = real = 0
        sums = dict.fromkeys(SCORES, 0)
        for pid, p in originals.items():
            v = verdicts[pid]
            slot = 1 if p["scene1"] == s else 2
            wins += v["better"] == slot
            real += v["real"] == slot
            for k in SCORES:
                sums[k] += v[f"scene{slot}"][k]
        lo, hi = wilson(wins, n)
        result["systems"][s] = {
            **key["systems"][s],
            "name": labels[s],
            "wins": wins,
            "win_rate": wins / n,
            "win_rate_ci95": [lo, hi],
            "taken_for_real": real,
            "taken_for_real_rate": real / n,
            **{k: sums[k] / n for k in SCORES},
        }
    first_wins = sum(verdicts[pid]["better"] == 1 for pid in originals)
    result["scene1_preferred_rate"] = first_wins / n
    result["self_agreement"] = _self_agreement(key, verdicts, repeats)
    return result


def _self_agreement(key: dict, verdicts: dict, repeats: dict) -> dict | None:
    if not repeats:
        return None
    same_winner = same_real = 0
    diffs: list[int] = []
    pairs = key["pairs"]
    for pid, p in repeats.items():
        oid = str(p["repeat_of"])
        o, v, w = pairs[oid], verdicts[oid], verdicts[pid]

        def winner(pair: dict, verdict: dict) -> str:
            return pair[f"scene{verdict['better']}"]

        def real(pair: dict, verdict: dict) -> str | None:
            r = verdict["real"]
            return pair[f"scene{r}"] if r in (1, 2) else None

        same_winner += winner(o, v) == winner(p, w)
        same_real += real(o, v) == real(p, w)
        for s in SYSTEM_IDS:
            slot_o = 1 if o["scene1"] == s else 2
            slot_r = 1 if p["scene1"] == s else 2
            diffs += [abs(v[f"scene{slot_o}"][k] - w[f"scene{slot_r}"][k]) for k in SCORES]
    return {
        "repeats": len(repeats),
        "same_winner": same_winner,
        "same_winner_rate": same_winner / len(repeats),
        "same_real": same_real,
        "mean_abs_score_diff": sum(diffs) / len(diffs),
    }


def _system_header(real: str, extra: str = "") -> str:
    return (
        f"{'system':<28} {'wins':>5} {'win rate':>9} {'95% CI':>15} {real:>15}"
        f" {'coherence':>9} {'humour':>7} {'voice':>6}{extra}"
    )


def _system_row(s: dict, real: str, extra: str = "") -> str:
    lo, hi = s["win_rate_ci95"]
    interval = f"[{lo:.0%}, {hi:.0%}]"
    return (
        f"{s['name'][:28]:<28} {s['wins']:>5} {s['win_rate']:>9.1%} {interval:>15} "
        f"{real:>15} {s['coherence']:>9.2f} {s['humour']:>7.2f} {s['voice']:>6.2f}{extra}"
    )


def format_score(result: dict) -> str:
    rows = [
        f"{result['pairs']} pairs (+{result['repeats']} repeated), verdicts {result['verdicts']}",
        _system_header("taken for real"),
    ]
    for s in result["systems"].values():
        real = f"{s['taken_for_real']} ({s['taken_for_real_rate']:.0%})"
        rows.append(_system_row(s, real))
    for s in result["systems"].values():
        if s.get("speed"):
            sp = s["speed"]
            rows.append(
                f"{s['name']}: {sp['mean_seconds']:.1f} s and {sp['mean_new_tokens']:.0f}"
                f" tokens a scene, {sp['tokens_per_s']:.1f} tokens/s per scene "
                f"({sp['concurrency']} at once)"
            )
    rows.append(f"judge: Scene 1 preferred in {result['scene1_preferred_rate']:.0%} of pairs")
    agree = result["self_agreement"]
    if agree:
        rows.append(
            f"judge self-agreement on {agree['repeats']} repeated pairs: same winner "
            f"{agree['same_winner']}/{agree['repeats']} ({agree['same_winner_rate']:.0%}), "
            f"same 'real' answer {agree['same_real']}/{agree['repeats']}, mean |score "
            f"difference| {agree['mean_abs_score_diff']:.2f}"
        )
    else:
        rows.append("judge self-agreement: no repeated pairs (pack with --repeat K)")
    return "\n".join(rows)


def score_cli(args) -> int:
    if args.json is not None and args.json.is_dir():
        raise JudgeError(f"--json {args.json} is a directory; give a file name")
    result = score(args.pack, args.verdicts)
    print(format_score(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


def pool(results: Sequence[dict]) -> dict:
    """Several sets' `score --json` results of the same two systems as one: wins and mean
    scores over all pairs, and how much the sets' win rates spread against what one fixed
    rate would give (binomial), since openings and readers vary between sets too."""
    if not results:
        raise JudgeError("pool takes at least one `judge score --json` result")
    names = None
    for r in results:
        these = sorted(s["name"] for s in r["systems"].values())
        if names is None:
            names = these
        elif these != names:
            raise JudgeError(
                f"{r.get('pack')} compares {' and '.join(these)}, not {' and '.join(names)}; "
                "pool sets of the same two systems"
            )
    n = sum(r["pairs"] for r in results)
    systems = {}
    for name in names:
        sets = [next(s for s in r["systems"].values() if s["name"] == name) for r in results]
        wins = sum(s["wins"] for s in sets)
        rates = [s["wins"] / r["pairs"] for s, r in zip(sets, results, strict=True)]
        p = wins / n
        mean_rate = sum(rates) / len(rates)
        spread = math.sqrt(sum((x - mean_rate) ** 2 for x in rates) / max(len(rates) - 1, 1))
        binomial = math.sqrt(p * (1 - p) / (n / len(results)))
        systems[name] = {
            "name": name,
            "wins": wins,
            "win_rate": p,
            "win_rate_ci95": list(wilson(wins, n)),
            "taken_for_real": sum(s["taken_for_real"] for s in sets),
            "wins_by_set": [s["wins"] for s in sets],
            "win_rate_sd_between_sets": spread if len(results) > 1 else None,
            "win_rate_sd_binomial": binomial,
            **{
                k: sum(s[k] * r["pairs"] for s, r in zip(sets, results, strict=True)) / n
                for k in SCORES
            },
        }
    return {"sets": [r.get("pack") for r in results], "pairs": n, "systems": systems}


def format_pool(result: dict) -> str:
    rows = [
        f"{len(result['sets'])} sets, {result['pairs']} pairs",
        _system_header("taken for real", "  wins by set"),
    ]
    for s in result["systems"].values():
        real = f"{s['taken_for_real']} ({s['taken_for_real'] / result['pairs']:.0%})"
        rows.append(_system_row(s, real, "  " + " · ".join(map(str, s["wins_by_set"]))))
    first = next(iter(result["systems"].values()))
    if first["win_rate_sd_between_sets"] is not None:
        rows.append(
            f"sets' win rates spread by {first['win_rate_sd_between_sets']:.1%} (sd); one fixed "
            f"rate would spread by ~{first['win_rate_sd_binomial']:.1%}"
        )
    return "\n".join(rows)


def pool_cli(args) -> int:
    if args.json is not None and args.json.is_dir():
        raise JudgeError(f"--json {args.json} is a directory; give a file name")
    results = []
    for path in args.results:
        try:
            r = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError) as e:
            raise JudgeError(
                f"{path} is not a readable `judge score --json` result ({e})"
            ) from None
        fields = ("name", "wins", "taken_for_real", *SCORES)
        ok = (
            isinstance(r, dict)
            and isinstance(r.get("pairs"), int)
            and r["pairs"] > 0
            and isinstance(r.get("systems"), dict)
            and len(r["systems"]) == 2
            and all(
                isinstance(x, dict) and all(f in x for f in fields) for x in r["systems"].values()
            )
        )
        if not ok:
            raise JudgeError(f"{path} is not a result `judge score --json` writes")
        results.append(r)
    result = pool(results)
    print(format_pool(result))
    if args.json is not None:
        write_text_atomic(args.json, json.dumps(result, indent=2, ensure_ascii=False) + "\n")
    return 0


def verdicts_cli(args) -> int:
    return {"score": score_cli, "pool": pool_cli, "pick": pick_cli}[args.judge_command](args)
