"""A blind quality harness: openings from the val split, scenes for them, blinded pairs, scores.

    python -m training judge openings --data corpus --n 40 --seed 7 --out openings.jsonl
    python -m training judge write --openings openings.jsonl --model show --out show.jsonl
    python -m training judge write --openings openings.jsonl --model seinfeld --out a.jsonl
    python -m training judge pack show.jsonl a.jsonl --out pack/ --seed 7 --repeat 4
    (a blind reader fills pack/verdicts.jsonl following pack/instructions.md)
    python -m training judge score pack/ --verdicts pack/verdicts.jsonl --json result.json
    python -m training judge pool result.json result2.json ...   (several sets as one)

Openings are one or two dialogue lines where a scene starts (or mid-scene, with at least
MIN_AFTER_MID dialogue lines after them) in val.txt, each with the show's own next lines
(at most --max-lines lines, --max-chars characters, never past the scene's end). `write`
runs the bot's real engine (sitcom.engine.SceneEngine, started as bot.core starts it); a
file of scenes is resumable. `pack` shows the reader the opening and both continuations as
"Scene 1" / "Scene 2" in a balanced random order, rendered the same way whatever wrote
them; which system is which lives only in key.json. `score` checks the verdicts strictly
and reports per system: win rate (Wilson 95 % interval), how often it was taken for the
real show, mean coherence / humour / voice, and the judge's agreement with itself on the
repeated pairs. See training/JUDGING.md.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
import sys
import unicodedata
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

from sitcom.files import write_atomic
from sitcom.scenes.script import HEADING_RE, is_heading, is_turn, normalize_prompt
from training.corpus import CorpusError, load_corpus

MAX_LINES = 12  # lines of the real continuation
MAX_CHARS = 1000  # its characters (whole lines); ~200 tokens of the SmolLM2 tokenizer
MIN_AFTER_START = 8  # dialogue lines a scene needs after an opening at its start
MIN_AFTER_MID = 12  # ... and after an opening in the middle of a scene
START_SHARE = 0.7  # chance that an episode's next opening is a scene start
MAX_OPENING_CHARS = 400  # one opening line longer than this is a monologue, not an opening
SHOW = "show"  # --model show: the real continuations
SCORES = ("coherence", "humour", "voice")
VERDICT_KEYS = {"pair", "better", "real", "scene1", "scene2", "note"}
SYSTEM_IDS = ("A", "B")
EXAMPLE_VERDICT = {
    "pair": 1,
    "better": 2,
    "real": "none",
    "scene1": {"coherence": 2, "humour": 1, "voice": 3},
    "scene2": {"coherence": 4, "humour": 3, "voice": 4},
    "note": "2 keeps to the opening's idea",
}


class JudgeError(ValueError):
    """Bad input to a judge command; the message is one user-facing line."""


# ----------------------------------------------------------------------------- files


def read_jsonl(path: Path, what: str) -> list[dict]:
    """Objects of a JSON-lines file (blank lines skipped); JudgeError naming the bad line."""
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise JudgeError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise JudgeError(f"{what} {path} is a directory, not a file") from None
    except UnicodeDecodeError as e:
        raise JudgeError(f"{what} {path} is not UTF-8 text ({e.reason})") from None
    records = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except ValueError:
            raise JudgeError(f"{path}:{number}: not a JSON line") from None
        if not isinstance(record, dict):
            raise JudgeError(f"{path}:{number}: expected a JSON object")
        records.append(record)
    return records


def write_text_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_atomic(path, text)


def write_jsonl(path: Path, records: Iterable[dict]) -> None:
    write_text_atomic(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records))


def check_out_file(path: Path) -> None:
    if path.is_dir():
        raise JudgeError(f"--out {path} is a directory; give a file name")


# ----------------------------------------------------------------------------- openings


@dataclass(frozen=True)
class _Candidate:
    line: int  # index of the first opening line in the episode
    scene_start: bool
    place: str | None
    after: tuple[int, ...]  # indexes of the scene's lines after the first opening line


def _scenes(lines: Sequence[str]) -> list[tuple[str | None, list[int]]]:
    """(place, line indexes) per scene; lines before the first heading are a scene too."""
    scenes: list[tuple[str | None, list[int]]] = [(None, [])]
    for i, line in enumerate(lines):
        if is_heading(line):
            scenes.append((HEADING_RE.match(line).group("place"), []))
        else:
            scenes[-1][1].append(i)
    return [s for s in scenes if s[1]]


def _candidates(lines: Sequence[str]) -> list[_Candidate]:
    found = []
    for place, idx in _scenes(lines):
        turns = [i for i in idx if is_turn(lines[i])]
        for k, i in enumerate(turns):
            if len(lines[i]) > MAX_OPENING_CHARS:
                continue
            start = k == 0
            # counted after a one-line opening; a two-line opening keeps one line fewer
            if len(turns) - k - 1 < (MIN_AFTER_START if start else MIN_AFTER_MID):
                continue
            found.append(_Candidate(i, start, place, tuple(j for j in idx if j > i)))
    return found


def _continuation(
    lines: Sequence[str], after: Sequence[int], max_lines: int, max_chars: int
) -> list[str]:
    out: list[str] = []
    chars = 0
    for j in after:
        size = len(lines[j]) + 1
        if out and (len(out) >= max_lines or chars + size > max_chars):
            break
        out.append(lines[j])
        chars += size
    return out


def _episode_files(
    corpus_root: Path, episodes: Sequence[str], split: str = "val"
) -> list[str | None]:
    """The raw file of each episode of `split`, from data/prepare.py's manifest when it
    matches."""
    try:
        files = json.loads((corpus_root / "manifest.json").read_text(encoding="utf-8"))["files"]
        kept = [f for f in files if f.get("status") == "kept" and f.get("split") == split]
        names = [f["file"] for f in kept]
        sizes = [f["out_bytes"] for f in kept]
    except (OSError, ValueError, KeyError, TypeError):
        return [None] * len(episodes)
    if len(names) != len(episodes) or any(
        len(ep.encode()) + 1 != size for ep, size in zip(episodes, sizes, strict=True)
    ):
        return [None] * len(episodes)
    return names


def make_openings(
    corpus_root: str | Path,
    n: int,
    seed: int,
    *,
    max_lines: int = MAX_LINES,
    max_chars: int = MAX_CHARS,
    split: str = "val",
) -> list[dict]:
    """n openings spread evenly over the episodes of `split` (val: what judging uses; train:
    what `training prefer` learns from), round robin; mostly scene starts, some mid-scene;
    windows never overlapping; chosen by `seed`."""
    if n < 1:
        raise JudgeError(f"--n must be at least 1 (got {n})")
    if max_lines < 1 or max_chars < 1:
        raise JudgeError("--max-lines and --max-chars must be at least 1")
    if split not in ("train", "val"):
        raise JudgeError(f"--split must be train or val (got {split!r})")
    corpus = load_corpus(corpus_root, splits=(split,))
    texts = corpus.val if split == "val" else corpus.train
    files = _episode_files(corpus.root, texts, split)
    rng = random.Random(seed)
    pools: dict[int, list[_Candidate]] = {}
    episodes = [ep.splitlines() for ep in texts]
    for e, lines in enumerate(episodes):
        starts = [c for c in _candidates(lines) if c.scene_start]
        mids = [c for c in _candidates(lines) if not c.scene_start]
        rng.shuffle(starts)
        rng.shuffle(mids)
        pool = []
        while starts or mids:  # mostly scene starts, some mid-scene points for variety
            pool.append(
                (starts if starts and (not mids or rng.random() < START_SHARE) else mids).pop()
            )
        if pool:
            pools[e] = pool
    order = list(pools)
    rng.shuffle(order)
    taken: dict[int, list[tuple[int, int]]] = {e: [] for e in order}
    chosen: list[dict] = []
    while len(chosen) < n and pools:
        for e in list(order):
            if len(chosen) >= n:
                break
            record = _take(episodes[e], pools, taken, e, rng, max_lines, max_chars)
            if record is None:
                order.remove(e)
                pools.pop(e, None)
                continue
            record.update(
                episode=e,
                episode_file=files[e],
                seed=seed,
                split=split,
                corpus=str(corpus.root),
                manifest_sha256=corpus.manifest_sha256,
            )
            chosen.append(record)
    if len(chosen) < n:
        raise JudgeError(
            f"the {split} split of {corpus.root} holds only {len(chosen)} usable openings "
            f"(a scene with {MIN_AFTER_START}+ dialogue lines after its first); ask for fewer "
            "with --n"
        )
    chosen.sort(key=lambda r: (r["episode"], r["line"]))
    return [{"id": f"ep{r['episode']}:{r['line']}", **r} for r in chosen]


def _take(
    lines: Sequence[str],
    pools: dict[int, list[_Candidate]],
    taken: dict[int, list[tuple[int, int]]],
    e: int,
    rng: random.Random,
    max_lines: int,
    max_chars: int,
) -> dict | None:
    """The next candidate of episode e whose window overlaps no chosen one, as a record."""
    pool = pools.get(e, [])
    while pool:
        c = pool.pop(0)
        opening = [lines[c.line]]
        rest = list(c.after)
        if (
            rest
            and is_turn(lines[rest[0]])
            and len(lines[rest[0]]) <= MAX_OPENING_CHARS
            and rng.random() < 0.5
        ):
            opening.append(lines[rest.pop(0)])
        continuation = _continuation(lines, rest, max_lines, max_chars)
        if not continuation:
            continue
        span = (c.line, rest[len(continuation) - 1])
        if any(span[0] <= b and a <= span[1] for a, b in taken[e]):
            continue
        taken[e].append(span)
        return {
            "line": c.line,
            "scene_start": c.scene_start,
            "place": c.place,
            "opening": opening,
            "continuation": continuation,
        }
    return None


def openings_cli(args) -> int:
    check_out_file(args.out)
    split = getattr(args, "split", "val")
    records = make_openings(
        args.data,
        args.n,
        args.seed,
        max_lines=args.max_lines,
        max_chars=args.max_chars,
        split=split,
    )
    write_jsonl(args.out, records)
    episodes = len({r["episode"] for r in records})
    print(
        f"wrote {args.out}: {len(records)} openings from {episodes} {split} episodes "
        f"(seed {args.seed})"
    )
    return 0


def load_openings(path: Path) -> list[dict]:
    records = read_jsonl(path, "openings file")
    if not records:
        raise JudgeError(f"openings file {path} holds no openings")
    seen = set()
    for number, r in enumerate(records, 1):
        ok = (
            isinstance(r.get("id"), str)
            and _lines_ok(r.get("opening"))
            and _lines_ok(r.get("continuation"))
        )
        if not ok:
            raise JudgeError(f"{path}: opening {number} is not one `judge openings` writes")
        if r["id"] in seen:
            raise JudgeError(f"{path}: opening id {r['id']} appears twice")
        seen.add(r["id"])
    return records


def _lines_ok(value) -> bool:
    return isinstance(value, list) and bool(value) and all(isinstance(x, str) for x in value)


# ----------------------------------------------------------------------------- write


def parse_sets(items: Sequence[str]) -> dict[str, float | str]:
    """--set key=value pairs; numbers become floats (SceneSettings casts them)."""
    changes: dict[str, float | str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key, value = key.strip().replace("-", "_"), value.strip()
        if not sep or not key or not value:
            raise JudgeError(f"--set {item!r}: expected key=value, e.g. temperature=0.7")
        try:
            changes[key] = float(value)
        except ValueError:
            changes[key] = value
    return changes


def scene_settings(changes: dict):
    from sitcom.settings import SceneSettings

    try:
        return SceneSettings().with_changes(**changes)
    except ValueError as e:
        raise JudgeError(f"--set: {e}") from None
    except TypeError:
        words = [f"{k}={v}" for k, v in changes.items() if isinstance(v, str)]
        raise JudgeError(f"--set {', '.join(words)}: not a number") from None


def default_label(model: str, changes: dict) -> str:
    name = Path(model).name if os.sep in model or Path(model).is_dir() else model
    if not changes:
        return name
    return (
        name
        + " "
        + ",".join(
            f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in sorted(changes.items())
        )
    )


def _existing(out: Path, model: str, label: str, settings: dict) -> dict[str, dict]:
    """Scenes already in OUT, by opening id; JudgeError when they came from another run."""
    if not out.exists():
        return {}
    done = {}
    for r in read_jsonl(out, "scenes file"):
        if (r.get("model"), r.get("label"), r.get("settings")) != (model, label, settings):
            raise JudgeError(
                f"{out} holds scenes of {r.get('label')!r} ({r.get('model')}, other settings "
                "or label); write to another --out"
            )
        done[r.get("id")] = r
    return done


def _append(out: Path, record: dict) -> None:
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("a", encoding="utf-8") as f:
        f.write(json.dumps(record, ensure_ascii=False) + "\n")
        f.flush()
        os.fsync(f.fileno())


def write_cli(args) -> int:
    check_out_file(args.out)
    openings = load_openings(args.openings)
    changes = parse_sets(args.set or [])
    show = args.model == SHOW
    if show and changes:
        raise JudgeError("--set does not apply to --model show (the real continuations)")
    settings = {} if show else scene_settings(changes).as_dict()
    label = args.label or (SHOW if show else default_label(args.model, changes))
    done = _existing(args.out, args.model, label, settings)
    todo = [o for o in openings if o["id"] not in done]
    if not todo:
        print(f"{args.out}: all {len(openings)} scenes already written")
        return 0
    base = {"label": label, "model": args.model, "settings": settings}
    if show:
        for o in todo:
            _append(
                args.out,
                {
                    "id": o["id"],
                    **base,
                    "opening": o["opening"],
                    "lines": o["continuation"],
                    "seconds": None,
                    "new_tokens": None,
                    "partial": False,
                },
            )
        print(f"wrote {args.out}: {len(todo)} real continuations")
        return 0
    if args.concurrency < 1:
        raise JudgeError(f"--concurrency must be at least 1 (got {args.concurrency})")
    try:
        failed = asyncio.run(_write_scenes(args, todo, base, scene_settings(changes)))
    except KeyboardInterrupt:
        print("interrupted; run the same command again to go on where it stopped", file=sys.stderr)
        return 130
    wrote = len(todo) - failed
    print(f"wrote {args.out}: {wrote} scenes ({len(done) + wrote} of {len(openings)})")
    if failed:
        print(
            f"error: {failed} scenes failed; run the same command again to retry them",
            file=sys.stderr,
        )
        return 1
    return 0


async def _write_scenes(args, todo: list[dict], base: dict, settings) -> int:
    """Scenes for `todo` through the bot's engine, appended to OUT as each is done."""
    from bot import checkpoints
    from bot.core import MAX_PROMPT_CHARS, load_humour
    from sitcom.engine import EngineError, SceneEngine
    from sitcom.model.catalog import ModelLoadError
    from sitcom.model.serving import load_model

    checkpoints_dir = Path(os.environ.get("CHECKPOINTS_DIR") or "checkpoints").expanduser()
    _, model = checkpoints.startup_model(None, args.model, checkpoints_dir)
    try:  # best-of-n candidates ranked as the bot ranks them
        scorer = load_humour(args.humour, checkpoints_dir, operator=True)
    except ValueError as e:
        raise JudgeError(f"--humour: {e}") from None
    engine = SceneEngine(
        model=model,
        max_queue=max(32, args.concurrency),
        per_user_limit=args.concurrency,
        timeout_s=args.timeout,
        max_prompt_chars=MAX_PROMPT_CHARS,
        loader=load_model,
        # each scene's best_of candidates share the batch with it: room for all of them
        max_batch=min(8, args.concurrency * settings.best_of),
        scorer=scorer,
    )
    try:
        await engine.start()
    except (ModelLoadError, EngineError) as e:
        raise JudgeError(str(e)) from None
    gate = asyncio.Semaphore(args.concurrency)
    failed = 0
    total = len(todo)
    finished = 0

    async def one(opening: dict) -> None:
        nonlocal failed, finished
        prompt = "\n".join(opening["opening"])
        async with gate:
            try:
                job = await engine.submit(prompt, settings, user_id="judge")
                scene = await job.result()
            except EngineError as e:
                failed += 1
                print(f"{opening['id']}: {e}", file=sys.stderr)
                return
        own = scene.prompt_lines  # the engine says how many lines were the opening
        _append(
            args.out,
            {
                "id": opening["id"],
                **base,
                "model_path": str(model),
                "opening": opening["opening"],
                "lines": list(scene.lines[own:]),
                "seconds": round(scene.seconds, 3),
                "new_tokens": int(scene.new_tokens),
                "partial": bool(scene.partial),
                "concurrency": args.concurrency,
            },
        )
        finished += 1
        print(
            f"[{finished}/{total}] {opening['id']}: {len(scene.lines) - own} lines, "
            f"{scene.new_tokens} tokens, {scene.seconds:.1f} s",
            file=sys.stderr,
        )

    try:
        await asyncio.gather(*(one(o) for o in todo))
    finally:
        await engine.close(deadline_s=0)
    return failed


