"""`pagoda serve --data-parallel-size 2`: two engine cores behind one model, both serving."""

from __future__ import annotations

import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai

from pagoda.engine import LLM, SamplingParams
from tests.serving import Server

PROMPTS = [[1, 40 + i, 300, 12, 9 + i, 845, 33] for i in range(6)]
LONG = list(range(3, 40))  # more than one KV block of 16 tokens


def _routed(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics").text
    return {
        m[1]: float(m[2])
        for m in re.finditer(
            r'pagoda:replica_requests_routed_total\{.*replica="(\d)"\} (\S+)', text
        )
    }


def test_two_replicas_serve_concurrent_requests(tiny_models):
    model = str(tiny_models["llama"])
    llm = LLM(model, dtype="float32", device="cpu")
    greedy = SamplingParams(temperature=0, max_tokens=8)
    want = [
        o.outputs[0].text for o in llm.generate([{"prompt_token_ids": p} for p in PROMPTS], greedy)
    ]
    server = Server(
        ["--model", model, "--dtype", "float32", "--device", "cpu", "--data-parallel-size", "2"]
    ).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="x", max_retries=0)

        def complete(prompt: list[int]) -> str:
            r = client.completions.create(model=model, prompt=prompt, temperature=0, max_tokens=8)
            return r.choices[0].text

        with ThreadPoolExecutor(len(PROMPTS)) as pool:
            got = list(pool.map(complete, PROMPTS))
        assert got == want
        routed = _routed(server.url)
        assert set(routed) == {"0", "1"} and all(n > 0 for n in routed.values())
        assert sum(routed.values()) == len(PROMPTS)
        metrics = httpx.get(f"{server.url}/metrics").text
        assert 'pagoda:replica_kv_cache_usage_perc{model_name="' in metrics
        # one series for the model as a whole too
        assert metrics.count("pagoda:num_requests_running{") == 1

        # a long prompt lands on replica 1 while replica 0 is busy; once both are idle, a
        # prompt with the same first block still goes to replica 1, which holds it
        base = _routed(server.url)
        body = {"model": model, "prompt": PROMPTS[0], "max_tokens": 400, "ignore_eos": True}
        with ThreadPoolExecutor(1) as pool:
            busy = pool.submit(httpx.post, f"{server.url}/v1/completions", json=body, timeout=120)
            while _routed(server.url)["0"] == base["0"]:
                time.sleep(0.01)
            complete(LONG)
            assert busy.result().status_code == 200
        assert _routed(server.url)["1"] == base["1"] + 1
        complete(LONG[:16] + [5, 6])
        assert _routed(server.url) == {"0": base["0"] + 1, "1": base["1"] + 2}
    finally:
        assert server.stop() == 0
