"""`pagoda serve --tensor-parallel-size 2` on the CPU: the tokens of one rank; a rank that
dies mid-request makes the server report the engine dead (503s, nothing hangs) and restart it;
a SIGTERM to the whole process group drains."""

from __future__ import annotations

import json
import os
import signal
import threading
import time

import httpx
import openai
import psutil

from pagoda.engine import LLM, SamplingParams
from tests.serving import Server, gone

PROMPT = [1, 57, 300, 12, 9, 845, 33]


def _rank_pids(engine_pid: int) -> list[int]:
    """The engine core's tensor-parallel ranks: the forks of the forkserver it started."""
    forkservers = [
        child
        for child in psutil.Process(engine_pid).children()
        if "multiprocessing.forkserver" in " ".join(child.cmdline())
    ]
    return [rank.pid for forkserver in forkservers for rank in forkserver.children()]


def test_tp2_server_serves_the_tokens_of_one_rank_and_reports_a_dead_rank(tiny_models):
    model = str(tiny_models["llama"])
    llm = LLM(model, dtype="float32", device="cpu")
    want = (
        llm.generate({"prompt_token_ids": PROMPT}, SamplingParams(temperature=0, max_tokens=16))[0]
        .outputs[0]
        .token_ids
    )
    server = Server(
        ["--model", model, "--dtype", "float32", "--device", "cpu", "--tensor-parallel-size", "2"],
        new_session=True,
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
        # the engine core exited: it is started again, with new ranks
        server.wait_ready(timeout=120)
        _drains_on_a_group_sigterm(server, model)
    finally:
        assert server.stop() == 0
    # the engine core's watch saw the rank exit, or its step failed on the closed connection
    assert "RankDiedError: " in server.log() or "tensor-parallel pagoda-tp-rank1" in server.log()


def _drains_on_a_group_sigterm(server: Server, model: str) -> None:
    """SIGTERM to the server's whole process group, as systemd's default KillMode
    (control-group), `kill -TERM -PGID` or `timeout` send it: the engine core and its rank
    ignore it while the server drains (they died of it, and the stream in flight ended with a
    503 instead of finishing); then the core stops its rank and every process ends."""
    engine = psutil.Process(server.engine_pid())
    (rank,) = [psutil.Process(pid) for pid in _rank_pids(engine.pid)]
    body = {"model": model, "prompt": PROMPT, "max_tokens": 200, "ignore_eos": True}
    events: list[str] = []
    with httpx.stream(
        "POST", f"{server.url}/v1/completions", json={**body, "stream": True}, timeout=60
    ) as r:
        for line in r.iter_lines():
            if line.startswith("data: "):
                events.append(line)
                if len(events) == 3:
                    os.killpg(server.process.pid, signal.SIGTERM)
    assert events[-1] == "data: [DONE]" and not any('"error"' in e for e in events[:-1])
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"
    stopped = time.monotonic()
    assert server.process.wait(60) == 0
    assert gone(engine) and gone(rank)
    # the rank took the stop (the engine's exit did not wait on it until the server killed it)
    assert time.monotonic() - stopped < 8, server.log()
    assert "restarting" not in server.log().split("draining:")[1]
