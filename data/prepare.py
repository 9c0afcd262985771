"""Raw transcript pages -> train.txt, val.txt and manifest.json.

Two passes over the pages: the first learns what the site repeats on every page
(navigation, ads), who the recurring speakers are and who the main cast is; the second
cleans each page with that knowledge. Then near-duplicates go, the rest is split by
episode, and everything is written atomically.
"""

from __future__ import annotations

import codecs
import json
from collections import Counter
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

from data.clean import Episode, classify, parse_page, split_lines
from data.dedupe import find_duplicates
from data.outputs import check_output_file
from data.split import episode_groups, split_episodes
from sitcom.files import atomic_path
from sitcom.scenes.script import END_OF_TEXT, MAIN_CHARACTERS, is_turn, is_well_formed, speaker_of

MIN_TURNS = 50  # fewer dialogue turns than this is a quote page or a stub, not an episode
MAIN_CAST_SHARE = 0.05  # a speaker with at least this share of all turns is main cast
BOILERPLATE_SHARE = 0.3  # a line on this share of pages is site furniture
MAX_FILE_BYTES = 2_000_000  # real transcript pages are ~30-150 KB; bigger is not one episode
REPEATED_SHARE = 0.3  # a page whose long lines are repeats this often repeats itself
OUTPUT_FILES = ("train.txt", "val.txt", "manifest.json")  # what write_outputs writes
BOMS = (  # longest first: the UTF-32 LE mark begins with the UTF-16 LE one
    (codecs.BOM_UTF32_LE, "utf-32"),
    (codecs.BOM_UTF32_BE, "utf-32"),
    (codecs.BOM_UTF8, "utf-8-sig"),
    (codecs.BOM_UTF16_LE, "utf-16"),
    (codecs.BOM_UTF16_BE, "utf-16"),
)


class PrepareError(Exception):
    """Bad input: reported as one line, exit code 2."""


@dataclass
class Page:
    name: str
    text: str = ""
    bytes: int = 0
    encoding: str | None = None
    note: str | None = None
    error: str | None = None  # unreadable: why


@dataclass
class Options:
    seed: int = 0
    val_fraction: float = 0.05
    min_turns: int = MIN_TURNS
    main_cast: Sequence[str] | None = None  # None: derive from the corpus
    dup_threshold: float = 0.6
    max_file_bytes: int = MAX_FILE_BYTES


@dataclass
class Result:
    manifest: dict
    train: list[list[str]] = field(default_factory=list)
    val: list[list[str]] = field(default_factory=list)


def decode(raw: bytes) -> tuple[str, str]:
    """(text, encoding): by its byte-order mark (UTF-8/16/32), else UTF-8, else
    Windows-1252, else Latin-1 (which always decodes)."""
    for bom, encoding in BOMS:
        if raw.startswith(bom):
            try:
                return raw.decode(encoding), encoding
            except UnicodeDecodeError:
                raise ValueError(f"not valid {encoding} despite its byte-order mark") from None
    if b"\x00" in raw:
        raise ValueError("binary file or UTF-16 without a BOM (NUL bytes)")
    for encoding in ("utf-8", "cp1252", "latin-1"):
        try:
            return raw.decode(encoding), encoding
        except UnicodeDecodeError:
            continue
    raise AssertionError("latin-1 decodes any bytes")


def check_out_dir(raw_dir: Path, out_dir: Path) -> None:
    """OUT_DIR must not be RAW_DIR or inside it: the next prepare would read the corpus."""
    raw, out = raw_dir.resolve(), out_dir.resolve()
    if out == raw or out.is_relative_to(raw):
        raise PrepareError(
            f"the output folder {out_dir} is inside the raw folder {raw_dir}; its train.txt "
            "and val.txt would be read back as transcripts: write the corpus elsewhere"
        )


def read_pages(raw_dir: Path, max_file_bytes: int = MAX_FILE_BYTES) -> list[Page]:
    if not raw_dir.is_dir():
        raise PrepareError(f"raw transcript folder not found: {raw_dir}")
    paths = sorted(p for p in raw_dir.iterdir() if p.is_file() and not p.name.startswith("."))
    if not paths:
        raise PrepareError(f"raw transcript folder is empty: {raw_dir}")
    pages = []
    for path in paths:
        size = path.stat().st_size
        page = Page(path.name, bytes=size)
        pages.append(page)
        if path.name in OUTPUT_FILES:
            page.error = "output of `python -m data prepare`, not a transcript"
            continue
        if size > max_file_bytes:  # not read at all: a 200 MB page would cost GBs of RAM
            page.error = (
                f"too large: {size:,} bytes, over the {max_file_bytes:,}-byte cap "
                "for one transcript page"
            )
            continue
        try:
            page.text, page.encoding = decode(path.read_bytes())
        except ValueError as exc:
            page.error = str(exc)
        if page.encoding in ("cp1252", "latin-1"):
            page.note = f"not valid UTF-8; decoded as {page.encoding}"
        elif page.encoding and page.encoding != "utf-8":
            page.note = f"byte-order mark; decoded as {page.encoding}"
    return pages


