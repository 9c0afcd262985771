"""Speed benchmark: every way we can serve a scene, measured in one run on the same model.

    python -m bench [--checkpoint DIR] [--tokens 200] [--out bench_results] [--quick]

Single stream (greedy, one 200-token scene): plain transformers generate() fp32 is the
baseline; the engine's torch path (sitcom.decoding.generation, bf16 autocast where the CPU has it);
llama.cpp through llama-cpp-python on the packaged Q4_1 GGUF and on our exported Q8_0,
raw and through sitcom.model.llamacpp with all guards. Then 1, 4 and 8 concurrent requests through
the real SceneEngine queue on both backends, beside raw llama.cpp decoding as many
sequences (no guards: what continuous batching is measured against). Then contention: one
scene per backend with the machine quiet and with one busy process (a Python spin loop)
beside it, with the thread policy on auto and with threads fixed at every core (the old
behaviour). Each measurement runs in its own process so load time and peak RSS belong to
one engine. The header names the CPU and its SIMD flags. The machine is shared: compare
ratios from the same run, not absolute numbers across runs.

    python -m bench --workers [--workers-model tiny|seinfeld|DIR] [--workers-scenes 64]

measures only the scale-out row: scenes per minute through the Redis work queue with 1,
then 2 `python -m bot worker` processes of one thread each, the same jobs each time, and
their ratio (needs redis-server; the test suite's tiny model by default, a couple of
minutes; `--workers-model seinfeld` for the shipped model). It writes workers.md and
workers.json beside the other results.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from contextlib import contextmanager
from pathlib import Path

from sitcom.files import atomic_path, write_atomic

TARGETS = {  # issue #4
    "single_vs_llamacpp": 1.0,
    "single_vs_hf_fp32": 3.0,
    "agg8_vs_single": 3.0,
    "lag_p95_ms": 100.0,
    "first_line_s": 1.0,
    "ready_s": 5.0,
    "agg8_vs_raw8": 0.9,  # issue #9
    "busy_vs_quiet_time": 2.5,
}
SIMD = ("avx", "avx2", "fma", "f16c", "avx_vnni", "amx")


def cpu_info() -> dict:
    """The CPU's model name, cores this process may use and SIMD flags (avx512*, amx*, ...)."""
    name, flags = "unknown CPU", set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
    except OSError:
        pass
    simd = sorted(f for f in flags if f in SIMD or f.startswith(("avx512", "amx_")))
    return dict(name=name, cores=len(os.sched_getaffinity(0)), flags=simd)


@contextmanager
def busy_process():
    """One competing busy process (a Python spin loop) for as long as the block runs."""
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        time.sleep(1.0)
        yield
    finally:
        proc.kill()
        proc.wait()


def run_worker(spec: dict, timeout: float = 300, env: dict | None = None) -> dict:
    env = dict(
        os.environ,
        **(env or {}),
        PYTHONPATH=os.pathsep.join([str(Path.cwd()), os.environ.get("PYTHONPATH", "")]),
    )
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "bench.workers", json.dumps(spec)],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
        )
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout:.0f} s"}
    lines = [x for x in proc.stdout.splitlines() if x.startswith("{")]
    if proc.returncode or not lines:
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        return {"error": tail[:200]}
    return json.loads(lines[-1])


def export_q8(model: str, out: Path) -> Path:
    from training.gguf_export import export_gguf

    return export_gguf(model, out, "q8_0")


