"""A choice that a stop string ended leaves the engine at once, while the request's other
choices go on (n > 1): the engine no longer spends steps and KV blocks on text nobody gets."""

from __future__ import annotations

import httpx
import openai
import pytest

from pagoda.engine import EngineConfig, SamplingParams
from pagoda.engine.core import EngineCore, decode_delta, encode_params
from tests.serving import Server

MAX_TOKENS = 180  # two choices this long outgrow KV_CACHE_BLOCKS; one fits
KV_CACHE_BLOCKS = 20  # of 16 tokens: a 256-token sequence and a little more


def test_a_finished_choice_says_so_once_and_steps_no_more(tiny_models):
    core = EngineCore(
        EngineConfig(model=str(tiny_models["llama"]), dtype="float32", max_model_len=128)
    )
    params = SamplingParams(n=2, seed=1, max_tokens=20, ignore_eos=True)
    core.add("r", [1, 2, 3, 4], encode_params(params))
    before = [decode_delta(o) for _ in range(3) for o in core.step()]
    (last,) = [decode_delta(o) for o in core.finish("r", 0)]
    assert (last.index, last.new_token_ids, last.finish_reason) == (0, [], "stop")
    assert last.num_prompt_tokens == 4
    assert core.finish("r", 0) == []  # one finishing output per choice
    after = []
    while core.has_work():
        after += [decode_delta(o) for o in core.step()]
    assert {d.index for d in after} == {1}
    choice_1 = [t for d in before + after if d.index == 1 for t in d.new_token_ids]
    assert len(choice_1) == 20 and after[-1].finish_reason == "length"
    assert core.finish("r", 1) == [] and core.finish("gone", 0) == []


@pytest.fixture(scope="module", params=[1, 2], ids=["one-engine", "two-replicas"])
def server(request, tiny_models, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("catalog") / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: m\n    kind: chat\n    source: {tiny_models['llama']}\n"
        f"    max_model_len: 256\n    engine:\n      dtype: float32\n"
        f"      kv_cache_blocks: {KV_CACHE_BLOCKS}\n"
    )
    srv = Server(["--catalog", str(catalog), "--data-parallel-size", str(request.param)])
    srv.wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def preemptions(server: Server) -> float:
    for line in httpx.get(f"{server.url}/metrics").text.splitlines():
        if line.startswith("pagoda:num_preemptions_total{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no pagoda:num_preemptions_total")


@pytest.mark.parametrize("stream", [False, True])
def test_a_choice_cut_by_a_stop_string_frees_its_kv_blocks(server, stream):
    """Before: the cut choice ran on to max_tokens with the other, both outgrew the KV cache and
    the engine preempted one of them (and recomputed it) for text nobody would get."""
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
    request = dict(
        model="m",
        prompt="the quick brown fox",
        n=2,
        seed=11,
        max_tokens=MAX_TOKENS,
        extra_body={"ignore_eos": True},
    )
    whole = client.completions.create(**request)
    assert preemptions(server) > 0  # the two choices do not fit together
    texts = [c.text for c in sorted(whole.choices, key=lambda c: c.index)]
    # a stop string early in choice 0's text and nowhere in choice 1's
    stop = next(
        texts[0][i : i + 3]
        for i in range(len(texts[0]))
        if texts[0][i : i + 3].strip() and texts[0][i : i + 3] not in texts[1]
    )
    cut_at = texts[0].index(stop)
    assert cut_at < len(texts[0]) // 4, "no early stop string: pick another seed"
    before = preemptions(server)
    if stream:
        chunks = client.completions.create(**request, stop=[stop], stream=True)
        got, reasons = ["", ""], [None, None]
        for chunk in chunks:
            for choice in chunk.choices:
                got[choice.index] += choice.text
                reasons[choice.index] = choice.finish_reason or reasons[choice.index]
    else:
        cut = client.completions.create(**request, stop=[stop])
        ordered = sorted(cut.choices, key=lambda c: c.index)
        got, reasons = [c.text for c in ordered], [c.finish_reason for c in ordered]
    assert got == [texts[0][:cut_at], texts[1]]
    assert reasons == ["stop", "length"]
    assert preemptions(server) == before