# ----------------------------------------------------------------------------- pack

_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201a": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u2033": '"',
        "\u2013": "-",
        "\u2014": "--",
        "\u2212": "-",
        "\u00a0": " ",
        "`": "'",
    }
)


def render_line(line: str) -> str:
    """One script line as the reader sees it, the same whoever wrote it: Unicode folded
    (NFKC, straight quotes, no control characters), whitespace collapsed, and a `Name:`
    speaker normalised as the engine normalises generated lines (`Jerry :` -> `JERRY:`)."""
    text = unicodedata.normalize("NFKC", line).translate(_TYPOGRAPHY)
    text = "".join(c for c in text if c == " " or not unicodedata.category(c).startswith("C"))
    text = " ".join(text.split())
    return normalize_prompt(text).strip() if ":" in text else text


def render_scene(lines: Sequence[str], max_chars: int, max_lines: int = 0) -> list[str]:
    """Rendered lines, cut (whole lines) at max_chars characters and max_lines lines
    (0: no cut)."""
    out: list[str] = []
    chars = 0
    for line in lines:
        text = render_line(line)
        if not text:
            continue
        if out and (
            max_chars and chars + len(text) + 1 > max_chars or max_lines and len(out) >= max_lines
        ):
            break
        out.append(text)
        chars += len(text) + 1
    return out