def measure_model(label: str, model: str, q4: Path | None, q8: Path, args) -> dict:
    from sitcom.model.catalog import resolve_model

    hf_dir = resolve_model(model)
    n = args.tokens
    single: dict[str, dict] = {}
    plan = [("HF fp32 generate (baseline)", dict(kind="hf_generate", model=hf_dir))]
    if not args.quick:
        plan.append(("engine today: HF scenes", dict(kind="hf_scenes", model=hf_dir)))
    if q4:
        plan.append(("llama.cpp Q4_1 raw", dict(kind="llama_raw", model=hf_dir, gguf=str(q4))))
    plan += [
        ("llama.cpp Q8_0 raw", dict(kind="llama_raw", model=hf_dir, gguf=str(q8))),
        ("llama.cpp Q8_0 scenes", dict(kind="llama_scenes", model=model, gguf=str(q8))),
    ]
    if q4:
        plan.append(("llama.cpp Q4_1 scenes", dict(kind="llama_scenes", model=model, gguf=str(q4))))
    for name, spec in plan:
        print(f"  [{label}] {name} ...", flush=True)
        single[name] = run_worker({**spec, "tokens": n})
    concurrency = {}
    levels = [1, 4, 8]
    engines = [("llama.cpp engine (Q8_0)", dict(backend="llama", gguf=str(q8)))]
    if not args.quick:
        engines.append(("HF engine", dict(backend="hf")))
    for name, spec in engines:
        print(f"  [{label}] {name} at {levels} concurrent ...", flush=True)
        concurrency[name] = run_worker(
            {"kind": "engine", "model": model, "tokens": n, "concurrency": levels, **spec},
            timeout=400,
        )
    print(f"  [{label}] raw llama.cpp at {levels} sequences ...", flush=True)
    concurrency["raw llama.cpp (Q8_0, no guards)"] = run_worker(
        {
            "kind": "llama_multi",
            "model": hf_dir,
            "gguf": str(q8),
            "tokens": n,
            "concurrency": levels,
        },
        timeout=400,
    )
    contention = {}
    cores = str(len(os.sched_getaffinity(0)))
    cases = [
        ("llama.cpp Q8_0 scenes", dict(kind="llama_scenes", model=model, gguf=str(q8))),
        ("transformers scenes", dict(kind="hf_scenes", model=hf_dir)),
    ]
    for name, spec in cases:
        for policy, env in (
            ("auto", {"SITCOM_THREADS": "auto"}),
            (f"fixed {cores}", {"SITCOM_THREADS": cores}),
        ):
            row = {}
            for load in ("quiet", "one busy process"):
                print(f"  [{label}] {name}, threads {policy}, {load} ...", flush=True)
                if load == "quiet":
                    row[load] = run_worker({**spec, "tokens": n}, env=env)
                else:
                    with busy_process():
                        row[load] = run_worker({**spec, "tokens": n}, env=env)
            contention[f"{name}, threads {policy}"] = row
    quality = {}
    if args.val:
        print(f"  [{label}] bits per byte on {args.val} ...", flush=True)
        base = dict(kind="bpb", model=hf_dir, text=args.val, max_tokens=args.val_tokens)
        quality["HF fp32"] = run_worker(base)
        for name, path in (("llama.cpp Q8_0", q8), ("llama.cpp Q4_1", q4)):
            if path:
                quality[name] = run_worker({**base, "gguf": str(path)})
    return {
        "single": single,
        "concurrency": concurrency,
        "contention": contention,
        "quality": quality,
    }


def verdicts(result: dict) -> list[tuple[str, str, bool | None]]:
    s = result["single"]
    tps = {k: v.get("tok_s") for k, v in s.items()}
    ours = tps.get("llama.cpp Q8_0 scenes")
    base = tps.get("HF fp32 generate (baseline)")
    ref = tps.get("llama.cpp Q4_1 raw") or tps.get("llama.cpp Q8_0 raw")
    eng = result["concurrency"].get("llama.cpp engine (Q8_0)", {})
    conc = eng.get("concurrency", {})
    out = []

    def add(name, value, ok):
        out.append((name, value, ok))

    if ours and ref:
        add(
            "single stream vs llama.cpp raw ≥ 1.0×",
            f"{ours / ref:.2f}×",
            ours / ref >= TARGETS["single_vs_llamacpp"],
        )
    if ours and base:
        add(
            "single stream vs HF fp32 ≥ 3×",
            f"{ours / base:.1f}×",
            ours / base >= TARGETS["single_vs_hf_fp32"],
        )
    if "8" in conc and "1" in conc:
        r = conc["8"]["agg_tok_s"] / conc["1"]["agg_tok_s"]
        add("8 concurrent aggregate vs 1 ≥ 3×", f"{r:.2f}×", r >= TARGETS["agg8_vs_single"])
    raw = result["concurrency"].get("raw llama.cpp (Q8_0, no guards)", {}).get("concurrency", {})
    for level in ("1", "8"):
        if level in conc and level in raw:
            r = conc[level]["agg_tok_s"] / raw[level]["agg_tok_s"]
            want = TARGETS["agg8_vs_raw8"] if level == "8" else TARGETS["single_vs_llamacpp"]
            add(f"engine at {level} vs raw llama.cpp at {level} ≥ {want}×", f"{r:.2f}×", r >= want)
    for name, row in result.get("contention", {}).items():
        quiet, busy = (row.get(k, {}).get("tok_s") for k in ("quiet", "one busy process"))
        if quiet and busy and name.endswith("auto"):
            r = quiet / busy
            add(
                f"{name}: scene time with a busy process ≤ 2.5× quiet",
                f"{r:.2f}×",
                r <= TARGETS["busy_vs_quiet_time"],
            )
    if "8" in conc:
        lag = conc["8"]["lag_p95_ms"]
        add("event-loop lag p95 at 8 < 100 ms", f"{lag:.1f} ms", lag < TARGETS["lag_p95_ms"])
    first = s.get("llama.cpp Q8_0 scenes", {}).get("first_line_s")
    if first is not None:
        add("time to first line < 1 s", f"{first:.2f} s", first < TARGETS["first_line_s"])
    q = result.get("quality", {})
    if "bpb" in q.get("HF fp32", {}) and "bpb" in q.get("llama.cpp Q8_0", {}):
        d = q["llama.cpp Q8_0"]["bpb"] / q["HF fp32"]["bpb"] - 1
        add("Q8_0 val BPB within 2 % of fp32", f"{100 * d:+.2f} %", abs(d) <= 0.02)
    if "load_s" in eng:
        add(
            "engine ready < 5 s (cached model)",
            f"{eng['load_s']:.1f} s",
            eng["load_s"] < TARGETS["ready_s"],
        )
    return out


