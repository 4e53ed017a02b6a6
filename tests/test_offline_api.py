"""The offline API as vLLM's users call it: `LLM(...).generate(...)`, on a tiny random Llama."""

import pytest

from pagoda.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=256)


def greedy(max_tokens: int) -> SamplingParams:
    return SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)


def test_an_interrupted_generate_leaves_nothing_running(llm, monkeypatch):
    """Ctrl-C mid-generate: the next call must not first run the interrupted requests out."""
    step, calls = llm.engine.step, []

    def interrupted_on_third_step():
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step()

    monkeypatch.setattr(llm.engine, "step", interrupted_on_third_step)
    with pytest.raises(KeyboardInterrupt):
        llm.generate(["a b c"] * 4, greedy(200))
    assert not llm.engine.has_unfinished_requests()
    blocks = llm.engine.block_manager
    assert blocks.num_free_blocks == blocks.num_blocks
    calls[:] = [1] * 100  # counts on from past the interrupting step
    out = llm.generate("a b c", greedy(4))[0]
    assert len(out.outputs[0].token_ids) == 4
    assert len(calls) == 104  # one step a token: no leftover request was stepped
