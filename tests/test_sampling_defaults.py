"""Sampling defaults from the model's generation_config.json, as vLLM's `--generation-config
auto`: a request (or `generate` call) that leaves a field unset gets the model's recommended
value, one that sets it keeps its own; `vllm` restores OpenAI's defaults."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import openai
import pytest

from pagoda.engine import LLM, SamplingParams
from tests.serving import Server, failed_start

# top_k 1 makes any temperature greedy; max_new_tokens is max_tokens' default
RECOMMENDED = {"top_k": 1, "max_new_tokens": 5, "temperature": 0.9}
PROMPT = "the quick brown fox"


@pytest.fixture(scope="module")
def model_folder(tiny_models, tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("recommended") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "generation_config.json").write_text(json.dumps(RECOMMENDED))
    return folder


def token_ids(outputs) -> list[list[int]]:
    return [list(choice.token_ids) for output in outputs for choice in output.outputs]


def test_generate_without_params_uses_the_models_recommended_ones(model_folder):
    llm = LLM(str(model_folder), dtype="float32", max_model_len=128)
    assert llm.get_default_sampling_params() == SamplingParams(
        temperature=0.9, top_k=1, max_tokens=5
    )
    greedy = SamplingParams(temperature=0, max_tokens=5, ignore_eos=True)
    recommended = llm.get_default_sampling_params()
    recommended.ignore_eos = True
    assert token_ids(llm.generate(PROMPT, recommended)) == token_ids(llm.generate(PROMPT, greedy))
    (output,) = llm.generate(PROMPT)
    assert len(output.outputs[0].token_ids) <= 5


def test_vllm_and_overrides_replace_the_models_values(model_folder):
    llm = LLM(str(model_folder), dtype="float32", max_model_len=128, generation_config="vllm")
    assert llm.get_default_sampling_params() == SamplingParams()
    llm = LLM(
        str(model_folder),
        dtype="float32",
        max_model_len=128,
        override_generation_config={"max_new_tokens": 3, "top_p": 0.5},
    )
    assert llm.get_default_sampling_params() == SamplingParams(
        temperature=0.9, top_k=1, top_p=0.5, max_tokens=3
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        ({"override_generation_config": {"temprature": 0.5}}, "temprature"),
        ({"override_generation_config": {"temperature": -1.0}}, "temperature"),
        ({"override_generation_config": {"top_k": "20"}}, "numbers"),
        ({"generation_config": "/nonexistent"}, "/nonexistent"),
    ],
)
def test_bad_generation_configs_are_refused_naming_the_value(model_folder, kwargs, expected):
    with pytest.raises(ValueError, match=expected):
        LLM(str(model_folder), dtype="float32", max_model_len=128, **kwargs)


@pytest.fixture(scope="module")
def client(model_folder):
    server = Server(
        ["--model", str(model_folder), "--served-model-name", "m", "--dtype", "float32"]
        + ["--max-model-len", "256"]
    ).wait_ready()
    yield openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0), server
    assert server.stop() == 0, server.log()


def test_requests_that_leave_fields_unset_get_the_models_recommended_values(client):
    """Before: the generation config was not read; each choice sampled at temperature 1 up to
    the end of the context."""
    client, server = client
    messages = [{"role": "user", "content": PROMPT}]
    greedy = client.chat.completions.create(
        model="m", messages=messages, temperature=0, max_tokens=5, extra_body={"ignore_eos": True}
    )
    recommended = client.chat.completions.create(
        model="m", messages=messages, n=3, seed=7, extra_body={"ignore_eos": True}
    )
    assert recommended.usage.completion_tokens == 3 * 5
    assert {c.message.content for c in recommended.choices} == {greedy.choices[0].message.content}
    assert "default to {'temperature': 0.9, 'top_k': 1, 'max_tokens': 5}" in server.log()


def test_a_requests_own_values_win(client):
    client, _ = client
    sampled = client.completions.create(
        model="m",
        prompt=PROMPT,
        n=4,
        seed=7,
        max_tokens=8,
        extra_body={"top_k": 0, "ignore_eos": True},
    )
    assert sampled.usage.completion_tokens == 4 * 8
    assert len({c.text for c in sampled.choices}) > 1  # sampled at 0.9 from the whole vocabulary


def test_the_server_refuses_a_generation_config_folder_without_one(tmp_path, tiny_models):
    error = failed_start("--model", str(tiny_models["llama"]), "--generation-config", str(tmp_path))
    assert str(tmp_path) in error and "Traceback" not in error


def test_an_operators_max_new_tokens_caps_what_a_request_asks(model_folder, tmp_path):
    """As vLLM: override_generation_config's max_new_tokens, and that of a generation_config
    folder, cap a served request's max_tokens (the model's own generation_config.json only
    sets a default: test_a_requests_own_values_win asks 8 past its 5). Before: a default
    only, so a request asking 8 got 8."""
    folder = tmp_path / "config"
    folder.mkdir()
    (folder / "generation_config.json").write_text(json.dumps({"max_new_tokens": 6}))
    common = {"kind": "chat", "source": str(model_folder), "max_model_len": 256}
    entries = [
        {
            "id": "override",
            **common,
            "engine": {"override_generation_config": {"max_new_tokens": 4}},
        },
        {"id": "folder", **common, "engine": {"generation_config": str(folder)}},
    ]
    catalog = tmp_path / "models.yaml"
    catalog.write_text(json.dumps({"models": entries}))
    server = Server(["--catalog", str(catalog), "--dtype", "float32"]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)
        for model, cap in (("override", 4), ("folder", 6)):
            for asked, got in ((8, cap), (None, cap), (2, 2)):
                choice = client.completions.create(
                    model=model, prompt=PROMPT, max_tokens=asked, extra_body={"ignore_eos": True}
                )
                assert choice.usage.completion_tokens == got, (model, asked)
                assert choice.choices[0].finish_reason == "length"
        assert "a served request gets at most 4 tokens" in server.log()
    finally:
        assert server.stop() == 0, server.log()
