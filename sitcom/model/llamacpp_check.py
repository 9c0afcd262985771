"""Is llama.cpp safe on this CPU? AMX settings, and a self-test run once in a child process.

llama-cpp-python is compiled natively at install time, so its kernels follow the build
machine's CPU. On CPUs with AMX, ggml's AMX matmul (an "extra buffer type") has crashed with
a segfault on the first decode of Q4_x / Q8_0 models (llama.cpp issue 20824), so when the
library was built with AMX we turn extra buffer types off for our models (the plain CPU
kernels still run; ~10-25 % slower than a build without AMX, which keeps the repacked
kernels: see README "CPUs").

Defence in depth against crashes we have not seen: the first time a GGUF of a given
quantization is served on a machine, a child process (sitcom.model.llamacpp_probe) loads it with
llama.cpp, decodes a short script and compares the logits with transformers'. A crash
(segfault, abort, hang) or a disagreement makes the caller serve with transformers instead.
The verdict is remembered in the cache dir, keyed by library version, CPU flags,
extra-buffer setting, quantization and the file itself (path, size, mtime), so later starts
pay nothing and a changed file is judged again. llama-cpp-python offers no such check itself.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from sitcom.config import sitcom_config
from sitcom.files import load_json, read_json, write_atomic
from sitcom.model.cache import cache_root
from sitcom.model.errors import ModelLoadError

log = logging.getLogger(__name__)

PROBE_TEXT = (
    "[Scene: Monk's Coffee Shop]\nJERRY: So what happened with the soup?\n"
    "ELAINE: He wouldn't give me any! No soup for me!\nGEORGE:"
)
PROBE_TIMEOUT_S = 180.0
# Thresholds for "agrees with transformers": Q4_1/Q8_0 kernels and llama.cpp's f16 KV cache
# move logits a little; a broken kernel moves them a lot (measured: Q8_0 vs fp32 > 0.999).
MIN_COSINE = 0.98
MIN_TOP1_AGREEMENT = 0.8
_FLAG_PREFIXES = ("avx", "amx", "fma", "f16c", "sse", "ssse", "bmi", "vnni")


def cpu_flags() -> list[str]:
    """The SIMD-related flags of this CPU (x86 /proc/cpuinfo), sorted; [] elsewhere."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        if line.startswith("flags"):
            flags = line.split(":", 1)[1].split()
            return sorted({f for f in flags if f.startswith(_FLAG_PREFIXES)})
    return []


def library_has_amx() -> bool:
    import llama_cpp

    info = llama_cpp.llama_print_system_info().decode(errors="replace")
    return "AMX_INT8 = 1" in info or "AMX = 1" in info


def use_extra_bufts() -> bool:
    """Whether llama.cpp may use extra buffer types (repacked / AMX kernels) here."""
    return extra_bufts_allowed(sitcom_config().llama_extra_bufts, cpu_flags(), library_has_amx)


def extra_bufts_allowed(setting: str, flags: list[str], lib_amx: Callable[[], bool]) -> bool:
    """SITCOM_LLAMA_EXTRA_BUFTS=on|off overrides; auto turns them off only for a build with
    AMX kernels on a CPU with AMX, the combination that crashes."""
    choice = setting.strip().lower()
    if choice in ("on", "1", "true", "yes"):
        return True
    if choice in ("off", "0", "false", "no"):
        return False
    if choice != "auto":
        raise ModelLoadError(f"SITCOM_LLAMA_EXTRA_BUFTS must be auto, on or off (got {setting!r})")
    return not ("amx_int8" in flags and lib_amx())


@dataclass(frozen=True)
class Verdict:
    ok: bool
    reason: str
    cached: bool = False
    retry: bool = False  # not remembered


def gguf_file_type(path: Path) -> str:
    """The GGUF's general.file_type (e.g. 'MOSTLY_Q8_0'), or 'unknown'.

    Read by hand from the key/value header, stopping at that key: gguf.GGUFReader parses
    every field first, the 49k-entry vocabulary included, which took 2-4 s of every start.
    """
    try:
        import gguf

        with open(path, "rb") as f:
            value = _find_gguf_u32(f, "general.file_type")
        if value is not None:
            return gguf.LlamaFileType(value).name
    except Exception:  # a file we cannot read is judged by the probe itself
        pass
    return "unknown"


# GGUF value types: sizes of the fixed-width ones; 8 = string, 9 = array.
_GGUF_SIZES = {0: 1, 1: 1, 2: 2, 3: 2, 4: 4, 5: 4, 6: 4, 7: 1, 10: 8, 11: 8, 12: 8}


def _find_gguf_u32(f, wanted: str) -> int | None:
    def read(fmt: str):
        return struct.unpack("<" + fmt, f.read(struct.calcsize(fmt)))[0]

    def skip(vtype: int) -> None:
        if vtype == 8:
            f.seek(read("Q"), 1)
        elif vtype == 9:
            etype, count = read("I"), read("Q")
            if etype in _GGUF_SIZES:
                f.seek(_GGUF_SIZES[etype] * count, 1)
            else:
                for _ in range(count):
                    skip(etype)
        else:
            f.seek(_GGUF_SIZES[vtype], 1)

    if f.read(4) != b"GGUF":
        return None
    read("I")  # version
    read("Q")  # tensor count
    for _ in range(read("Q")):
        key = f.read(read("Q")).decode("utf-8", "replace")
        vtype = read("I")
        if key == wanted and vtype in (4, 5):
            return read("I")
        skip(vtype)
    return None