def repeated_share(lines: Sequence[str], min_chars: int = 20) -> float:
    """Share of a page's longer lines that repeat an earlier line of the same page.

    Short lines (`JERRY: What?`) recur in any script; a page holding an episode twice has
    half its long lines repeated.
    """
    seen: set[str] = set()
    long_lines = repeats = 0
    for line in lines:
        if len(line) < min_chars:
            continue
        long_lines += 1
        repeats += line in seen
        seen.add(line)
    return repeats / long_lines if long_lines else 0.0


def first_copy(lines: Sequence[str], window: int = 10) -> list[str]:
    """The page up to where it starts over (its first `window` lines appear again)."""
    head = list(lines[:window])
    for start in range(window, len(lines) - window + 1):
        if lines[start] == head[0] and list(lines[start : start + window]) == head:
            return list(lines[:start])
    return list(lines)


def cut_to(ep: Episode, lines: list[str]) -> Episode:
    speakers = Counter(s for s in map(speaker_of, lines) if s)
    return Episode(lines=lines, speakers=speakers, layout=ep.layout)


def boilerplate_lines(texts: Sequence[str], share: float = BOILERPLATE_SHARE) -> frozenset[str]:
    """Lines (other than dialogue) repeated on a large share of pages: the site's furniture."""
    if len(texts) < 3:
        return frozenset()
    df: Counter = Counter()
    for text in texts:
        df.update({line for line, _ in split_lines(text)})
    cutoff = max(3, share * len(texts))
    return frozenset(line for line, n in df.items() if n >= cutoff and classify(line)[0] != "turn")


def derive_main_cast(
    turns: Counter, share: float = MAIN_CAST_SHARE, limit: int = 8
) -> tuple[str, ...]:
    """The speakers with a large share of all turns; Seinfeld's four when none stand out."""
    total = sum(turns.values())
    cast = [
        name
        for name, n in turns.most_common(limit)
        if total and n / total >= share and " AND " not in name
    ]
    return tuple(cast) or MAIN_CHARACTERS


def prepare(raw_dir: Path, options: Options | None = None) -> Result:
    opts = options or Options()
    pages = read_pages(raw_dir, opts.max_file_bytes)
    readable = [p for p in pages if p.error is None]
    boilerplate = boilerplate_lines([p.text for p in readable])

    # Pass 1: speakers as written, for the main cast and the recurring-speaker vocabulary.
    raw_turns: Counter = Counter()
    pages_per_speaker: Counter = Counter()
    for page in readable:
        speakers = parse_page(page.text, main_cast=(), boilerplate=boilerplate).speakers
        raw_turns.update(speakers)
        pages_per_speaker.update(speakers.keys())
    main = (
        tuple(s.upper() for s in opts.main_cast) if opts.main_cast else derive_main_cast(raw_turns)
    )
    known = frozenset(name for name, n in pages_per_speaker.items() if n >= 2)

    # Pass 2: clean every page.
    entries: dict[str, dict] = {}
    episodes: dict[str, Episode] = {}
    repeating: set[str] = set()
    for page in pages:
        entry = {"file": page.name, "bytes": page.bytes, "encoding": page.encoding}
        if page.note:
            entry["note"] = page.note
        entries[page.name] = entry
        if page.error:
            entry.update(status="dropped", reason=page.error, lines=0, turns=0)
            continue
        ep = parse_page(page.text, main_cast=main, boilerplate=boilerplate, known_speakers=known)
        entry.update(
            lines=page.text.count("\n") + 1,
            layout=ep.layout,
            turns=ep.turns,
            out_lines=len(ep.lines),
            speakers=dict(ep.speakers.most_common()),
        )
        if ep.turns < opts.min_turns or len(ep.speakers) < 2:
            entry.update(
                status="dropped",
                reason=(
                    f"no script body: {ep.turns} dialogue turns by {len(ep.speakers)} speakers "
                    f"(an episode needs {opts.min_turns}+ turns by 2+ speakers)"
                ),
            )
            continue
        repeated = repeated_share(ep.lines)
        if repeated > REPEATED_SHARE:
            # The same episode pasted several times: keep one copy. Kept whole, it would
            # outweigh the corpus and win the near-duplicate check against the real page.
            copy = first_copy(ep.lines)
            if repeated_share(copy) > REPEATED_SHARE:
                entry.update(
                    status="dropped",
                    repeated=round(repeated, 3),
                    reason=(f"page repeats itself: {repeated:.0%} of its long lines are repeats"),
                )
                continue
            entry["note"] = (
                f"page repeats itself: kept its first copy, {len(copy)} of {len(ep.lines)} lines"
            )
            ep = cut_to(ep, copy)
            entry.update(
                turns=ep.turns, out_lines=len(ep.lines), speakers=dict(ep.speakers.most_common())
            )
            repeating.add(page.name)
        episodes[page.name] = ep

    dupes = find_duplicates(
        {name: ep.lines for name, ep in episodes.items()},
        threshold=opts.dup_threshold,
        demote=repeating,
    )
    for name, (original, score) in dupes.items():
        entries[name].update(
            status="dropped",
            duplicate_of=original,
            similarity=score,
            reason=f"near-duplicate of {original} (Jaccard {score})",
        )
        del episodes[name]
    if not episodes:
        raise PrepareError(f"no episodes left after cleaning {len(pages)} files in {raw_dir}")

    split = split_episodes(episodes, opts.val_fraction, opts.seed)
    if opts.val_fraction > 0 and "val" not in split.values():
        raise PrepareError(
            f"only {len(episodes)} episode(s) left after cleaning {len(pages)} files in "
            f"{raw_dir} (parts of one episode count once); a corpus needs at least 2 "
            "episodes, one of them for validation"
        )
    group_of = {name: key for key, names in episode_groups(episodes).items() for name in names}
    result = Result(manifest={})
    for name, ep in episodes.items():
        well = sum(is_well_formed(line) for line in ep.lines)
        entries[name].update(
            status="kept",
            split=split[name],
            group=group_of[name],
            out_bytes=len("\n".join(ep.lines).encode()) + 1,
            well_formed=round(well / max(len(ep.lines), 1), 4),
        )
        (result.val if split[name] == "val" else result.train).append(ep.lines)
    result.manifest = _manifest(entries, episodes, opts, main)
    return result


