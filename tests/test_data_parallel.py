"""`pagoda serve --data-parallel-size 2`: two engine cores behind one model, both serving."""

from __future__ import annotations

import argparse
import asyncio
import re
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import openai
import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import EngineConfig
from pagoda.server.preflight import check_parallel_args
from pagoda.server.replicas import merge_stats, replica_config
from tests.serving import Server, engines_stopped, held_streams

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


def _prefix_cache_blocks(url: str) -> float:
    text = httpx.get(f"{url}/metrics").text
    return float(re.search(r"pagoda:prefix_cache_blocks\{.*\} (\S+)", text)[1])


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
        # the replicas' cached prefixes (LONG's two full blocks at least), summed: it read 0
        deadline = time.monotonic() + 10
        while _prefix_cache_blocks(server.url) < 2:
            assert time.monotonic() < deadline, httpx.get(f"{server.url}/metrics").text
            time.sleep(0.2)
    finally:
        assert server.stop() == 0


def test_routing_weighs_a_request_by_its_choices(tiny_models):
    """Replica 0 with one request for 4 choices is busier than replica 1 with one or two plain
    requests: the three plain requests after it all go to replica 1 (counting requests, the
    second of them went to replica 0)."""
    model = str(tiny_models["llama"])
    server = Server(["--model", model, "--dtype", "float32", "--data-parallel-size", "2"])
    server.wait_ready()

    def body(i: int, n: int) -> dict:
        # shorter than a KV block: routed by load alone
        prompt = [1, 40 + i, 300, 12]
        return {"model": model, "prompt": prompt, "n": n, "max_tokens": 64, "stream": True}

    async def hold_and_release(pids: list[int]) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
            # engines stopped: every request stays in flight until it is read, none finishes
            bodies = [body(0, 4)] + [body(i, 1) for i in range(1, 4)]
            with engines_stopped(pids):
                async with held_streams(client, "/v1/completions", bodies):
                    pass

    try:
        replicas = httpx.get(f"{server.url}/health").json()["models"][model]["replicas"]
        asyncio.run(hold_and_release([r["pid"] for r in replicas]))
        assert _routed(server.url) == {"0": 1.0, "1": 3.0}
    finally:
        assert server.stop() == 0, server.log()


def test_merged_stats_sum_the_replicas_cached_prefixes():
    """pagoda:prefix_cache_blocks read 0 under --data-parallel-size, whatever the replicas held."""
    one = {"running": 1, "waiting": 0, "kv_cache_usage": 0.5, "prefix_cache_blocks": 3}
    two = {"running": 2, "waiting": 1, "kv_cache_usage": 0.25, "prefix_cache_blocks": 4}
    merged = merge_stats([one, two])
    assert merged["prefix_cache_blocks"] == 7
    assert (merged["running"], merged["waiting"], merged["kv_cache_usage"]) == (3, 1, 0.375)


def test_each_replica_meets_its_ranks_on_a_port_of_its_own():
    """--data-parallel-size 2 --tensor-parallel-size 2 --master-port P: both replicas' ranks met
    at P, so the second replica failed to start (the port in use) and the server with it."""
    config = EngineConfig(model="m", device="cpu", tensor_parallel_size=2, master_port=29500)
    assert [replica_config(config, i).master_port for i in range(3)] == [29500, 29501, 29502]
    free = EngineConfig(model="m", device="cpu", tensor_parallel_size=2)  # each a free port
    assert replica_config(free, 1).master_port is None


def _two_gpus(monkeypatch) -> None:
    """No GPU here: torch.cuda answers as a machine with two GPUs would."""
    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)


def test_replicas_take_a_gpu_each_from_the_engines_device(monkeypatch):
    """`--data-parallel-size 2` with the default device (auto) put both replicas on GPU 0, and
    `--device cuda:1` put replica 0 on GPU 0: replica i starts i * tp GPUs after the device."""
    _two_gpus(monkeypatch)
    auto = EngineConfig(model="m")
    assert [replica_config(auto, i).device for i in range(2)] == ["cuda:0", "cuda:1"]
    one = EngineConfig(model="m", device="cuda:1")
    assert replica_config(one, 0).device == "cuda:1"
    with pytest.raises(ValueError, match=r"only 2 GPU\(s\) visible"):
        replica_config(one, 1).resolve_device()  # cuda:2
    cpu = EngineConfig(model="m", device="cpu")
    assert replica_config(cpu, 1).device == "cpu"


def test_more_tensor_parallel_ranks_than_gpus_are_refused_before_anything_starts(monkeypatch):
    """A rank on a GPU that is not there failed only once spawned (`invalid device ordinal`),
    after rank 0 waited for it."""
    _two_gpus(monkeypatch)
    with pytest.raises(ValueError, match=r"tensor_parallel_size 4 .* cuda:0-3: only 2 GPU"):
        EngineConfig(model="m", tensor_parallel_size=4).resolve_device()
    with pytest.raises(ValueError, match=r"tensor_parallel_size 2 .* cuda:1-2: only 2 GPU"):
        EngineConfig(model="m", device="cuda:1", tensor_parallel_size=2).resolve_device()
    # two nodes of two ranks each: each node needs its two GPUs only
    two_nodes = EngineConfig(model="m", tensor_parallel_size=4, nnodes=2, master_port=29500)
    assert two_nodes.resolve_device() == torch.device("cuda", 0)


def test_data_parallelism_over_several_nodes_is_refused():
    args = argparse.Namespace(data_parallel_size=2, nnodes=2, master_port=29500, model="m")
    with pytest.raises(ValueError, match="--nnodes must be 1"):
        check_parallel_args(args)
    check_parallel_args(argparse.Namespace(data_parallel_size=2, nnodes=None, master_port=None))


def test_a_master_port_out_of_range_is_refused():
    with pytest.raises(ValueError, match="master_port must be in 0-65535"):
        EngineConfig(model="m", tensor_parallel_size=2, master_port=70000)
    with pytest.raises(ValueError, match="several nodes need master_port"):
        EngineConfig(model="m", tensor_parallel_size=2, nnodes=2, master_port=0)