def probe_key(gguf_path: Path) -> str:
    """The verdict's key: this machine and library, and the file itself (its path, size and
    mtime), so a verdict never outlives the file it judged (a repaired or damaged copy is
    judged again)."""
    import llama_cpp

    try:
        st = gguf_path.stat()
        identity = f"{gguf_path.resolve()} {st.st_size} {st.st_mtime_ns}"
    except OSError:
        identity = f"{gguf_path} missing"
    parts = [
        "probe 2",  # the probe's own version: a changed probe judges every file again
        f"llama-cpp-python {getattr(llama_cpp, '__version__', '?')}",
        " ".join(cpu_flags()),
        f"extra_bufts={use_extra_bufts()}",
        gguf_file_type(gguf_path),
        identity,
    ]
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()[:16]


def parse_verdict(data: object) -> tuple[bool, str] | None:
    """(ok, reason) from a verdict's JSON: ok must be true or false and reason a string,
    strictly ({"ok": "false"} is no verdict); None for anything else."""
    if not isinstance(data, dict):
        return None
    ok, reason = data.get("ok"), data.get("reason", "")
    if not isinstance(ok, bool) or not isinstance(reason, str):
        return None
    return ok, reason[:300]


def probe_command(gguf_path: Path, hf_source: str) -> list[str]:
    return [sys.executable, "-m", "sitcom.model.llamacpp_probe", str(gguf_path), hf_source]


def check_llamacpp(
    gguf_path: str | os.PathLike,
    hf_source: str,
    *,
    command: list[str] | None = None,
    timeout_s: float = PROBE_TIMEOUT_S,
) -> Verdict:
    """The remembered verdict for this machine and kind of GGUF, probing once if needed.

    `command` replaces the child's command line (tests use it to simulate a crash).
    """
    gguf_path = Path(gguf_path)
    record = cache_root() / "llamacpp-probe" / f"{probe_key(gguf_path)}.json"
    try:
        saved = parse_verdict(read_json(record))
    except (OSError, ValueError, UnicodeDecodeError):
        saved = None  # none yet, or unreadable: judge again
    if saved is not None:
        return Verdict(*saved, cached=True)
    _remove_stale_tmp(record.parent)
    verdict = _run_probe(command or probe_command(gguf_path, hf_source), timeout_s)
    if verdict.retry:
        return verdict  # a hang may be a busy machine: judge again at the next start
    try:  # best effort: an unwritable cache only means probing again next time
        record.parent.mkdir(parents=True, exist_ok=True)
        saved = {"ok": verdict.ok, "reason": verdict.reason, "cpu_flags": cpu_flags()}
        write_atomic(record, json.dumps(saved) + "\n")
    except OSError:
        pass
    return verdict


def _run_probe(command: list[str], timeout_s: float) -> Verdict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
    try:
        proc = subprocess.run(
            command,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            env=env,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired:
        return Verdict(False, f"the llama.cpp self-test hung for {timeout_s:.0f} s", retry=True)
    if proc.returncode < 0:
        return Verdict(False, f"the llama.cpp self-test crashed (signal {-proc.returncode})")
    lines = proc.stdout.strip().splitlines()
    try:
        result = parse_verdict(load_json(lines[-1]))
    except (IndexError, ValueError):
        result = None
    if result is None:
        tail = (proc.stderr.strip().splitlines() or ["no verdict"])[-1][:200]
        return Verdict(False, f"the llama.cpp self-test failed (exit {proc.returncode}: {tail})")
    if proc.returncode != 0:
        return Verdict(False, f"the llama.cpp self-test failed (exit {proc.returncode})")
    return Verdict(*result)


def _remove_stale_tmp(directory: Path, max_age_s: float = 3600.0) -> None:
    """Delete verdict temp files (mkstemp's tmpXXXX.tmp) a killed start left behind."""
    try:
        now = time.time()
        for path in directory.glob("tmp*.tmp"):
            if path.is_file() and now - path.stat().st_mtime > max_age_s:
                path.unlink()
    except OSError:
        pass


def compare_logits(hf, ll) -> tuple[bool, str]:
    """Per-position cosine similarity and top-1 agreement of two [positions, vocab] arrays."""
    import numpy as np

    hf, ll = np.asarray(hf, dtype=np.float64), np.asarray(ll, dtype=np.float64)
    if not np.all(np.isfinite(ll)):
        return False, "llama.cpp returned non-finite logits"
    hf_c = hf - hf.mean(axis=1, keepdims=True)
    ll_c = ll - ll.mean(axis=1, keepdims=True)
    hf_n, ll_n = np.linalg.norm(hf_c, axis=1), np.linalg.norm(ll_c, axis=1)
    flat = (hf_n < 1e-3) & (ll_n < 1e-3)  # both flat: nothing to disagree about
    cosines = np.where(flat, 1.0, (hf_c * ll_c).sum(axis=1) / np.maximum(hf_n * ll_n, 1e-12))
    cosine = float(cosines.min())
    top1 = float(np.mean(flat | (hf.argmax(axis=1) == ll.argmax(axis=1))))
    ok = cosine >= MIN_COSINE and top1 >= MIN_TOP1_AGREEMENT
    verdict = "agrees with" if ok else "disagrees with"
    return ok, f"llama.cpp {verdict} transformers (min cosine {cosine:.4f}, top-1 {top1:.0%})"
