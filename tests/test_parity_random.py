"""Greedy parity with transformers over random model configurations (tests/random_models.py).

Each draw builds a random fp32 model of one family with random heads, KV heads, head_dim,
sizes, rope variant, biases and tying, then compares the engine's greedy completions with
transformers' under a random engine setting (torch or CPU kernels, chunked prefill, a KV cache
small enough to preempt), plus a second request that hits the prefix cache. A divergence is
a tie only where transformers' two best logits are within TIE of each other.

CI runs DEFAULT_DRAWS draws; PAGODA_PARITY_DRAWS=300 runs that many (PAGODA_PARITY_SEED picks
another sample, PAGODA_PARITY_DRAW=seed-index replays one draw). PAGODA_PARITY_TP=2 runs the
engine with that tensor-parallel size (gloo on the CPU), skipping draws whose sizes do not split.
"""

from __future__ import annotations

import os

import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from tests.random_models import BLOCK_SIZE, NEW_TOKENS, Draw, build, draw

DEFAULT_DRAWS = 12
TIE = 1e-4
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)


def _draws() -> list[Draw]:
    if one := os.environ.get("PAGODA_PARITY_DRAW"):
        seed, index = one.split("-")
        return [draw(int(seed), int(index))]
    seed = int(os.environ.get("PAGODA_PARITY_SEED", "0"))
    count = int(os.environ.get("PAGODA_PARITY_DRAWS", DEFAULT_DRAWS))
    return [draw(seed, i) for i in range(count)]


def _reference(model: torch.nn.Module, prompt: list[int]) -> list[int]:
    out = model.generate(
        torch.tensor([prompt]),
        max_new_tokens=NEW_TOKENS,
        min_new_tokens=NEW_TOKENS,
        do_sample=False,
    )
    return out[0, len(prompt) :].tolist()


def _assert_same_or_tie(model, d: Draw, prompt: list[int], got: list[int], want: list[int]):
    step = next((i for i, (a, b) in enumerate(zip(got, want)) if a != b), None)
    if step is None:
        assert len(got) == len(want), d.describe()
        return
    with torch.no_grad():
        logits = model(torch.tensor([prompt + want[:step]])).logits[0, -1].double()
    top2 = logits.topk(2).values
    gap = (top2[0] - top2[1]).item()
    assert gap <= TIE, (
        f"{d.describe()}\nprompt of {len(prompt)} tokens: token {step} is {got[step]}, "
        f"transformers' {want[step]} (its two best logits {gap:.2e} apart)"
    )


@pytest.mark.parametrize("d", _draws(), ids=lambda d: d.id)
def test_random_config_matches_transformers(d: Draw, tmp_path):
    tp = int(os.environ.get("PAGODA_PARITY_TP", "1"))
    if tp > 1 and not _splits(d.config, tp):
        pytest.skip(f"draw {d.id}: its sizes do not split over {tp} ranks")
    model = build(d, tmp_path)
    llm = LLM(
        str(tmp_path),
        dtype="float32",
        skip_tokenizer_init=True,
        tensor_parallel_size=tp,
        **d.engine,
    )
    try:
        _check(llm, model, d)
    finally:
        llm.close()


def _splits(config: dict, tp: int) -> bool:
    heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
    intermediate = config.get("moe_intermediate_size", config["intermediate_size"])
    return (
        heads % tp == 0
        and (kv % tp == 0 or tp % kv == 0)
        and config["intermediate_size"] % tp == 0
        and intermediate % tp == 0
    )


def _check(llm: LLM, model: torch.nn.Module, d: Draw) -> None:
    outs = llm.generate([{"prompt_token_ids": p} for p in d.prompts], GREEDY)
    for prompt, out in zip(d.prompts, outs):
        _assert_same_or_tie(model, d, prompt, out.outputs[0].token_ids, _reference(model, prompt))
    if d.expect_preemption:
        assert llm.engine.scheduler.num_preemptions > 0, d.describe()

    # a new request that shares the full blocks of the longest prompt: they come from the cache
    # (computed again first: a small KV cache may have evicted them under the batch)
    longest = max(d.prompts, key=len)
    shared = (len(longest) - 1) // BLOCK_SIZE * BLOCK_SIZE
    llm.generate({"prompt_token_ids": longest}, SamplingParams(temperature=0, max_tokens=1))
    prompt = longest[:shared] + [(t * 7 + 5) % d.config["vocab_size"] for t in longest[:9]]
    out = llm.generate({"prompt_token_ids": prompt}, GREEDY)[0]
    assert out.num_cached_tokens == shared, d.describe()
    _assert_same_or_tie(model, d, prompt, out.outputs[0].token_ids, _reference(model, prompt))
