"""Logs each Triton kernel compilation with its time, through Triton's JIT hooks (called only on
a miss of Triton's in-process cache; a miss that Triton's on-disk cache serves is quick)."""

from __future__ import annotations

import logging
import time

logger = logging.getLogger(__name__)
_started: dict[tuple[str, str], float] = {}


def log_compilations() -> None:
    """Install the hooks, unless someone else's are installed already."""
    from triton import knobs

    runtime = knobs.runtime
    if runtime.jit_cache_hook is None and runtime.jit_post_compile_hook is None:
        runtime.jit_cache_hook = _before_compile
        runtime.jit_post_compile_hook = _after_compile


def _before_compile(*, key, fn, **_) -> None:  # a true result would skip the compilation
    _started[(fn.name, str(key))] = time.monotonic()


def _after_compile(*, key, fn, **_) -> None:
    start = _started.pop((fn.name, str(key)), None)
    if start is not None:
        logger.info("Triton kernel %s: compiled in %.2f s", fn.name, time.monotonic() - start)
