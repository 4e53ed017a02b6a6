"""/v1/completions' handler on a scripted engine: what the echo gives back for a text prompt.

The tokenizer here puts a BOS token before every text, as Llama's and Mistral's do; the test
models and the default catalog's SmolLM2 add none, and a server for one more model would cost
a start-up for this one check.
"""

from __future__ import annotations

import asyncio
import json

from tokenizers import processors

from pagoda.engine.sequence import Logprob, SequenceDelta
from pagoda.server.completions import completion
from pagoda.server.generation import ServedModel
from pagoda.server.keys.meter import Meter
from pagoda.server.metrics import Metrics
from pagoda.server.protocol import CompletionRequest
from tests.tiny_models import train_tokenizer

GENERATED = 300  # the one token the scripted engine generates


class ScriptedEngine:
    """Answers each request with one generated token, and its prompt logprobs when asked."""

    num_waiting = 0

    def __init__(self, vocab_size: int) -> None:
        self.info = {"vocab_size": vocab_size}

    async def generate(self, request_id, prompt, params):
        prompt_logprobs = None
        if params.prompt_logprobs is not None:
            prompt_logprobs = [None] + [{t: Logprob(-1.0, 1)} for t in prompt[1:]]
        yield SequenceDelta(
            request_id=request_id,
            index=0,
            new_token_ids=[GENERATED],
            new_logprobs=[{GENERATED: Logprob(-0.5, 1)}],
            prompt_logprobs=prompt_logprobs,
            finish_reason="length",
            num_prompt_tokens=len(prompt),
            num_cached_tokens=0,
        )


def test_echo_gives_a_text_prompt_back_as_sent():
    tokenizer = train_tokenizer()
    tokenizer.backend_tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", special_tokens=[("<s>", tokenizer.bos_token_id)]
    )
    model = ServedModel(
        id="m", client=ScriptedEngine(len(tokenizer)), tokenizer=tokenizer, max_model_len=64
    )
    prompt = "The quick brown fox"
    ids = tokenizer.encode(prompt)
    assert ids[0] == tokenizer.bos_token_id  # the BOS is in the prompt's ids, not its text
    generated = tokenizer.decode([GENERATED])
    for body in (
        {"prompt": prompt},
        {"prompt": [prompt, prompt]},
        {"prompt": prompt, "logprobs": 1},
    ):
        request = CompletionRequest(model="m", echo=True, max_tokens=1, **body)
        response = asyncio.run(
            completion(model, request, Metrics(dict), Meter(None, "/v1/completions"))
        )
        choices = json.loads(response.body)["choices"]
        # a client takes the completion as text[len(prompt):]
        assert [c["text"] for c in choices] == [prompt + generated] * len(choices), body
        if "logprobs" in body:  # the tokens still include the BOS, with no width in the text
            logprobs = choices[0]["logprobs"]
            assert logprobs["tokens"][0] == tokenizer.bos_token
            assert logprobs["text_offset"][:2] == [0, 0]
            text = choices[0]["text"]
            for token, offset in zip(logprobs["tokens"][1:], logprobs["text_offset"][1:]):
                assert text.startswith(token, offset), (token, offset, text)
            assert logprobs["text_offset"][-1] == len(prompt)  # the generated token
    # token ids are decoded: there is no other text to give back
    request = CompletionRequest(model="m", echo=True, max_tokens=1, prompt=ids)
    response = asyncio.run(completion(model, request, Metrics(dict), Meter(None, "/v1/x")))
    assert json.loads(response.body)["choices"][0]["text"] == tokenizer.decode(ids) + generated
