"""python -m data prepare RAW_DIR OUT_DIR | python -m data download OUT_DIR"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from data.download import DEFAULT_BASE_URL, DownloadError, download
from data.outputs import OutputPathError
from data.prepare import (
    Options,
    PrepareError,
    check_out_dir,
    check_outputs,
    prepare,
    summary,
    write_outputs,
)


def _fraction(text: str) -> float:
    value = float(text)
    if not 0.0 <= value < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {text}")
    return value


def _seconds(text: str) -> float:
    value = float(text)
    if not math.isfinite(value) or value < 0:  # time.sleep(nan) fails mid-download
        raise argparse.ArgumentTypeError(f"must be a finite number of seconds >= 0, got {text}")
    return value


def _cast(text: str) -> list[str]:
    names = [n.strip() for n in text.split(",") if n.strip()]
    if not names:
        raise argparse.ArgumentTypeError("give comma-separated names, e.g. JERRY,GEORGE")
    return names


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m data", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("prepare", help="clean raw transcript pages into train/val text")
    p.add_argument("raw_dir", type=Path)
    p.add_argument("out_dir", type=Path)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--val-fraction", type=_fraction, default=0.05)
    p.add_argument(
        "--min-turns",
        type=int,
        default=Options.min_turns,
        help="pages with fewer dialogue turns are not episodes (default %(default)s)",
    )
    p.add_argument(
        "--main-cast",
        type=_cast,
        default=None,
        help="comma-separated main characters for typo repair "
        "(default: the most frequent speakers)",
    )

    d = sub.add_parser("download", help="fetch transcript pages from the public site")
    d.add_argument("out_dir", type=Path)
    d.add_argument("--base-url", default=DEFAULT_BASE_URL)
    d.add_argument("--index", default=None, help="index page path (default: the site's)")
    d.add_argument("--delay", type=_seconds, default=1.0, help="seconds between requests")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "prepare":
            opts = Options(
                seed=args.seed,
                val_fraction=args.val_fraction,
                min_turns=args.min_turns,
                main_cast=args.main_cast,
            )
            check_out_dir(args.raw_dir, args.out_dir)
            check_outputs(args.out_dir)
            result = prepare(args.raw_dir, opts)
            write_outputs(args.out_dir, result)
            print(summary(result.manifest))
            print(f"\nwrote {args.out_dir}/train.txt, val.txt, manifest.json")
        else:
            kwargs = {"index": args.index} if args.index else {}
            report = download(args.out_dir, base_url=args.base_url, delay=args.delay, **kwargs)
            print(report)
    except (PrepareError, DownloadError, OutputPathError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        print(f"error: {exc.strerror or exc}: {exc.filename or ''}".rstrip(": "), file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