def render(results: dict, meta: dict) -> str:
    cpu = meta.get("cpu", {})
    lines = [
        f"# Benchmark ({meta['date']}, {meta['threads']} threads, {meta['tokens']} tokens)",
        "",
        f"CPU: {cpu.get('name', '?')}, {cpu.get('cores', '?')} cores; "
        f"flags: {' '.join(cpu.get('flags', [])) or 'none found'}",
        "",
    ]
    lines.append("Shared machine: compare ratios within this run only.")
    for label, result in results.items():
        s = result["single"]
        base = s.get("HF fp32 generate (baseline)", {}).get("tok_s")
        lines += [
            "",
            f"## {label}: single stream (greedy)",
            "",
            "| engine | tok/s | × HF fp32 | first line s | ready s | peak RSS MB | tokens |",
            "|---|---:|---:|---:|---:|---:|---:|",
        ]
        for name, r in s.items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | | |")
                continue
            ratio = f"{r['tok_s'] / base:.2f}" if base else "-"
            first = f"{r['first_line_s']:.2f}" if r.get("first_line_s") is not None else "-"
            lines.append(
                f"| {name} | {r['tok_s']:.1f} | {ratio} | {first} | {r['load_s']:.1f} | "
                f"{r['rss_mb']:.0f} | {r['tokens']} |"
            )
        lines += [
            "",
            f"## {label}: concurrent requests through SceneEngine",
            "",
            "| engine | n | p50 s | p95 s | agg tok/s | × n=1 | first line p50 s | "
            "loop lag p95 / max ms | batches |",
            "|---|---:|---:|---:|---:|---:|---:|---:|---|",
        ]
        for name, r in result["concurrency"].items():
            if "error" in r:
                lines.append(f"| {name} | error: {r['error']} | | | | | | | |")
                continue
            one = r["concurrency"].get("1", {}).get("agg_tok_s")
            for n, c in r["concurrency"].items():

                def cell(key: str, fmt: str = ".1f", c=c) -> str:
                    return format(c[key], fmt) if c.get(key) is not None else "-"

                lag = f"{cell('lag_p95_ms')} / {cell('lag_max_ms')}" if "lag_p95_ms" in c else "-"
                lines.append(
                    f"| {name} | {n} | {cell('p50_s')} | {cell('p95_s')} | {cell('agg_tok_s')} | "
                    f"{c['agg_tok_s'] / one:.2f} | {cell('first_line_p50_s', '.2f')} | {lag} | "
                    f"{c.get('batches', '-')} |"
                )
            lines.append(
                f"| {name} ready in {r['load_s']:.1f} s, peak RSS {r['rss_mb']:.0f} MB |" + " |" * 8
            )
        if result.get("contention"):
            lines += [
                "",
                f"## {label}: one scene, quiet vs one busy process",
                "",
                "| backend, thread policy | quiet tok/s | busy tok/s | scene time × quiet |",
                "|---|---:|---:|---:|",
            ]
            for name, row in result["contention"].items():
                quiet, busy = (row.get(k, {}) for k in ("quiet", "one busy process"))
                if "tok_s" not in quiet or "tok_s" not in busy:
                    error = quiet.get("error") or busy.get("error")
                    lines.append(f"| {name} | error: {error} | | |")
                    continue
                lines.append(
                    f"| {name} | {quiet['tok_s']:.1f} | {busy['tok_s']:.1f} | "
                    f"{quiet['tok_s'] / busy['tok_s']:.2f} |"
                )
        if result.get("quality"):
            lines += [
                "",
                f"## {label}: quality (val bits per byte, same tokens)",
                "",
                "| engine | BPB | tokens |",
                "|---|---:|---:|",
            ]
            for name, r in result["quality"].items():
                value = (
                    f"{r['bpb']:.4f} | {r['tokens']}" if "bpb" in r else f"error: {r['error']} |"
                )
                lines.append(f"| {name} | {value} |")
        lines += ["", f"## {label}: targets", "", "| target | measured | met |", "|---|---:|---|"]
        for name, value, ok in verdicts(result):
            lines.append(f"| {name} | {value} | {'yes' if ok else 'NO'} |")
    return "\n".join(lines) + "\n"