def load_scenes(path: Path) -> tuple[dict, dict[str, dict]]:
    """(system, scenes by opening id) of one `judge write` file."""
    records = read_jsonl(path, "scenes file")
    if not records:
        raise JudgeError(f"scenes file {path} holds no scenes")
    first = records[0]
    by_id: dict[str, dict] = {}
    for number, r in enumerate(records, 1):
        if not (
            isinstance(r.get("id"), str)
            and _lines_ok(r.get("opening"))
            and isinstance(r.get("lines"), list)
            and all(isinstance(x, str) for x in r["lines"])
        ):
            raise JudgeError(f"{path}: line {number} is not a scene `judge write` writes")
        if (r.get("label"), r.get("model"), r.get("settings")) != (
            first.get("label"),
            first.get("model"),
            first.get("settings"),
        ):
            raise JudgeError(f"{path} mixes scenes of more than one system (line {number})")
        if r["id"] in by_id:
            raise JudgeError(f"{path}: opening {r['id']} appears twice")
        by_id[r["id"]] = r
    system = {
        "label": first.get("label"),
        "model": first.get("model"),
        "settings": first.get("settings"),
        "file": str(path),
    }
    return system, by_id


def speed(records: Iterable[dict]) -> dict | None:
    """Mean seconds and new tokens per scene, and tokens per second, of written scenes
    (None for the show's, which have no timings)."""
    timed = [
        r
        for r in records
        if isinstance(r.get("seconds"), int | float)
        and isinstance(r.get("new_tokens"), int)
        and r["seconds"] > 0
    ]
    if not timed:
        return None
    seconds = sum(r["seconds"] for r in timed)
    tokens = sum(r["new_tokens"] for r in timed)
    return {
        "scenes": len(timed),
        "mean_seconds": seconds / len(timed),
        "mean_new_tokens": tokens / len(timed),
        "tokens_per_s": tokens / seconds,
        "concurrency": timed[0].get("concurrency"),
    }


