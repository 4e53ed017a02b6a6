"""Tokenizing off the event loop, one call at a time per tokenizer.

A long prompt took the frontend's one thread for seconds (1.9 MB: 2.7 s), stalling every stream
meanwhile. Yet a fast tokenizer's truncation and padding are settings of the tokenizer itself,
set by each call: two threads that call it with different ones get each other's (alternating
truncated and whole calls on 8 threads: 129 of 400 came back wrong). So each tokenizer gets a
thread of its own, which takes its calls in turn.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

T = TypeVar("T")


class TokenizerThread:
    def __init__(self) -> None:
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagoda-tokenizer")

    async def run(self, call: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(call, *args, **kwargs))