def _manifest(
    entries: dict[str, dict], episodes: dict[str, Episode], opts: Options, main: tuple[str, ...]
) -> dict:
    lines = [line for ep in episodes.values() for line in ep.lines]
    speakers: Counter = Counter()
    for ep in episodes.values():
        speakers.update(ep.speakers)
    kept = [e for e in entries.values() if e["status"] == "kept"]
    return {
        "seed": opts.seed,
        "val_fraction": opts.val_fraction,
        "min_turns": opts.min_turns,
        "main_cast": list(main),
        "main_cast_source": "option" if opts.main_cast else "derived from the corpus",
        "totals": {
            "files": len(entries),
            "kept": len(kept),
            "dropped": len(entries) - len(kept),
            "train": sum(e["split"] == "train" for e in kept),
            "val": sum(e["split"] == "val" for e in kept),
            "turns": sum(1 for line in lines if is_turn(line)),
            "lines": len(lines),
            "bytes": sum(e["out_bytes"] for e in kept),
            "well_formed": round(sum(map(is_well_formed, lines)) / max(len(lines), 1), 4),
            "speakers": len(speakers),
        },
        "top_speakers": dict(speakers.most_common(15)),
        "files": [entries[name] for name in sorted(entries)],
    }


def episodes_text(episodes: Sequence[Sequence[str]]) -> str:
    """Episodes separated by an END_OF_TEXT line."""
    if not episodes:
        return ""
    return f"\n{END_OF_TEXT}\n".join("\n".join(ep) for ep in episodes) + "\n"


def check_outputs(out_dir: Path) -> None:
    """OutputPathError unless each output file is a regular file or a new name (renaming over
    a symbolic link or a device node would replace it)."""
    for name in OUTPUT_FILES:
        check_output_file(out_dir / name, "output")


def write_outputs(out_dir: Path, result: Result) -> None:
    """All three files to temporary names first, then renamed: never a half-written corpus."""
    check_outputs(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    contents = {
        "train.txt": episodes_text(result.train),
        "val.txt": episodes_text(result.val),
        "manifest.json": json.dumps(result.manifest, indent=1, ensure_ascii=False) + "\n",
    }
    # All three are written before any is renamed: a full disk changes none of them.
    with ExitStack() as stack:
        for name, text in contents.items():
            tmp = stack.enter_context(atomic_path(out_dir / name))
            tmp.write_text(text, encoding="utf-8", newline="\n")
        check_outputs(out_dir)  # again, just before the renames


def summary(manifest: dict) -> str:
    """A plain-text table for the terminal."""
    t = manifest["totals"]
    rows = [
        ("files", t["files"]),
        ("episodes kept", t["kept"]),
        ("dropped", t["dropped"]),
        ("train / val episodes", f"{t['train']} / {t['val']}"),
        ("dialogue turns", t["turns"]),
        ("lines", t["lines"]),
        ("bytes", t["bytes"]),
        ("well-formed lines", f"{t['well_formed']:.2%}"),
        ("speakers", t["speakers"]),
        ("main cast", ", ".join(manifest["main_cast"])),
    ]
    width = max(len(k) for k, _ in rows)
    out = [f"{k:<{width}}  {v}" for k, v in rows]
    out += ["", f"{'top speakers':<{width}}  turns"]
    out += [f"{name:<{width}}  {n}" for name, n in list(manifest["top_speakers"].items())[:10]]
    dropped = [e for e in manifest["files"] if e["status"] == "dropped"]
    if dropped:
        out += ["", "dropped files:"]
        out += [f"  {e['file']}: {e['reason']}" for e in dropped]
    return "\n".join(out)