def _balanced_orders(n: int, rng: random.Random) -> list[bool]:
    """n flags, True = system A is Scene 1; half of each (the odd one chosen at random)."""
    flags = [True] * (n // 2) + [False] * (n // 2)
    if n % 2:
        flags.append(rng.random() < 0.5)
    rng.shuffle(flags)
    return flags


def pack(
    files: Sequence[Path],
    out_dir: Path,
    *,
    seed: int = 0,
    repeat: int = 0,
    max_chars: int = MAX_CHARS,
    max_lines: int = MAX_LINES,
    force: bool = False,
) -> dict:
    """Write out_dir/pairs.md, instructions.md and key.json; returns the key."""
    if len(files) != 2:
        raise JudgeError(f"pack takes two scenes files (got {len(files)})")
    if repeat < 0 or max_chars < 0 or max_lines < 0:
        raise JudgeError("--repeat, --max-chars and --max-lines must not be negative")
    if out_dir.exists() and not out_dir.is_dir():
        raise JudgeError(f"--out {out_dir} is a file; give a folder")
    if (out_dir / "key.json").exists() and not force:
        raise JudgeError(
            f"{out_dir} already holds a pack (key.json); use another --out, "
            "or --force to replace it"
        )
    (sys_a, scenes_a), (sys_b, scenes_b) = load_scenes(files[0]), load_scenes(files[1])
    common = [i for i in scenes_a if i in scenes_b]
    if not common:
        raise JudgeError(f"{files[0]} and {files[1]} share no openings")
    for i in common:
        if scenes_a[i]["opening"] != scenes_b[i]["opening"]:
            raise JudgeError(
                f"opening {i} differs between {files[0]} and {files[1]}; were "
                "they written from the same openings file?"
            )
    if repeat > len(common):
        raise JudgeError(f"--repeat {repeat} is more than the {len(common)} pairs")
    missing = len(set(scenes_a) ^ set(scenes_b))
    if missing:
        print(
            f"note: {missing} openings are in only one of the files; they are left out",
            file=sys.stderr,
        )
    rng = random.Random(seed)
    common.sort()
    pairs = [
        {"opening": i, "a_first": a_first, "repeat_of": None}
        for i, a_first in zip(common, _balanced_orders(len(common), rng), strict=True)
    ]
    again = sorted(rng.sample(range(len(pairs)), repeat))
    repeats = [
        {"opening": pairs[k]["opening"], "a_first": not pairs[k]["a_first"], "repeat_of": k}
        for k in again
    ]
    everything = pairs + repeats
    for _ in range(200):  # a repeat never right beside its original
        rng.shuffle(everything)
        where = {id(p): n for n, p in enumerate(everything)}
        if all(abs(where[id(r)] - where[id(pairs[r["repeat_of"]])]) > 1 for r in repeats):
            break
    number = {id(p): n for n, p in enumerate(everything, 1)}
    systems = {
        "A": {**sys_a, "speed": speed(scenes_a[i] for i in common)},
        "B": {**sys_b, "speed": speed(scenes_b[i] for i in common)},
    }
    scenes = {"A": scenes_a, "B": scenes_b}
    key_pairs: dict[str, dict] = {}
    blocks = []
    for p in everything:
        n = number[id(p)]
        first, second = ("A", "B") if p["a_first"] else ("B", "A")
        key_pairs[str(n)] = {
            "opening": p["opening"],
            "scene1": first,
            "scene2": second,
            "repeat_of": None if p["repeat_of"] is None else number[id(pairs[p["repeat_of"]])],
        }
        opening = scenes_a[p["opening"]]["opening"]
        blocks.append(
            _pair_block(
                n,
                render_scene(opening, 0),
                render_scene(scenes[first][p["opening"]]["lines"], max_chars, max_lines),
                render_scene(scenes[second][p["opening"]]["lines"], max_chars, max_lines),
            )
        )
    key = {
        "version": 1,
        "seed": seed,
        "max_chars": max_chars,
        "max_lines": max_lines,
        "systems": systems,
        "pairs": key_pairs,
        "n_pairs": len(pairs),
        "n_repeats": len(repeats),
    }
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(
        out_dir / "pairs.md",
        f"# Pairs to judge ({len(everything)})\n\n"
        "Read instructions.md first.\n\n" + "\n".join(blocks),
    )
    write_text_atomic(out_dir / "instructions.md", instructions(len(everything)))
    write_text_atomic(out_dir / "key.json", json.dumps(key, indent=1, ensure_ascii=False) + "\n")
    return key


def _text_block(lines: Sequence[str]) -> str:
    return "```text\n" + ("\n".join(lines) if lines else "(nothing)") + "\n```\n"


def _pair_block(n: int, opening: list[str], one: list[str], two: list[str]) -> str:
    return (
        f"## Pair {n}\n\n### Opening\n\n{_text_block(opening)}\n"
        f"### Scene 1\n\n{_text_block(one)}\n### Scene 2\n\n{_text_block(two)}"
    )


def instructions(n: int) -> str:
    return f"""# How to judge

pairs.md holds {n} numbered pairs. Each pair is an opening (one or two lines of a Seinfeld
scene: its first lines, or lines from the middle of it) and two continuations of it,
"Scene 1" and "Scene 2". Each continuation may come from the real show or from another
writer; one or neither may be real. Some pairs may appear more than once. Judge every
pair on its own, from what is on the page.

For each pair decide:

- `better`: which scene is the better continuation of the opening, the one you would
  rather read: 1 or 2 (no ties).
- `real`: which scene you believe is from the real show: 1, 2, or "none" if you think
  neither is.
- for each scene, scores from 1 (worst) to 5 (best), whole numbers:
  - `coherence`: the lines follow from the opening and from each other; questions get
    answers that fit; the scene stays on one situation.
  - `humour`: how funny it is: a specific comic idea, setup and payoff, escalation.
  - `voice`: the characters sound like themselves (Jerry, George, Elaine, Kramer and the
    others are distinct people), and the scene reads like a script of the show.

## Verdict format

One JSON object per line (JSON lines), one line per pair, every pair exactly once, nothing
else in the file (no headings, no code fences). Keys: `pair` (the pair's number),
`better`, `real`, `scene1`, `scene2` (each with `coherence`, `humour`, `voice`), and
optionally `note` (a short reason, text). For example:

{json.dumps(EXAMPLE_VERDICT)}
"""


def pack_cli(args) -> int:
    key = pack(
        args.files,
        args.out,
        seed=args.seed,
        repeat=args.repeat,
        max_chars=args.max_chars,
        max_lines=args.max_lines,
        force=args.force,
    )
    print(
        f"wrote {args.out}/pairs.md ({key['n_pairs']} pairs + {key['n_repeats']} repeats), "
        f"instructions.md, key.json (keep the key away from the judge)"
    )
    return 0


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


def judge_cli(args) -> int:
    try:
        return {
            "openings": openings_cli,
            "write": write_cli,
            "pack": pack_cli,
            "pick": pick_cli,
            "score": score_cli,
            "pool": pool_cli,
        }[args.judge_command](args)
    except CorpusError as e:
        raise JudgeError(str(e)) from None