def plot(results: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(results), 2, figsize=(12, 4 * len(results)), squeeze=False)
    for row, (label, result) in enumerate(results.items()):
        names = [k for k, v in result["single"].items() if "tok_s" in v]
        axes[row][0].barh(names, [result["single"][k]["tok_s"] for k in names], color="tab:blue")
        axes[row][0].set_xlabel("tokens/s, one scene")
        axes[row][0].set_title(f"{label}: single stream")
        for name, r in result["concurrency"].items():
            if "concurrency" in r:
                ns = [int(n) for n in r["concurrency"]]
                axes[row][1].plot(
                    ns, [r["concurrency"][str(n)]["agg_tok_s"] for n in ns], "o-", label=name
                )
        axes[row][1].set_xlabel("concurrent requests")
        axes[row][1].set_ylabel("aggregate tokens/s")
        axes[row][1].set_title(f"{label}: SceneEngine vs raw llama.cpp")
        axes[row][1].legend()
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=100, format="png")


def measure_workers(args) -> dict:
    """The scale-out row: 1 vs 2 queue workers, one thread each (bench.workers queue_workers)."""
    print(
        f"queue workers on {args.workers_model}: {args.workers_scenes} scenes of "
        f"{args.tokens} tokens with 1, then 2 workers ...",
        flush=True,
    )
    spec = dict(
        kind="queue_workers",
        model=args.workers_model,
        tokens=args.tokens,
        scenes=args.workers_scenes,
        workers=[1, 2],
    )
    return run_worker(spec, timeout=1800)


def key_flags(cpu: dict) -> str:
    """avx2 / avx512f / amx: yes or no, so a missing flag is said too."""
    flags = cpu.get("flags", [])
    return ", ".join(
        f"{name} {'yes' if any(f == name or f.startswith(name + '_') for f in flags) else 'no'}"
        for name in ("avx2", "avx512f", "amx")
    )


