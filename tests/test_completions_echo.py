"""/v1/completions' echo on a real server whose tokenizer puts a BOS token before every text,
as Llama's and Mistral's do (the other test models and SmolLM2 add none): what a client that
takes the completion as `text[len(prompt):]` (lm-eval, for one) gets back."""

from __future__ import annotations

import shutil

import httpx
import pytest
from tokenizers import processors
from transformers import AutoTokenizer

from tests.serving import Server

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def bos_model(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("bos") / "llama"
    shutil.copytree(tiny_models["llama"], folder)
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    tokenizer.save_pretrained(folder)
    return folder, tokenizer


@pytest.fixture(scope="module")
def http(bos_model):
    server = Server(["--model", str(bos_model[0]), "--served-model-name", "m"]).wait_ready()
    with httpx.Client(base_url=server.url, timeout=60) as client:
        yield client
    assert server.stop() == 0, server.log()


def complete(http, **body) -> list[dict]:
    body = {"model": "m", "max_tokens": 3, "ignore_eos": True, "temperature": 0, **body}
    response = http.post("/v1/completions", json=body)
    assert response.status_code == 200, response.text
    return response.json()["choices"]


def test_echo_gives_a_text_prompt_back_as_sent(http, bos_model):
    tokenizer = bos_model[1]
    ids = tokenizer.encode(PROMPT)
    assert ids[0] == tokenizer.bos_token_id  # the BOS is in the prompt's ids, not its text
    (plain,) = complete(http, prompt=PROMPT)
    generated = plain["text"]
    assert generated
    for body in (
        {"prompt": PROMPT},
        {"prompt": [PROMPT, PROMPT]},
        {"prompt": PROMPT, "logprobs": 1},
    ):
        choices = complete(http, echo=True, **body)
        assert [c["text"] for c in choices] == [PROMPT + generated] * len(choices), body
        if "logprobs" in body:  # the tokens still include the BOS, with no width in the text
            logprobs = choices[0]["logprobs"]
            assert logprobs["tokens"][0] == tokenizer.bos_token
            assert logprobs["text_offset"][:2] == [0, 0]
            text = choices[0]["text"]
            for token, offset in zip(logprobs["tokens"][1:], logprobs["text_offset"][1:]):
                assert text.startswith(token, offset), (token, offset, text)
            assert logprobs["text_offset"][len(ids)] == len(PROMPT)  # the first generated token
    # token ids are decoded: there is no other text to give back
    (choice,) = complete(http, echo=True, prompt=ids)
    assert choice["text"] == tokenizer.decode(ids) + generated
