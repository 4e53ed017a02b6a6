"""The engine's CPU thread governor: gives cores back while other processes keep them busy."""

from __future__ import annotations

import subprocess
import sys
import time

import psutil
import pytest

from pagoda.engine.config import EngineConfig
from pagoda.engine.cpu_threads import Sample, ThreadGovernor, take_sample, threads_for


@pytest.mark.parametrize(
    ("max_threads", "num_cpus", "others", "expected"),
    [
        (2, 2, 0.0, 2),
        (2, 2, 0.3, 2),  # an HTTP frontend and a client: no core taken
        (2, 2, 0.74, 2),
        (2, 2, 0.75, 1),
        (2, 2, 1.0, 1),
        (2, 2, 2.0, 1),  # never below one thread
        (8, 8, 2.9, 5),
        (4, 8, 2.0, 4),  # OMP_NUM_THREADS below the core count caps it
        (1, 2, 0.0, 1),
    ],
)
def test_threads_for(max_threads, num_cpus, others, expected):
    assert threads_for(max_threads, num_cpus, others) == expected


class Machine:
    """Samples of a machine on which others use `others` cores while we use `own`."""

    def __init__(self) -> None:
        self.now = Sample(wall=0.0, busy=0.0, own=0.0)
        self.others = 0.0
        self.own = 2.0

    def advance(self) -> Sample:
        self.now = Sample(
            self.now.wall + 1.0,
            self.now.busy + self.others + self.own,
            self.now.own + self.own,
        )
        return self.now


def test_governor_waits_for_three_windows_then_follows_the_load():
    machine, calls = Machine(), []
    governor = ThreadGovernor(
        2, num_cpus=2, interval_s=0.0, sample=machine.advance, set_threads=calls.append
    )
    governor.tick()  # first sample: nothing to compare with
    machine.others, machine.own = 1.0, 1.0  # two busy loops beside the engine
    governor.tick()
    governor.tick()
    assert (governor.threads, calls) == (2, [])  # two windows are not enough
    governor.tick()
    assert (governor.threads, calls) == (1, [1])
    governor.tick()
    assert calls == [1]  # no repeated calls while the load stays
    machine.others, machine.own = 0.1, 1.0  # the load is gone
    for _ in range(3):
        governor.tick()
    assert (governor.threads, calls) == (2, [1, 2])


def test_a_blip_of_load_changes_nothing():
    machine, calls = Machine(), []
    governor = ThreadGovernor(
        2, num_cpus=2, interval_s=0.0, sample=machine.advance, set_threads=calls.append
    )
    for others in (0.0, 0.1, 1.5, 1.5, 0.1, 1.5, 0.2):  # a client starting up, twice
        machine.others = others
        governor.tick()
    assert (governor.threads, calls) == (2, [])


def test_an_idle_engine_keeps_its_threads_and_a_busy_one_gives_them():
    """Others' load while the engine waits for requests (a client starting up beside an idle
    server) takes no thread; once the engine works beside it, three windows do. Threads come
    back whether the engine is busy or idle."""
    machine, calls = Machine(), []
    governor = ThreadGovernor(
        2, num_cpus=2, interval_s=0.0, sample=machine.advance, set_threads=calls.append
    )
    machine.others, machine.own = 1.0, 0.02  # the engine's idle loop
    for _ in range(6):
        governor.tick()
    assert (governor.threads, calls) == (2, [])
    machine.own = 1.0  # requests came, and the load stayed
    for _ in range(3):
        governor.tick()
    assert (governor.threads, calls) == (1, [1])
    machine.others, machine.own = 0.0, 0.02  # both gone
    for _ in range(3):
        governor.tick()
    assert (governor.threads, calls) == (2, [1, 2])


def _spin(seconds: float) -> None:
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


def test_real_busy_processes_take_cores_away():
    """Measured, not simulated: two busy loops in other processes, beside this one's own (a
    busy engine's)."""
    num_cpus = psutil.cpu_count()
    calls: list[int] = []
    governor = ThreadGovernor(num_cpus, interval_s=0.0, set_threads=calls.append)
    loops = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(2)]
    try:
        time.sleep(0.5)
        for _ in range(4):
            governor.tick()
            _spin(0.6)
    finally:
        for loop in loops:
            loop.kill()
            loop.wait()
    assert calls and governor.threads <= num_cpus - 1


def test_sample_reads_the_machine():
    first = take_sample()
    sum(i * i for i in range(300_000))  # some CPU time of our own
    second = take_sample()
    assert second.wall > first.wall and second.own > first.own
    assert second.busy >= first.busy


def test_cpu_threads_must_be_positive():
    with pytest.raises(ValueError, match="cpu_threads"):
        EngineConfig(model="unused", cpu_threads=0)
