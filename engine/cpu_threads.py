"""Engine threads on a shared CPU: leave cores to other processes while they keep them busy.

The engine's ops run on every core torch was given (OpenMP). When other processes keep some of
those cores busy, one of the engine's threads is often descheduled and the others wait for it
at the end of every op: on 2 cores beside two busy loops, serving fell to 18-27 output tok/s
with 2 threads against 85 with 1 (150+ on a quiet machine). So the engine core counts, every
few seconds, the cores that the rest of the machine used and runs on those left.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

logger = logging.getLogger(__name__)

# A core counts as taken when others used at least this much of one over a window: a server's
# own HTTP process and a benchmark client use well under it.
TAKEN_CORE = 0.75
# An engine that used less than this over a window was waiting for requests: its threads took
# nothing from anyone, so the window gives no cores away. A client starting up beside an idle
# server (seconds of imports and tokenizing) used to cost the engine a thread for the first
# seconds of the run it started, until three windows of that run gave it back.
IDLE_CORES = 0.25


def threads_for(max_threads: int, num_cpus: int, other_cores: float) -> int:
    """How many threads to run when other processes used `other_cores` of `num_cpus`."""
    taken = math.floor(other_cores + 1 - TAKEN_CORE)
    return max(1, min(max_threads, num_cpus - taken))


@dataclass(slots=True)
class Sample:
    wall: float  # seconds, monotonic
    busy: float  # CPU-seconds the whole machine was busy, all cores summed
    own: float  # CPU-seconds this process used


def take_sample() -> Sample:
    t = psutil.cpu_times()
    idle = t.idle + getattr(t, "iowait", 0.0)
    # guest time is already inside user time on Linux, so it is not added again
    total = sum(getattr(t, f) for f in t._fields if f not in ("guest", "guest_nice"))
    return Sample(time.monotonic(), total - idle, time.process_time())


@dataclass(slots=True)
class ThreadGovernor:
    """Call `tick` from the engine loop, busy or idle; every `interval_s` it looks at the
    machine, and it changes the thread count when `windows` windows in a row agree, so that a
    burst of a few seconds changes nothing. Windows in which the engine was idle only give
    threads back, never take them."""

    max_threads: int
    num_cpus: int = field(default_factory=lambda: psutil.cpu_count() or 1)
    interval_s: float = 2.0
    windows: int = 3
    sample: Callable[[], Sample] = take_sample
    set_threads: Callable[[int], None] = torch.set_num_threads
    threads: int = field(init=False)
    _last: Sample | None = field(default=None, init=False)
    _verdict: int = field(default=0, init=False)  # the latest window's thread count
    _streak: int = field(default=0, init=False)  # windows in a row that gave it

    def __post_init__(self) -> None:
        self.threads = self.max_threads

    def tick(self) -> None:
        if self._last is not None and time.monotonic() - self._last.wall < self.interval_s:
            return
        now = self.sample()
        last, self._last = self._last, now
        if last is None or now.wall <= last.wall:
            return
        seconds = now.wall - last.wall
        own = (now.own - last.own) / seconds
        others = (now.busy - last.busy) / seconds - own
        wanted = threads_for(self.max_threads, self.num_cpus, others)
        if wanted < self.threads and own < IDLE_CORES:
            wanted = self.threads
        self._streak = self._streak + 1 if wanted == self._verdict else 1
        self._verdict = wanted
        if wanted != self.threads and self._streak >= self.windows:
            logger.info(
                "other processes used %.1f of %d cores: engine threads %d -> %d",
                others,
                self.num_cpus,
                self.threads,
                wanted,
            )
            self.threads = wanted
            self.set_threads(wanted)


def governor_for(device: torch.device, fixed_threads: int | None) -> ThreadGovernor | None:
    """A governor for a worker on `device`, unless it runs on a GPU, was given a fixed thread
    count, or has one thread anyway."""
    threads = torch.get_num_threads()
    if device.type != "cpu" or fixed_threads is not None or threads <= 1:
        return None
    return ThreadGovernor(threads)
