"""sitcom.decoding.threads: the thread count follows the CPU time other processes use."""

from __future__ import annotations

import pytest

from sitcom.decoding import threads
from sitcom.decoding.threads import ThreadPolicy


class FakeClock:
    """Stands in for /proc/stat, time.monotonic and time.process_time."""

    def __init__(self, monkeypatch):
        self.now = self.busy = self.own = 0.0
        monkeypatch.setattr(threads, "_busy_seconds", lambda cpus: self.busy)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads.time, "process_time", lambda: self.own)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1})

    def advance(self, seconds: float, others: float, own: float) -> None:
        """`seconds` pass; other processes use `others` cores, this one `own` cores."""
        self.now += seconds
        self.busy += (others + own) * seconds
        self.own += own * seconds


def test_auto_uses_the_cores_others_leave_idle(monkeypatch):
    clock = FakeClock(monkeypatch)
    policy = ThreadPolicy("auto", interval_s=1.0)
    assert policy.threads() == 2  # nothing measured yet: every core
    clock.advance(1.0, others=1.0, own=1.0)  # a busy process took a core from us
    assert policy.threads() == 1
    clock.advance(0.5, others=0.0, own=1.0)
    assert policy.threads() == 1  # not re-measured within the interval
    clock.advance(1.0, others=0.1, own=1.0)  # it has gone
    assert policy.threads() == 2
    clock.advance(1.0, others=2.0, own=0.0)  # never below one
    assert policy.threads() == 1


def test_fixed_count_and_bad_setting(monkeypatch):
    FakeClock(monkeypatch)
    assert ThreadPolicy("2").threads() == 2
    monkeypatch.setenv("SITCOM_THREADS", "1")
    assert ThreadPolicy().threads() == 1
    with pytest.raises(ValueError, match="SITCOM_THREADS must be auto or a whole number"):
        ThreadPolicy("lots")


# Issue 20 #10: more threads than cores segfaulted (100000) or crawled (512); -3 became 1.
@pytest.mark.parametrize(
    "value", ["3", "512", "100000", "0", "-3", "+1", "1.5", "²", "２", "99999999999999999999"]
)
def test_thread_count_beyond_the_cores_is_refused_in_one_line(monkeypatch, value):
    FakeClock(monkeypatch)  # two cores
    with pytest.raises(ValueError) as err:
        ThreadPolicy(value)
    message = str(err.value)
    assert "from 1 to 2" in message and "\n" not in message, message


def test_real_proc_stat_reading():
    policy = ThreadPolicy("auto", interval_s=0.0)
    for _ in range(3):
        assert 1 <= policy.threads() <= policy.cores
