"""How many threads the forward pass uses, re-checked while it runs.

Bots live on small shared hosts. On 2 cores with another busy process, llama.cpp at 2
threads fell from ~90 to 7-33 tok/s: its OpenMP workers spin at every barrier, and one of
them is always waiting for a core the other process holds. Measured on the 2-core machine
while a training run kept ~1.4 cores busy (packaged SmolLM2, one sequence, best of 3):
2 threads 33 tok/s, 2 threads with OMP_WAIT_POLICY=passive 67, 1 thread 84-89. So the
policy is to use the cores the other processes leave idle: all of them on a quiet machine
(today's speed, spinning and all), fewer when others are busy, never below one.

SITCOM_THREADS=auto (default) measures that from /proc/stat: the CPU time the cores this
process may run on spent busy, minus this process's own CPU time, over the last
`interval_s`; SITCOM_THREADS=N fixes the count. Hand-written because neither llama.cpp nor
torch adapts its thread count to load; both can change it between steps cheaply
(llama_set_n_threads, torch.set_num_threads).
"""

from __future__ import annotations

import os
import time

from sitcom.config import sitcom_config

INTERVAL_S = 1.0


def _setting() -> str:
    return sitcom_config().threads


def available_cores() -> int:
    """The cores this process may run on (its CPU affinity), at least 1."""
    return max(1, len(os.sched_getaffinity(0)))


def parse_setting(raw: str | None) -> int | None:
    """SITCOM_THREADS as a fixed count, None for auto; ValueError (one line naming the
    variable) for anything else. A count must be ASCII digits from 1 to the cores this
    process may use: more threads than cores only wait for each other (512 on 2 cores made
    a 16-token scene take 22 s; 100000 crashed llama.cpp), and 0 or -3 are mistakes, not 1."""
    choice = (raw if raw is not None else "auto").strip().lower() or "auto"
    if choice == "auto":
        return None
    cores = available_cores()
    if not (
        choice.isascii() and choice.isdigit() and len(choice) <= 6 and 1 <= int(choice) <= cores
    ):
        raise ValueError(
            f"SITCOM_THREADS must be auto or a whole number from 1 to {cores} (the cores "
            f"this process may use), got {choice[:20]!r}"
        )
    return int(choice)


def _busy_seconds(cpus: set[int]) -> float | None:
    """Busy CPU seconds since boot summed over `cpus` (None where /proc/stat is missing)."""
    try:
        with open("/proc/stat") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    hz = os.sysconf("SC_CLK_TCK")
    busy = 0
    for line in lines:
        name, *fields = line.split()
        if not name.startswith("cpu") or name == "cpu" or int(name[3:]) not in cpus:
            continue
        # user nice system idle iowait irq softirq steal ...: all but idle and iowait
        values = [int(x) for x in fields[:8]]
        busy += sum(values) - values[3] - values[4]
    return busy / hz


class ThreadPolicy:
    """`threads()` says how many threads to use now; call it as often as you like (it
    re-measures at most every `interval_s`)."""

    def __init__(
        self,
        setting: str | None = None,
        *,
        limit: int | None = None,
        interval_s: float = INTERVAL_S,
    ):
        self.cpus = set(os.sched_getaffinity(0))
        self.cores = min(len(self.cpus), limit or len(self.cpus))
        self.fixed = parse_setting(setting or _setting())
        self.interval_s = interval_s
        self._threads = self.fixed or self.cores
        self._last: tuple[float, float, float] | None = None

    def threads(self) -> int:
        if self.fixed is not None:
            return self.fixed
        now = time.monotonic()
        if self._last is not None and now - self._last[0] < self.interval_s:
            return self._threads
        busy, own = _busy_seconds(self.cpus), time.process_time()
        if busy is None:
            return self._threads
        if self._last is not None:
            then, busy_then, own_then = self._last
            others = max(0.0, (busy - busy_then) - (own - own_then)) / (now - then)
            self._threads = max(1, min(self.cores, int(self.cores - others + 0.5)))
        self._last = (now, busy, own)
        return self._threads


_TORCH_POLICY: ThreadPolicy | None = None


def use_torch_threads() -> int:
    """Set torch's intra-op threads for the next batch by the policy; returns the count.
    On auto the ceiling is OMP_NUM_THREADS when set (tests set 1), else every core."""
    global _TORCH_POLICY
    import torch

    if _TORCH_POLICY is None:
        limit = os.environ.get("OMP_NUM_THREADS", "")
        ok = limit.isascii() and limit.isdigit() and 0 < len(limit) <= 6
        _TORCH_POLICY = ThreadPolicy(limit=int(limit) if ok else None)
    n = _TORCH_POLICY.threads()
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)
    return n
