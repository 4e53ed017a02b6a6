"""`pagoda serve --tensor-parallel-size 2` on the CPU: the tokens of one rank, and a rank that
dies mid-request makes the server report the engine dead (503s, nothing hangs)."""

from __future__ import annotations

import os
import signal
import subprocess
import threading
import time
from pathlib import Path

import httpx
import openai

from pagoda.engine import LLM, SamplingParams
from tests.serving import Server

PROMPT = [1, 57, 300, 12, 9, 845, 33]


def _rank_pids(engine_pid: int) -> list[int]:
    """The engine core's tensor-parallel ranks (its spawned children)."""
    children = subprocess.run(
        ["pgrep", "-P", str(engine_pid)], capture_output=True, text=True
    ).stdout.split()
    return [
        int(pid) for pid in children if b"spawn_main" in Path(f"/proc/{pid}/cmdline").read_bytes()
    ]


def test_tp2_server_serves_the_tokens_of_one_rank_and_reports_a_dead_rank(tiny_models):
    model = str(tiny_models["llama"])
    llm = LLM(model, dtype="float32", device="cpu")
    want = (
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=16))[0]
        .outputs[0]
        .token_ids
    )
    server = Server(
        ["--model", model, "--dtype", "float32", "--device", "cpu", "--tensor-parallel-size", "2"]
    ).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)
        r = client.completions.create(
            model=model, prompt=PROMPT, temperature=0, max_tokens=16, logprobs=0
        )
        got = [llm.tokenizer.convert_tokens_to_ids(t) for t in r.choices[0].logprobs.tokens]
        assert r.choices[0].text == llm.tokenizer.decode(want)
        assert len(got) == len(want)
        ranks = _rank_pids(server.engine_pid())
        assert len(ranks) == 1

        statuses: list[int] = []

        def long_request() -> None:
            body = {"model": model, "prompt": PROMPT, "max_tokens": 2000, "ignore_eos": True}
            r = httpx.post(f"{server.url}/v1/completions", json=body, timeout=60)
            statuses.append(r.status_code)
            assert r.json()["error"]["message"]

        thread = threading.Thread(target=long_request)
        thread.start()
        deadline = time.monotonic() + 30
        while server.running() == 0:
            assert time.monotonic() < deadline, "the request never started running"
            time.sleep(0.01)
        killed = time.monotonic()
        os.kill(ranks[0], signal.SIGKILL)
        thread.join(30)
        assert statuses == [503]
        assert time.monotonic() - killed < 10
        health = httpx.get(f"{server.url}/health")
        assert health.status_code == 503
        r = httpx.post(f"{server.url}/v1/completions", json={"model": model, "prompt": "hi"})
        assert r.status_code == 503 and r.json()["error"]["message"]
    finally:
        assert server.stop() == 0
    # the engine core's watch saw the rank exit, or its step failed on the closed connection
    assert "RankDiedError: " in server.log() or "tensor-parallel pagoda-tp-rank1" in server.log()
