"""A blind quality harness: openings from the val split, scenes for them, blinded pairs, scores.

    python -m training judge openings --data corpus --n 40 --seed 7 --out openings.jsonl
    python -m training judge write --openings openings.jsonl --model show --out show.jsonl
    python -m training judge write --openings openings.jsonl --model seinfeld --out a.jsonl
    python -m training judge pack show.jsonl a.jsonl --out pack/ --seed 7 --repeat 4
    (a blind reader fills pack/verdicts.jsonl following pack/instructions.md)
    python -m training judge score pack/ --verdicts pack/verdicts.jsonl --json result.json

Openings are one or two dialogue lines where a scene starts (or mid-scene, with at least
MIN_AFTER_MID dialogue lines after them) in val.txt, each with the show's own next lines
(at most --max-lines lines, --max-chars characters, never past the scene's end). `write`
runs the bot's real engine (sitcom.engine.SceneEngine, started as bot.core starts it); a
file of scenes is resumable. `pack` shows the reader the opening and both continuations as
"Scene 1" / "Scene 2" in a balanced random order, rendered the same way whatever wrote
them; which system is which lives only in key.json. `score`, `pool` and `pick` (what readers'
verdicts give) are training/verdicts.py's. See training/JUDGING.md.
"""

from __future__ import annotations

import asyncio
import json
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


def judge_cli(args) -> int:
    try:
        return {
            "openings": openings_cli,
            "write": write_cli,
            "pack": pack_cli,
        }[args.judge_command](args)
    except CorpusError as e:
        raise JudgeError(str(e)) from None
