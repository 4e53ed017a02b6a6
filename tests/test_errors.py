"""Bad input is a clear ValueError before anything reaches a step; the engine carries on."""

import json
import shutil

import pytest

from pagoda.engine import LLM, SamplingParams


@pytest.fixture(scope="module")
def llm(tiny_models) -> LLM:
    return LLM(str(tiny_models["qwen3"]), dtype="float32", max_model_len=128)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"max_tokens": -3}, "max_tokens"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"temperature": -0.1}, "temperature"),
        ({"n": 0}, "n must"),
        ({"logprobs": 21}, "logprobs"),
        ({"top_k": -5}, "top_k"),
        ({"min_p": 1.5}, "min_p"),
        ({"presence_penalty": 3.0}, "presence_penalty"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"min_tokens": 5, "max_tokens": 2}, "min_tokens"),
    ],
)
def test_invalid_sampling_params(kwargs, message):
    with pytest.raises(ValueError, match=message):
        SamplingParams(**kwargs)


def test_prompt_longer_than_max_model_len(llm):
    with pytest.raises(ValueError, match="max_model_len=128"):
        llm.generate({"prompt_token_ids": [5] * 200}, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="max_model_len=128"):
        llm.engine.add_request("long", [5] * 128, SamplingParams(max_tokens=4))
    with pytest.raises(ValueError, match="more than the context holds"):  # even to score it
        llm.engine.add_request("long", [5] * 129, SamplingParams(max_tokens=0))


def test_bad_prompts(llm):
    with pytest.raises(ValueError, match="empty"):
        llm.generate({"prompt_token_ids": []})
    with pytest.raises(ValueError, match="vocabulary"):
        llm.generate({"prompt_token_ids": [1, 5000]})
    with pytest.raises(ValueError, match="prompt"):
        llm.generate([42])
    with pytest.raises(ValueError, match="2 sampling params"):
        llm.generate(["a"], [SamplingParams(), SamplingParams()])


def test_duplicate_request_id(llm):
    llm.engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=2))
    with pytest.raises(ValueError, match="already in use"):
        llm.engine.add_request("dup", [5, 6, 7], SamplingParams(max_tokens=2))
    llm.engine.abort_request("dup")


def test_engine_still_serves_after_bad_input(llm):
    # a batch with one bad prompt is rejected whole: nothing of it enters the engine
    with pytest.raises(ValueError):
        llm.generate([{"prompt_token_ids": [5, 6]}, {"prompt_token_ids": [5] * 500}])
    assert not llm.engine.has_unfinished_requests()
    out = llm.generate(
        {"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=5, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 5
    assert llm.engine.block_manager.num_free_blocks == llm.engine.block_manager.num_blocks


def test_max_tokens_is_bounded_by_the_context(llm):
    out = llm.generate(
        {"prompt_token_ids": [5] * 120}, SamplingParams(max_tokens=50, ignore_eos=True)
    )
    assert len(out[0].outputs[0].token_ids) == 8
    assert out[0].outputs[0].finish_reason == "length"


def test_unknown_architecture(tiny_models, tmp_path):
    folder = tmp_path / "foo"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["architectures"] = ["FooForCausalLM"]
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match="unsupported model architecture.*LlamaForCausalLM"):
        LLM(str(folder), dtype="float32")


def test_bad_engine_settings(tiny_models):
    with pytest.raises(ValueError, match="cannot hold one sequence"):
        LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512, kv_cache_blocks=4)
    with pytest.raises(ValueError, match="exceeds"):
        LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=10**6)
    with pytest.raises(ValueError, match="dtype"):
        LLM(str(tiny_models["llama"]), dtype="float64")
    with pytest.raises(ValueError, match="neither a local path"):
        LLM("/no/such/model-folder")
