"""Builds and loads the CPU kernels in `kernels/csrc/` (plain C++ with OpenMP).

Each source is compiled on first use with the system's C++ compiler (about a second) into the
user's cache folder, named by a hash of source and flags, and loaded with ctypes, for the
CPU's vector extension: AVX-512, or AVX2 for the sources written on `csrc/simd.h` (PORTABLE).
Where the CPU has neither, or no compiler is installed, `load` returns None and says why once;
the callers keep torch's ops then.

The kernels' Python wrappers call them through `call` and take their outputs from `empty`, so
that a `Recorder` (`engine/cpu_graphs.py`) can capture a whole forward pass as its list of
kernel calls and replay it without the wrappers.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import logging
import mmap
import os
import shutil
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Protocol

import torch

from pagoda.cache import cache_dir

logger = logging.getLogger(__name__)

SOURCES = Path(__file__).with_name("csrc")
FLAGS = {  # by vector extension; AVX2 servers all have FMA and F16C (Haswell, Zen 1 on)
    "AVX512": ("-O3", "-std=c++17", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC"),
    "AVX2": ("-O3", "-std=c++17", "-mavx2", "-mfma", "-mf16c", "-fopenmp", "-shared", "-fPIC"),
}
# the sources that build for AVX2 as well (written on simd.h, or with no vector code); the
# others need AVX-512
PORTABLE = frozenset({"linear_cpu", "attention_cpu", "elementwise_cpu", "replay"})

# ctypes types for the kernels' C signatures: {function: (result, [arguments])}
I32, I64, F32, PTR = ctypes.c_int, ctypes.c_int64, ctypes.c_float, ctypes.c_void_p
Signatures = dict[str, tuple[type | None, list[type]]]

_loaded: dict[str, ctypes.CDLL | str] = {}  # name -> library, or why it cannot be had
_declared: set[str] = set()  # libraries whose signatures are set


class Recorder(Protocol):
    def record(self, function: ctypes._CFuncPtr, args: tuple) -> None: ...

    def empty(self, shape: tuple[int, ...]) -> torch.Tensor: ...


_recorder: Recorder | None = None


@contextlib.contextmanager
def recording(recorder: Recorder) -> Iterator[None]:
    """Hand every kernel call and output allocation to `recorder` while it lasts (the engine
    runs one forward pass at a time, on one thread)."""
    global _recorder
    _recorder = recorder
    try:
        yield
    finally:
        _recorder = None


def call(function: ctypes._CFuncPtr, *args) -> None:
    """Run a kernel (arguments: ints, floats and data pointers), or, while recording, hand it
    to the recorder instead, which runs it later."""
    if _recorder is None:
        function(*args)
    else:
        _recorder.record(function, args)


def empty(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """An fp32 (or bf16, last dimension even) output buffer: the recorder's while recording,
    else a new one."""
    if dtype == torch.bfloat16:
        assert shape[-1] % 2 == 0
        return empty(*shape[:-1], shape[-1] // 2).view(torch.bfloat16)
    assert dtype == torch.float32
    return torch.empty(shape) if _recorder is None else _recorder.empty(shape)


def huge_pages(nbytes: int) -> torch.Tensor:
    """`nbytes` bytes (uint8, uninitialised) on 2 MiB pages where Linux gives them (transparent
    huge pages, `enabled` set to always or madvise), else on the usual 4 KiB pages.

    For what a step streams through: the bf16 weights and the KV cache. Read in 4 KiB pages, a
    stream misses the TLB every 64 lines and the hardware prefetcher stops at every page's end.
    With both on 2 MiB pages, a SmolLM2-135M decode step at batch 1 took 7-12% less time and
    32 concurrent requests got about 4% more tokens/s (2-core AMX machine, alternated runs).
    The block is an anonymous mapping of its own: torch's allocator would not align it, and
    freed, glibc would keep it in the heap (engine/worker.py: keep_freed_memory)."""
    huge = 2 << 20
    if not hasattr(mmap, "MADV_HUGEPAGE"):  # not Linux
        return torch.empty(nbytes, dtype=torch.uint8)
    block = mmap.mmap(-1, nbytes + huge, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    with contextlib.suppress(OSError):  # a kernel built without transparent huge pages
        block.madvise(mmap.MADV_HUGEPAGE)  # before any page is touched
    whole = torch.frombuffer(block, dtype=torch.uint8)  # keeps `block` mapped while it lives
    start = -whole.data_ptr() % huge
    return whole[start : start + nbytes]


class Arena:
    """Tensors of one dtype side by side in one block on 2 MiB pages (`huge_pages`), each
    64-byte aligned, handed out in turn: a model's packed weights, which every step streams."""

    def __init__(self, sizes: list[int], dtype: torch.dtype) -> None:
        self.dtype = dtype
        self.block = huge_pages(sum(self._aligned(size) for size in sizes))
        self.offset = 0  # bytes

    def _aligned(self, size: int) -> int:
        return -(-size * self.dtype.itemsize // 64) * 64

    def take(self, size: int) -> torch.Tensor:
        """The next `size` values."""
        start, self.offset = self.offset, self.offset + self._aligned(size)
        if self.offset > self.block.numel():
            raise RuntimeError("more weights packed than the arena was sized for")
        return self.block[start : start + size * self.dtype.itemsize].view(self.dtype)


def huge_pages_enabled() -> bool:
    """Whether Linux hands out transparent huge pages to a mapping that asks (`huge_pages`)."""
    try:
        setting = Path("/sys/kernel/mm/transparent_hugepage/enabled").read_text()
    except OSError:
        return False
    return "[always]" in setting or "[madvise]" in setting


def compiler() -> str | None:
    """The C++ compiler the kernels are built with: $CXX, else c++ or g++ on the PATH."""
    return os.environ.get("CXX") or shutil.which("c++") or shutil.which("g++")


def compile_source(compiler: str, source: Path, flags: tuple[str, ...]) -> Path:
    """The shared library built from `source` with `flags`, cached by its text, the kernels'
    headers and the flags. Concurrent builders (one engine process per model) each write a
    temporary file and rename it into place."""
    headers = b"".join(h.read_bytes() for h in sorted(SOURCES.glob("*.h")))
    digest = hashlib.sha256(source.read_bytes() + headers + " ".join(flags).encode())
    digest = digest.hexdigest()[:16]
    target = cache_dir() / f"{source.stem}-{digest}.so"
    if target.exists():
        logger.info("CPU kernel %s: loaded cached %s", source.stem, target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    start = time.monotonic()
    try:
        subprocess.run(
            [compiler, *flags, str(source), "-o", tmp], check=True, capture_output=True, text=True
        )
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    logger.info("CPU kernel %s: built %s in %.1f s", source.stem, target, time.monotonic() - start)
    return target


def vector_extension(name: str) -> str | None:
    """The FLAGS key `csrc/<name>.cpp` builds for on this CPU, or None."""
    capability = torch.backends.cpu.get_cpu_capability()
    if capability in ("AVX512", "AMX"):
        return "AVX512"
    if capability == "AVX2" and name in PORTABLE:
        return "AVX2"
    return None


def _build(name: str) -> ctypes.CDLL | str:
    isa = vector_extension(name)
    if isa is None:
        capability = torch.backends.cpu.get_cpu_capability()
        return f"the CPU has no AVX-512 (torch reports {capability})"
    cxx = compiler()
    if cxx is None:
        return "no C++ compiler (c++, g++ or $CXX) to build it"
    try:
        # torch's libgomp is loaded already, so the kernels' OpenMP shares its thread pool
        return ctypes.CDLL(str(compile_source(cxx, SOURCES / f"{name}.cpp", FLAGS[isa])))
    except subprocess.CalledProcessError as e:
        return f"building {name}.cpp failed: {e.stderr.strip()[:500]}"
    except OSError as e:
        return f"loading {name}.cpp failed: {e}"


def load(name: str, signatures: Signatures | None = None) -> ctypes.CDLL | None:
    """The library built from `csrc/<name>.cpp` with its functions' `signatures` declared, or
    None (logged once) where it cannot run."""
    if name not in _loaded:
        _loaded[name] = _build(name)
        if isinstance(_loaded[name], str):
            logger.warning("CPU kernel %s unavailable, using torch: %s", name, _loaded[name])
    library = _loaded[name]
    if not isinstance(library, ctypes.CDLL):
        return None
    if signatures and name not in _declared:
        # a library first loaded without them (unavailable_reason) gets them on the first call
        # that has them; until then ctypes would pass pointers as 32-bit ints
        for function, (result, arguments) in signatures.items():
            getattr(library, function).restype = result
            getattr(library, function).argtypes = arguments
        _declared.add(name)
    return library


def unavailable_reason(name: str) -> str | None:
    """Why `load(name)` gives None, or None when it gives the library."""
    load(name)
    library = _loaded[name]
    return library if isinstance(library, str) else None
