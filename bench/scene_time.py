"""Quiet single-scene time of whole models as the bot serves them, compared in one run.

    python -m bench.scene_time seinfeld OLD_DEFAULT_DIR [--rounds 2] [--out scene_time.json]
    python -m bench.scene_time seinfeld seinfeld@best_of=4 seinfeld@guidance=1,best_of=2

Each model writes the same six openings one at a time through the real SceneEngine with the
default settings (one guided scene of at most 6 new lines and 200 tokens; with `best_of`
above 1 ranked by the shipped humour model), after a warm-up, in its own process; the models
take turns for `--rounds` rounds, so a machine that gets busier halfway hurts both. Prints
the median seconds a scene of each and each one's ratio to the first model.
`MODEL@key=value,...` serves MODEL with those settings changed (any SceneSettings field), so
presets are timed like models. The SmolLM2 default this replaced is in the cache of any
machine that ran it (`~/.cache/sitcom/seinfeld-<hash>`, a merged checkpoint dir with
model.gguf), or rebuild it from git history.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

OPENINGS = [
    "ELAINE: Jerry! George! You guys, listen!",
    "GEORGE: I have to tell you something, and you can't laugh.",
    "KRAMER: (bursting in) Jerry, I've got a business idea.",
    "JERRY: What is the deal with airline peanuts?",
    "ELAINE: I broke up with him. Because of his jacket.",
    "NEWMAN: Hello, Jerry.",
]


def parse_spec(spec: str) -> tuple[str, dict[str, float]]:
    """`MODEL@key=value,...` -> (MODEL, {key: value}); ValueError on a malformed change."""
    model, at, changes = spec.rpartition("@")  # a path may hold "@"; setting names do not
    if not at:
        return spec, {}
    values = {}
    for item in filter(None, changes.split(",")):
        key, sep, value = item.partition("=")
        if not sep:
            raise ValueError(f"{spec}: expected key=value after @, got {item!r}")
        values[key.strip()] = float(value)
    return model, values


async def scene_times(spec: str) -> dict:
    """Seconds and new tokens of each opening's scene, one at a time, after a warm-up."""
    from sitcom.engine import SceneEngine
    from sitcom.scenes.humour import load_default
    from sitcom.settings import SceneSettings

    model, changes = parse_spec(spec)
    settings = SceneSettings().with_changes(**changes)
    engine = SceneEngine(model, scorer=load_default())
    start = time.perf_counter()
    await engine.start()
    load_s = time.perf_counter() - start
    try:
        await (await engine.submit("JERRY: Hi.", settings.with_changes(max_new_tokens=16))).result()
        times, tokens = [], []
        for opening in OPENINGS:
            start = time.perf_counter()
            scene = await (await engine.submit(opening, settings)).result()
            times.append(round(time.perf_counter() - start, 3))
            tokens.append(scene.new_tokens)
    finally:
        await engine.close()
    return {
        "model": model,
        "settings": settings.as_dict(),
        "served": str(engine.served),
        "load_s": round(load_s, 1),
        "times": times,
        "tokens": tokens,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m bench.scene_time", description=__doc__.split("\n")[0]
    )
    parser.add_argument(
        "models", nargs="+", help="seinfeld, smollm2, or checkpoint dirs; MODEL@key=value,..."
    )
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("scene_time.json"))
    parser.add_argument("--one", help=argparse.SUPPRESS)  # the child: one model, JSON out
    args = parser.parse_args(argv)
    if args.one:
        print(json.dumps(asyncio.run(scene_times(args.one))))
        return 0
    for spec in args.models:
        try:
            from sitcom.settings import SceneSettings

            SceneSettings().with_changes(**parse_spec(spec)[1])
        except ValueError as e:
            parser.error(f"{spec}: {e}")
    runs: dict[str, list[dict]] = {m: [] for m in args.models}
    for _ in range(args.rounds):
        for model in args.models:
            child = [sys.executable, "-m", "bench.scene_time", model, "--one", model]
            done = subprocess.run(child, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                tail = (done.stderr.strip().splitlines() or ["no output"])[-1]
                print(f"error: {model}: {tail}", file=sys.stderr)
                return 1
            runs[model].append(json.loads(done.stdout.strip().splitlines()[-1]))
    first = statistics.median(t for r in runs[args.models[0]] for t in r["times"])
    summary = {}
    for model, results in runs.items():
        median = statistics.median(t for r in results for t in r["times"])
        summary[model] = {"median_s": round(median, 2), "ratio": round(median / first, 2)}
        print(f"{model}: median {median:.2f} s a scene, {median / first:.2f}x the first")
    args.out.write_text(json.dumps({"summary": summary, "runs": runs}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
