"""Workers keep the memory a step frees for the next one (glibc's thresholds, set at start)."""

import platform
import subprocess
import sys

import pytest

# a step's churn (two tensors, made and freed) three times, then the page faults of ten more
# steps, in the main thread or in another one: measured in two forked children, with glibc's
# defaults and then kept, so that torch is imported once (4 s here) and not twice
CHURN = """
import os, resource, sys, threading, torch
from pagoda.engine.worker import keep_freed_memory
where, mib = sys.argv[1], int(sys.argv[2])
n = mib << 18
def step():
    a, b = torch.ones(n), torch.ones(n // 3)
    del a, b
def run(out):
    for _ in range(3):
        step()
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(10):
        step()
    os.write(out, str(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before).encode())
def faults(mode):
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: measure, report, and never return into the parent's code
        code = 1
        try:
            if mode == "keep":
                assert keep_freed_memory(one_arena=where == "thread")
            if where == "thread":
                thread = threading.Thread(target=run, args=(write,))
                thread.start()
                thread.join()
            else:
                run(write)
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read) as pipe:
        count = pipe.read()
    assert os.waitpid(pid, 0)[1] == 0
    return int(count)
print(faults("default"), faults("keep"))
"""


def faults(where: str, mib: int) -> tuple[int, int]:
    """Page faults of the ten steps with glibc's defaults, and kept."""
    out = subprocess.run(
        [sys.executable, "-c", CHURN, where, str(mib)],
        capture_output=True,
        text=True,
        check=True,
    )
    default, kept = map(int, out.stdout.split())
    return default, kept


# The main thread's blocks of 48 MiB; a thread's of 96 MiB, beyond the 64 MiB heaps of the arena
# glibc gives a thread by default (where the thresholds did not hold: the image worker's case).
@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
@pytest.mark.parametrize(("where", "mib"), [("main", 48), ("thread", 96)])
def test_freed_memory_is_reused_instead_of_faulted_in_again(where: str, mib: int):
    default, kept = faults(where, mib)
    # by default every large tensor faults its pages in again; kept, they are reused. A kept
    # run may still fault a block or a few in, when something else took the freed block's
    # place (in a thread, one to five of the default's thirteen blocks, process to process;
    # forked children of one process all fault alike), so the bound is half the default.
    assert default > 10 * (mib << 8) / 2
    assert kept < default / 2


# what a model's load frees (many tensors, freed after the load) stays resident under the kept
# thresholds until release_freed_memory hands it back
RELEASE = """
import torch
from pagoda.engine.worker import keep_freed_memory, release_freed_memory
def rss_mib():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) // 1024
assert keep_freed_memory()
loaded = [torch.ones(1 << 20) for _ in range(100)]  # 100 tensors of 4 MiB
kept = loaded[::10]
del loaded
before = rss_mib()
assert release_freed_memory()
print(before, rss_mib())
"""


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="the C library is not glibc")
def test_release_hands_the_memory_freed_by_a_load_back():
    out = subprocess.run(
        [sys.executable, "-c", RELEASE], capture_output=True, text=True, check=True
    )
    before, after = map(int, out.stdout.split())
    assert before - after > 300  # of the 360 MiB freed


# a heap like a loaded model's (many long-lived objects) and a cycle that loading left behind
FREEZE = """
import gc, weakref
from pagoda.engine.worker import freeze_heap
class Node:
    pass
loaded = [[i] for i in range(200_000)]  # lists are tracked (a dict of ints is not)
left = Node()
left.me = left
gone = weakref.ref(left)
del left
tracked = len(gc.get_objects())
freeze_heap()
print(tracked, len(gc.get_objects()), gc.get_freeze_count(), gone() is None)
"""


def test_freeze_heap_collects_then_hides_what_lives_from_the_collector():
    out = subprocess.run([sys.executable, "-c", FREEZE], capture_output=True, text=True, check=True)
    tracked, after, frozen, collected = out.stdout.split()
    assert collected == "True"  # the cycle was garbage: collected before the freeze
    assert int(tracked) > 200_000 and int(frozen) > 200_000
    assert int(after) < int(tracked) // 100  # a full collection no longer walks them
