"""Soak a real `pagoda serve` (benchmarks/soak.py): 100 requests here, PAGODA_SOAK_REQUESTS
for more (1,000 and up); the checks are the script's."""

from __future__ import annotations

import os

import pytest

from benchmarks.soak import soak
from tests.serving import Server


@pytest.mark.soak
def test_soak_leaves_no_sequence_block_fd_thread_or_task_behind(tiny_models):
    model = str(tiny_models["llama"])
    server = Server(["--model", model, "--dtype", "float32"]).wait_ready()
    try:
        requests = int(os.environ.get("PAGODA_SOAK_REQUESTS", "100"))
        report = soak(server.url, model, requests, concurrency=16)
    finally:
        assert server.stop() == 0
    assert report.kinds["dropped"] > 0 and report.kinds["logprobs"] > 0
    assert report.failures() == [], report
    assert report.engine["prefix_cache_blocks"] > 0  # the prompts' blocks stay cached