def render_workers(result: dict, meta: dict, model: str) -> str:
    cpu = meta.get("cpu", {})
    lines = [
        f"# Queue workers ({meta['date']}, {meta['tokens']} tokens, model {model})",
        "",
        f"CPU: {cpu.get('name', '?')}, {cpu.get('cores', '?')} cores; "
        f"flags: {' '.join(cpu.get('flags', [])) or 'none found'} ({key_flags(cpu)}); load average "
        f"{' → '.join(map(str, meta.get('load', [])))} (1 min, before → after)",
        "",
        "Shared machine: compare ratios within this run only. Each worker: one thread "
        "(SITCOM_THREADS=1), its engine batching up to 8 scenes; Redis queue, SQLite storage. "
        "Cores busy: the workers' CPU time over the wall time (2.0 = two cores to themselves); "
        "scenes per worker include the warm-up.",
        "",
        "| workers | scenes (written) | wall s | scenes/min | tok/s | × 1 worker | "
        "cores busy | scenes per worker |",
        "|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    if "error" in result:
        return "\n".join([*lines, f"| error: {result['error']} | | | | | | | |"]) + "\n"
    rows = result.get("workers", {})
    one = rows.get("1", {}).get("scenes_min")
    for n, r in rows.items():
        if "error" in r:
            lines.append(f"| {n} | error: {r['error']} | | | | | | |")
            continue
        ratio = f"{r['scenes_min'] / one:.2f}" if one else "-"
        lines.append(
            f"| {n} | {r['scenes']} ({r['written']}) | {r['wall_s']:.1f} | "
            f"{r['scenes_min']:.1f} | {r['tok_s']:.1f} | {ratio} | {r['cores']:.2f} | "
            f"{' / '.join(map(str, r['by_worker']))} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a fine-tuned checkpoint directory to measure too")
    parser.add_argument("--tokens", type=int, default=200, help="new tokens per scene (16-400)")
    parser.add_argument("--out", default="bench_results", help="output directory")
    parser.add_argument(
        "--val",
        default="corpus/val.txt" if Path("corpus/val.txt").is_file() else None,
        help="text for the bits-per-byte check (default corpus/val.txt)",
    )
    parser.add_argument("--val-tokens", type=int, default=4096)
    parser.add_argument("--quick", action="store_true", help="skip the slow torch engine runs")
    parser.add_argument(
        "--workers",
        action="store_true",
        help="measure only scenes/minute with 1 vs 2 queue workers (needs redis-server)",
    )
    parser.add_argument(
        "--workers-model",
        default="tiny",
        help="the workers' model: tiny (the test suite's, default), seinfeld (shipped) or a dir",
    )
    parser.add_argument("--workers-scenes", type=int, default=64, help="scenes per worker count")
    args = parser.parse_args(argv)
    if not 16 <= args.tokens <= 400:
        print("error: --tokens must be between 16 and 400", file=sys.stderr)
        return 2
    if not 1 <= args.workers_scenes <= 1000:
        print("error: --workers-scenes must be between 1 and 1000", file=sys.stderr)
        return 2
    if args.checkpoint and not (Path(args.checkpoint) / "config.json").is_file():
        print(
            f"error: {args.checkpoint} is not a checkpoint directory (no config.json)",
            file=sys.stderr,
        )
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.workers:
        return workers_main(args, out)

    from sitcom.model.catalog import ModelLoadError, packaged_gguf

    start = time.time()
    try:
        models = [
            ("SmolLM2-135M (packaged)", "smollm2", packaged_gguf(), out / "smollm2-q8_0.gguf")
        ]
        if args.checkpoint:
            models.append(
                (
                    f"checkpoint {Path(args.checkpoint).name}",
                    args.checkpoint,
                    None,
                    out / f"{Path(args.checkpoint).name}-q8_0.gguf",
                )
            )
        results = {}
        for label, model, q4, q8 in models:
            print(f"{label}: exporting Q8_0 GGUF ...", flush=True)
            export_q8(model, q8)
            results[label] = measure_model(label, model, q4, q8, args)
    except (ModelLoadError, OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    meta = dict(
        cpu=cpu_info(),
        date=time.strftime("%Y-%m-%d %H:%M"),
        threads=len(os.sched_getaffinity(0)),
        tokens=args.tokens,
        seconds=round(time.time() - start),
    )
    report = render(results, meta)
    write_atomic(out / "bench.md", report)
    write_atomic(out / "bench.json", json.dumps({"meta": meta, "results": results}, indent=1))
    plot(results, out / "bench.png")
    print(report)
    print(f"wrote {out / 'bench.md'}, bench.json, bench.png in {meta['seconds']} s")
    return 0


def workers_main(args, out: Path) -> int:
    start = time.time()
    load = os.getloadavg()[0]
    result = measure_workers(args)
    meta = dict(
        cpu=cpu_info(),
        date=time.strftime("%Y-%m-%d %H:%M"),
        threads=len(os.sched_getaffinity(0)),
        tokens=args.tokens,
        seconds=round(time.time() - start),
        load=[round(load, 2), round(os.getloadavg()[0], 2)],
    )
    report = render_workers(result, meta, args.workers_model)
    write_atomic(out / "workers.md", report)
    write_atomic(out / "workers.json", json.dumps({"meta": meta, "result": result}, indent=1))
    print(report)
    errors = [result.get("error")] + [r.get("error") for r in result.get("workers", {}).values()]
    if any(errors):
        print(f"error: {next(e for e in errors if e)}", file=sys.stderr)
        return 1
    print(f"wrote {out / 'workers.md'}, workers.json in {meta['seconds']} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
