"""A real `pagoda serve` on 127.0.0.1 with a tiny model, driven by the openai SDK and httpx."""

from __future__ import annotations

import asyncio
import json
import re
import time

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from pagoda.engine import LLM, SamplingParams
from tests.serving import Server, engines_stopped
from tests.tiny_models import a_bad_word

MODEL = "test-org/tiny-llama"  # has a "/" like hub ids
KEY = "sk-test-key"


@pytest.fixture(scope="module")
def server(tiny_models):
    srv = Server(
        [
            "--model",
            str(tiny_models["llama"]),
            "--served-model-name",
            MODEL,
            "--api-key",
            KEY,
            "--dtype",
            "float32",
            "--max-model-len",
            "512",
            "--max-request-bytes",
            str(1 << 20),
        ]
    ).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()
    assert KEY not in srv.log()  # keys are never logged


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0)


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60
    ) as c:
        yield c


VLLM_EXTRAS = ("ignore_eos", "min_tokens", "top_k", "min_p", "repetition_penalty")


def chat(client, **kwargs):
    """A chat request; vLLM's extra parameters travel in extra_body, as the SDK wants."""
    base = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a story"}]}
    extra = {k: kwargs.pop(k) for k in VLLM_EXTRAS if k in kwargs}
    if extra:
        kwargs["extra_body"] = {**kwargs.get("extra_body", {}), **extra}
    return client.chat.completions.create(**{**base, **kwargs})


def sse_events(response: httpx.Response) -> list[str]:
    return [line[len("data: ") :] for line in response.iter_lines() if line.startswith("data: ")]


# -- models, health, metrics ----------------------------------------------------------------


def test_models_list_and_retrieve_with_slash(client):
    assert [m.id for m in client.models.list()] == [MODEL]
    card = client.models.retrieve(MODEL)  # the SDK sends the "/" as %2F
    assert card.id == MODEL and card.object == "model"
    # vLLM's fields too (`vllm bench serve` reads root)
    extra = card.model_extra
    assert extra["root"] == MODEL and extra["parent"] is None and extra["max_model_len"] == 512
    assert extra["permission"][0]["object"] == "model_permission"


def test_health_is_open_and_metrics_count(server, client):
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 200 and health.json()["status"] == "ok"
    assert health.json()["models"][MODEL]["status"] == "ready"
    chat(client, max_tokens=5)
    text = httpx.get(f"{server.url}/metrics").text
    for name in (
        "pagoda:num_requests_running",
        "pagoda:num_requests_waiting",
        "pagoda:kv_cache_usage_perc",
        "pagoda:prompt_tokens_total",
        "pagoda:generation_tokens_total",
        "pagoda:time_to_first_token_seconds_bucket",
        "pagoda:inter_token_latency_seconds_bucket",
        "pagoda:e2e_request_latency_seconds_count",
    ):
        assert name in text
    generated = [
        line for line in text.splitlines() if line.startswith("pagoda:generation_tokens_total")
    ]
    assert float(generated[0].split()[-1]) >= 5


# -- chat completions -----------------------------------------------------------------------


def test_chat_response_shape(client):
    r = chat(client, max_tokens=12, temperature=0, user="u-1")
    assert r.id.startswith("chatcmpl-") and r.object == "chat.completion" and r.model == MODEL
    choice = r.choices[0]
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.message.refusal is None and choice.logprobs is None
    assert choice.finish_reason in ("stop", "length")
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens > 0
    assert r.usage.total_tokens == r.usage.prompt_tokens + r.usage.completion_tokens


def test_greedy_chat_equals_offline_engine(client, tiny_models):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    r = chat(client, messages=messages, temperature=0, max_tokens=24, ignore_eos=True)
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512)
    text = llm.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = llm.tokenizer.encode(text, add_special_tokens=False)
    out = llm.generate({"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=24))
    assert r.choices[0].message.content == out[0].outputs[0].text
    assert r.usage.prompt_tokens == len(ids) and r.usage.completion_tokens == 24


def test_max_tokens_variants_and_extras(client):
    assert chat(client, max_tokens=7, ignore_eos=True).usage.completion_tokens == 7
    r = chat(client, max_completion_tokens=9, max_tokens=3, extra_body={"ignore_eos": True})
    assert r.usage.completion_tokens == 9  # max_completion_tokens wins
    r = chat(
        client,
        max_tokens=6,
        extra_body={
            "min_tokens": 6,
            "top_k": 5,
            "min_p": 0.05,
            "repetition_penalty": 1.1,
            "some_unknown_field": {"a": 1},
        },
    )
    assert r.usage.completion_tokens == 6 and r.choices[0].finish_reason == "length"


def test_seeded_n_choices_reproducible(client):
    a = chat(client, n=3, seed=42, temperature=1.0, max_tokens=16, ignore_eos=True)
    b = chat(client, n=3, seed=42, temperature=1.0, max_tokens=16, ignore_eos=True)
    texts = [c.message.content for c in a.choices]
    assert [c.index for c in a.choices] == [0, 1, 2]
    assert texts == [c.message.content for c in b.choices]
    assert len(set(texts)) > 1
    assert a.usage.completion_tokens == 48


def test_cached_tokens_count_the_prompt_once(client):
    messages = [{"role": "user", "content": "A prompt of several blocks, seen once: " * 8}]
    fresh = chat(client, messages=messages, n=3, max_tokens=2)
    # choices 1 and 2 reuse the prompt that choice 0 computed; the request's prompt was new
    assert fresh.usage.prompt_tokens > 32 and fresh.usage.prompt_tokens_details.cached_tokens == 0
    again = chat(client, messages=messages, max_tokens=2).usage
    assert again.prompt_tokens == fresh.usage.prompt_tokens
    assert (
        again.prompt_tokens - 16 <= again.prompt_tokens_details.cached_tokens < again.prompt_tokens
    )


def test_stop_strings_cut_across_tokens(client):
    free = chat(client, temperature=0, max_tokens=30, ignore_eos=True).choices[0].message.content
    assert len(free) > 12
    stop = free[5:12]  # most likely spans a token boundary
    r = chat(client, temperature=0, max_tokens=30, ignore_eos=True, stop=[stop, "\u2603never"])
    assert r.choices[0].message.content == free[: free.index(stop)]
    assert r.choices[0].finish_reason == "stop"
    # vLLM's include_stop_str_in_output: the text up to the stop string's end
    extra = {"include_stop_str_in_output": True}
    r = chat(client, temperature=0, max_tokens=30, ignore_eos=True, stop=stop, extra_body=extra)
    assert r.choices[0].message.content == free[: free.index(stop)] + stop


def test_stop_strings_wait_for_min_tokens(client):
    free = chat(client, temperature=0, max_tokens=30, ignore_eos=True, logprobs=True).choices[0]
    text, tokens = free.message.content, free.logprobs.content
    stop = next(c for c in text if c != "\ufffd")
    r = chat(client, temperature=0, max_tokens=30, stop=stop)
    assert r.choices[0].message.content == text[: text.index(stop)]
    # the text of the first k tokens (the tiny model writes stray bytes, decoded as U+FFFD)
    heads = (
        bytes(b for t in tokens[:k] for b in t.bytes).decode(errors="replace") for k in range(31)
    )
    k, head = next(
        (k, h) for k, h in enumerate(heads) if text.startswith(h) and len(h) > text.index(stop)
    )
    r = chat(client, temperature=0, max_tokens=30, stop=stop, extra_body={"min_tokens": k})
    end = text.find(stop, len(head))
    assert r.choices[0].message.content == (text if end < 0 else text[:end])
    assert r.choices[0].finish_reason == ("length" if end < 0 else "stop")


def test_allowed_token_ids_and_bad_words_as_the_offline_engine(client, tiny_models):
    """vLLM's two token constraints, sent as the SDK sends them, give what the offline engine
    (tested token by token in test_offline_api) gives."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512)
    prompt = [5, 6, 7, 8]
    free = llm.generate({"prompt_token_ids": prompt}, SamplingParams(temperature=0, max_tokens=24))
    word = a_bad_word(llm.tokenizer, free[0].outputs[0].token_ids)
    for extra in ({"allowed_token_ids": [11, 17, 40, 41]}, {"bad_words": [word]}):
        r = client.completions.create(
            model=MODEL, prompt=prompt, temperature=0, max_tokens=24, extra_body=extra
        )
        out = llm.generate(
            {"prompt_token_ids": prompt}, SamplingParams(**extra, temperature=0, max_tokens=24)
        )
        assert r.choices[0].text == out[0].outputs[0].text != free[0].outputs[0].text, extra


def test_chat_prompt_logprobs_as_completions_give_them(http):
    """vLLM's prompt_logprobs on chat: top-level, per prompt token, as completions give them for
    the same token ids (which test_lm_eval checks against transformers)."""
    messages = [{"role": "user", "content": "Tell me a story"}]
    ids = http.post("/tokenize", json={"messages": messages}).json()["tokens"]
    chat = http.post(
        "/v1/chat/completions", json={**GOOD, "messages": messages, "prompt_logprobs": 2}
    ).json()
    scored = http.post(
        "/v1/completions",
        json={"model": MODEL, "prompt": ids, "max_tokens": 1, "prompt_logprobs": 2},
    ).json()
    got = chat["prompt_logprobs"]
    assert len(got) == len(ids) == chat["usage"]["prompt_tokens"] and got[0] is None
    assert all(str(token) in entry for token, entry in zip(ids[1:], got[1:]))
    assert got == scored["choices"][0]["prompt_logprobs"]
    assert "prompt_logprobs" not in http.post("/v1/chat/completions", json=GOOD).json()
    refused = http.post("/v1/chat/completions", json={**GOOD, "prompt_logprobs": 1, "stream": True})
    assert refused.status_code == 400 and refused.json()["error"]["param"] == "prompt_logprobs"


def test_logprobs_format(client):
    r = chat(client, temperature=0, max_tokens=5, logprobs=True, top_logprobs=3, ignore_eos=True)
    content = r.choices[0].logprobs.content
    assert len(content) == 5
    for entry in content:
        assert entry.logprob <= 0
        # part of a character: "\ufffd", with the bytes it stands for (the test above)
        assert entry.bytes == list(entry.token.encode()) or entry.token == "\ufffd"
        assert len(entry.top_logprobs) == 3
        # greedy: the chosen token is the most likely one
        assert entry.top_logprobs[0].logprob == pytest.approx(entry.logprob)
        assert [t.logprob for t in entry.top_logprobs] == sorted(
            [t.logprob for t in entry.top_logprobs], reverse=True
        )


def test_logprobs_bytes_of_a_token_that_splits_a_character(client, tiny_models):
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    lead = tokenizer.convert_tokens_to_ids("ð")  # byte-level BPE's piece for the byte 0xF0
    assert tokenizer.decode([lead]) == "\ufffd"  # the first byte of a 4-byte character
    r = chat(client, max_tokens=1, logprobs=True, logit_bias={str(lead): 100})
    entry = r.choices[0].logprobs.content[0]
    assert (entry.token, entry.bytes) == ("\ufffd", [0xF0])


def test_text_parts_and_developer_role(client):
    messages = [
        {"role": "developer", "content": "Answer."},
        {
            "role": "user",
            "content": [{"type": "text", "text": "Hello"}, {"type": "text", "text": "there"}],
        },
    ]
    r = chat(client, messages=messages, max_tokens=4)
    assert r.choices[0].message.content is not None


# -- streaming --------------------------------------------------------------------------------


def test_stream_matches_non_stream(client):
    kwargs = dict(n=2, seed=7, temperature=1.0, max_tokens=20, ignore_eos=True)
    whole = chat(client, **kwargs)
    stream = chat(client, stream=True, stream_options={"include_usage": True}, **kwargs)
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    texts, roles, finishes = ["", ""], [[], []], [[], []]
    for c in chunks[:-1]:
        assert c.usage is None and c.object == "chat.completion.chunk"
        (choice,) = c.choices
        texts[choice.index] += choice.delta.content or ""
        roles[choice.index].append(choice.delta.role)
        finishes[choice.index].append(choice.finish_reason)
    for i in range(2):
        assert roles[i][0] == "assistant" and set(roles[i][1:]) <= {None}
        assert [f for f in finishes[i] if f] == ["length"]  # exactly one finish chunk
        assert texts[i] == whole.choices[i].message.content
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens == 40


def test_stream_raw_events_end_with_done(http):
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 5,
        "stream": True,
    }
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = sse_events(r)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c for c in chunks)  # without include_usage
    assert sum(c["choices"][0]["finish_reason"] is not None for c in chunks) == 1


def test_many_concurrent_streams_complete(server):
    async def one(client: httpx.AsyncClient, i: int) -> tuple[int, int]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"story number {i}"}],
            "max_tokens": 16,
            "ignore_eos": True,
            "stream": True,
            "stream_options": {"include_usage": True},
        }
        async with client.stream("POST", "/v1/chat/completions", json=body) as r:
            events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
        assert events[-1] == "data: [DONE]"
        usage = json.loads(events[-2][6:])["usage"]
        return usage["completion_tokens"], r.status_code

    async def run() -> list:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            return await asyncio.gather(*(one(c, i) for i in range(64)))

    assert asyncio.run(run()) == [(16, 200)] * 64


def test_disconnects_free_every_block(server, client):
    before = chat(client, temperature=0, max_tokens=12, ignore_eos=True).choices[0].message.content

    async def disconnect(c: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": f"long story {i}"}],
            "max_tokens": 400,
            "ignore_eos": True,
            "stream": True,
        }
        async with c.stream("POST", "/v1/chat/completions", json=body) as r:
            async for line in r.aiter_lines():
                if line.startswith("data: "):
                    break  # hang up after the first event

    async def run() -> None:
        headers = {"Authorization": f"Bearer {KEY}"}
        async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120) as c:
            for start in range(0, 200, 50):
                await asyncio.gather(*(disconnect(c, i) for i in range(start, start + 50)))

    asyncio.run(run())
    usage = None
    for _ in range(50):  # the engine hears of the aborts within a step or two
        usage = _gauge(httpx.get(f"{server.url}/metrics").text, "pagoda:kv_cache_usage_perc")
        running = _gauge(httpx.get(f"{server.url}/metrics").text, "pagoda:num_requests_running")
        if usage == 0.0 and running == 0.0:
            break
        asyncio.run(asyncio.sleep(0.2))
    assert usage == 0.0
    after = chat(client, temperature=0, max_tokens=12, ignore_eos=True).choices[0].message.content
    assert after == before


@pytest.mark.parametrize("endpoint", ["chat", "completions"])
def test_a_client_that_times_out_has_its_request_aborted(server, client, endpoint):
    """The SDK gives up on a slow JSON answer (its timeout) and retries it, twice by default:
    each attempt it left must be aborted in the engine, not generated to its end for nobody
    while the retries pile up beside it."""
    impatient = client.with_options(timeout=1.0, max_retries=2)
    long = {"max_tokens": 400, "extra_body": {"ignore_eos": True}}
    finished = _finished_choices(server)
    with engines_stopped([server.engine_pid()]), pytest.raises(openai.APITimeoutError):
        if endpoint == "chat":
            chat(impatient, **long)
        else:
            impatient.completions.create(model=MODEL, prompt="Once", **long)
    # the engine reads its inbox in order: each attempt's add and abort, then this request
    chat(client, max_tokens=2)
    deadline = time.monotonic() + 60
    while server.running() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _finished_choices(server) == finished + 1  # the short request's only


def _finished_choices(server) -> float:
    """Choices generated to their end (an aborted one counts as finish_reason "abort")."""
    metrics = httpx.get(f"{server.url}/metrics").text.splitlines()
    return sum(
        float(line.split()[-1])
        for line in metrics
        if line.startswith("pagoda:requests_total{") and 'finish_reason="abort"' not in line
    )


def _gauge(metrics: str, name: str) -> float:
    line = next(line for line in metrics.splitlines() if line.startswith(name + "{"))
    return float(line.split()[-1])


# -- completions ------------------------------------------------------------------------------


def test_completions_prompt_forms(client):
    one = client.completions.create(model=MODEL, prompt="Hello there", max_tokens=4, temperature=0)
    assert one.object == "text_completion" and len(one.choices) == 1
    many = client.completions.create(
        model=MODEL, prompt=["Hello there", "Good day"], max_tokens=4, n=2
    )
    assert [c.index for c in many.choices] == [0, 1, 2, 3]
    ids = client.completions.create(model=MODEL, prompt=[5, 6, 7, 8], max_tokens=3)
    assert ids.usage.prompt_tokens == 4
    lists = client.completions.create(model=MODEL, prompt=[[5, 6], [7, 8, 9]], max_tokens=3)
    assert lists.usage.prompt_tokens == 5 and len(lists.choices) == 2


def test_completions_echo_with_prompt_logprobs(client, tiny_models):
    prompt = "The quick brown fox"
    r = client.completions.create(
        model=MODEL, prompt=prompt, max_tokens=3, temperature=0, echo=True, logprobs=2
    )
    choice = r.choices[0]
    assert choice.text.startswith(prompt)
    lp = choice.logprobs
    n_prompt = r.usage.prompt_tokens
    assert len(lp.tokens) == n_prompt + 3 and lp.token_logprobs[0] is None
    assert all(x is not None and x <= 0 for x in lp.token_logprobs[1:])
    # the top 2 and the chosen token, as OpenAI's legacy logprobs (up to logprobs + 1)
    assert lp.top_logprobs[0] is None and all(len(t) <= 3 for t in lp.top_logprobs[1:])
    for token, logprob, top in zip(lp.tokens[1:], lp.token_logprobs[1:], lp.top_logprobs[1:]):
        assert top[token] >= logprob and max(top.values()) >= logprob
    assert lp.text_offset == sorted(lp.text_offset)
    # the prompt logprobs are the model's: compare with the offline engine
    llm = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512)
    ids = llm.tokenizer.encode(prompt)
    out = llm.generate(
        {"prompt_token_ids": ids}, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=0)
    )[0]
    want = [None] + [entry[t].logprob for entry, t in zip(out.prompt_logprobs[1:], ids[1:])]
    assert lp.token_logprobs[:n_prompt] == pytest.approx(want, abs=1e-4)


def test_completions_prompt_logprobs(http):
    """vLLM's prompt_logprobs: per prompt token its entry and the top N, keyed by token id."""
    base = {"model": MODEL, "prompt": "The quick brown fox", "max_tokens": 1, "temperature": 0}
    echoed = http.post("/v1/completions", json={**base, "echo": True, "logprobs": 0}).json()
    r = http.post("/v1/completions", json={**base, "prompt_logprobs": 2})
    assert r.status_code == 200, r.text
    [choice] = r.json()["choices"]
    ids = http.post("/tokenize", json={"prompt": base["prompt"]}).json()["tokens"]
    entries = choice["prompt_logprobs"]
    assert len(entries) == len(ids) and entries[0] is None
    want = echoed["choices"][0]["logprobs"]["token_logprobs"][1 : len(ids)]
    assert [entry[str(t)]["logprob"] for t, entry in zip(ids[1:], entries[1:])] == want
    for entry in entries[1:]:
        ranks = sorted(e["rank"] for e in entry.values())
        assert ranks[:2] == [1, 2] and len(ranks) <= 3
        assert all(isinstance(e["decoded_token"], str) for e in entry.values())
    # not streamed (as vLLM); not given: not in the response
    r = http.post("/v1/completions", json={**base, "prompt_logprobs": 2, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt_logprobs"
    assert "prompt_logprobs" not in echoed["choices"][0]


def test_completions_text_offset_follows_the_tokens(client):
    args = {"model": MODEL, "prompt": "Once upon", "max_tokens": 24, "temperature": 0}
    free = client.completions.create(**args, logprobs=0).choices[0]
    # a stop string whose start matches part of the text and never completes: the text is
    # held back over those tokens, then released, and the offsets must not follow its lag
    held = free.text[4:12] + "\u2603"
    for stream in (False, True):
        r = client.completions.create(**args, logprobs=0, stop=[held], stream=stream)
        chunks = [c.choices[0] for c in r] if stream else r.choices
        text = "".join(c.text for c in chunks)
        tokens = [t for c in chunks for t in c.logprobs.tokens]
        offsets = [o for c in chunks for o in c.logprobs.text_offset]
        assert text == free.text and tokens == free.logprobs.tokens
        assert offsets == [sum(map(len, tokens[:i])) for i in range(len(tokens))]


def test_completions_scoring_with_max_tokens_zero(client):
    r = client.completions.create(
        model=MODEL, prompt="abc def", max_tokens=0, echo=True, logprobs=1
    )
    assert r.choices[0].text == "abc def" and r.choices[0].finish_reason == "length"
    assert len(r.choices[0].logprobs.tokens) == r.usage.prompt_tokens
    assert r.usage.completion_tokens == 0  # nothing was generated, so nothing is billed
    # scoring needs no room after the prompt: one of max_model_len (512) tokens fits
    full = client.completions.create(
        model=MODEL, prompt=[7] * 512, max_tokens=0, echo=True, logprobs=0
    )
    assert full.usage.prompt_tokens == 512 and full.usage.completion_tokens == 0
    assert len(full.choices[0].logprobs.token_logprobs) == 512
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=[7] * 513, max_tokens=0, echo=True)
    assert info.value.code == "context_length_exceeded" and info.value.param == "prompt"
    assert "(513 in the prompt, 0 tokens for the completion)" in info.value.message


def test_completions_stream(client):
    whole = client.completions.create(model=MODEL, prompt="Once", max_tokens=10, temperature=0)
    parts = client.completions.create(
        model=MODEL,
        prompt="Once",
        max_tokens=10,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(parts)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


# -- auth and errors --------------------------------------------------------------------------


def test_auth(server):
    url = f"{server.url}/v1/models"
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {KEY}"}):
        r = httpx.get(url, headers=headers)
        assert r.status_code == 401
        assert r.headers["www-authenticate"].startswith("Bearer")
        assert r.json()["error"]["code"] == "invalid_api_key"
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert httpx.get(url, headers={"Authorization": f"Bearer {KEY}"}).status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=f"{server.url}/v1", api_key="nope", max_retries=0).models.list()


GOOD = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}

BAD_CHAT = [
    ({"messages": None}, "messages"),
    ({"messages": []}, "messages"),
    ({"messages": [{"role": "wizard", "content": "hi"}]}, "messages.0.role"),
    ({"temperature": 2.5}, "temperature"),
    ({"temperature": -0.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"top_p": 1.5}, "top_p"),
    ({"n": 0}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"stop": ["a"] * 33}, "stop"),  # OpenAI takes 4, lm-eval sends more: 32 here
    ({"logprobs": True, "top_logprobs": 21}, "top_logprobs"),
    ({"top_logprobs": 2}, "top_logprobs"),
    ({"presence_penalty": 3}, "presence_penalty"),
    ({"logit_bias": {"5": 1, "100000": 5}}, "logit_bias"),  # outside the vocabulary
    ({"allowed_token_ids": [5, 100000]}, "allowed_token_ids"),
    ({"allowed_token_ids": []}, "allowed_token_ids"),
    ({"bad_words": ["fine", "  "]}, "bad_words"),
]


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(("change", "param"), BAD_CHAT)
def test_bad_chat_requests(http, change, param, stream):
    body = {**GOOD, **change, "stream": stream}
    if change.get("messages", []) is None:
        del body["messages"]
    r = http.post("/v1/chat/completions", json=body)
    assert r.status_code == 400
    assert r.headers["content-type"].startswith("application/json")  # even with stream: true
    error = r.json()["error"]
    assert error["param"] == param and error["type"] == "invalid_request_error"
    assert isinstance(error["message"], str) and error["message"]


def test_invalid_json_and_content_type(http):
    r = http.post(
        "/v1/chat/completions", content=b"{not json", headers={"content-type": "application/json"}
    )
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = http.post(
        "/v1/chat/completions", content=json.dumps(GOOD), headers={"content-type": "text/plain"}
    )
    assert r.status_code == 400 and "Content-Type" in r.json()["error"]["message"]
    # none at all (`requests.post(url, data=json.dumps(body))`): read as JSON, as vLLM does
    r = http.post("/v1/chat/completions", content=json.dumps(GOOD).encode())
    assert "content-type" not in r.request.headers and r.status_code == 200, r.text


def test_unknown_model_and_route(http):
    r = http.post("/v1/chat/completions", json={**GOOD, "model": "no/such-model"})
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.get("/v1/models/no%2Fsuch-model")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"
    r = http.get("/v1/nothing-here")
    assert r.status_code == 404 and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.get("/v1/chat/completions")
    assert r.status_code == 405 and "error" in r.json()


def test_context_length_exceeded(http):
    long = {"role": "user", "content": "word " * 600}
    r = http.post("/v1/chat/completions", json={**GOOD, "messages": [long]})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/chat/completions", json={**GOOD, "max_tokens": 500})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": [5] * 600, "stream": True})
    assert r.status_code == 400 and r.json()["error"]["code"] == "context_length_exceeded"


def test_body_too_large(http):
    huge = {**GOOD, "messages": [{"role": "user", "content": "x" * (2 << 20)}]}
    r = http.post("/v1/chat/completions", json=huge)
    assert r.status_code == 413 and r.json()["error"]["message"]


def test_bad_completion_inputs(http):
    base = {"model": MODEL, "prompt": "hi", "max_tokens": 2}
    for change, param in [
        ({"prompt": []}, "prompt"),
        ({"prompt": [[]]}, "prompt"),
        ({"prompt": [5, 100000]}, "prompt"),
        ({"suffix": "x"}, "suffix"),
        ({"logprobs": 21}, "logprobs"),
        ({"logit_bias": {"100000": 5}}, "logit_bias"),
    ]:
        r = http.post("/v1/completions", json={**base, **change})
        assert r.status_code == 400, (change, r.text)
        assert r.json()["error"]["param"] == param
    # a batch (lm-eval sends several prompts a request): the message names the prompt at fault
    for prompts, message in [
        ([[5, 6], [5, 100000]], "prompt 1 of 2: token ids must be in [0, "),
        (["hi", ""], "prompt 1 of 2: the prompt is empty"),
        ([[5], [5] * 600, [6]], "prompt 1 of 3: This model's maximum context length is 512"),
    ]:
        r = http.post("/v1/completions", json={**base, "prompt": prompts})
        assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text
        assert r.json()["error"]["message"].startswith(message), r.text


def test_chat_template_options(http, tiny_models):
    """vLLM's chat_template_kwargs (Qwen3's enable_thinking), continue_final_message (an
    assistant prefill) and add_generation_prompt, on chat and /tokenize, as transformers
    renders them."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_models["llama"])
    user = [{"role": "user", "content": "Tell me a story"}]
    prefill = [*user, {"role": "assistant", "content": "Once upon a"}]
    for messages, options in [
        (user, {"chat_template_kwargs": {"enable_thinking": False}}),
        (user, {"add_generation_prompt": False}),
        (prefill, {"add_generation_prompt": False, "continue_final_message": True}),
    ]:
        variables = options.get("chat_template_kwargs", {})
        flags = {"add_generation_prompt": True}  # the server's default, not transformers'
        flags.update((k, v) for k, v in options.items() if k != "chat_template_kwargs")
        expected = tokenizer.apply_chat_template(messages, **variables, **flags, return_dict=False)
        body = {"messages": messages, **options}
        assert http.post("/tokenize", json=body).json()["tokens"] == expected
        r = http.post("/v1/chat/completions", json={**GOOD, **body})
        assert r.json()["usage"]["prompt_tokens"] == len(expected), r.text
    plain = http.post("/tokenize", json={"messages": user}).json()["count"]
    thinking_off = tokenizer.apply_chat_template(
        user, add_generation_prompt=True, enable_thinking=False, return_dict=False
    )
    assert plain + 4 <= len(thinking_off)  # the variable did change the prompt
    for options, message in [
        ({"continue_final_message": True}, "add_generation_prompt"),
        ({"continue_final_message": True, "add_generation_prompt": False}, "the assistant's"),
        ({"chat_template_kwargs": {"tokenize": True}}, "tokenize"),
        ({"chat_template_kwargs": ["x"]}, "dictionary"),
    ]:
        for path in ("/v1/chat/completions", "/tokenize"):
            r = http.post(path, json={**GOOD, **options})
            assert r.status_code == 400, (options, r.text)
            error = r.json()["error"]
            assert error["param"] == next(iter(options)) and message in error["message"]


def test_tokenize_and_detokenize(server, http, tiny_models):
    llm_tokenizer = LLM(str(tiny_models["llama"]), dtype="float32", max_model_len=512).tokenizer
    r = http.post("/tokenize", json={"model": MODEL, "prompt": "Hello there"})
    assert r.status_code == 200
    body = r.json()
    assert body["tokens"] == llm_tokenizer.encode("Hello there")
    assert body["count"] == len(body["tokens"]) and body["max_model_len"] == 512
    chat_ids = http.post(
        "/tokenize", json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]}
    ).json()["tokens"]
    assert len(chat_ids) > 2
    back = http.post("/detokenize", json={"model": MODEL, "tokens": body["tokens"]})
    assert back.json() == {"prompt": llm_tokenizer.decode(body["tokens"])}
    assert http.post("/tokenize", json={"model": MODEL}).status_code == 400
    bad = http.post("/detokenize", json={"model": MODEL, "tokens": [10**7]})
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "tokens"
    anonymous = httpx.post(f"{server.url}/tokenize", json={"model": MODEL, "prompt": "x"})
    assert anonymous.status_code == 401
    # as vLLM: the pieces on request, tools in the chat prompt, and "" round-trips
    strs = http.post("/tokenize", json={"prompt": "Hello there", "return_token_strs": True})
    assert strs.json()["token_strs"] == llm_tokenizer.convert_ids_to_tokens(body["tokens"])
    assert "token_strs" not in body
    messages = [{"role": "user", "content": "What time is it?"}]
    tool = {"type": "function", "function": {"name": "clock", "parameters": {}}}
    with_tools = http.post("/tokenize", json={"messages": messages, "tools": [tool]}).json()
    chat = http.post("/v1/chat/completions", json={**GOOD, "messages": messages, "tools": [tool]})
    assert with_tools["count"] == chat.json()["usage"]["prompt_tokens"] > len(chat_ids) + 10
    assert http.post("/tokenize", json={"prompt": "x", "tools": [tool]}).status_code == 400
    empty = http.post("/tokenize", json={"prompt": ""}).json()["tokens"]
    assert http.post("/detokenize", json={"tokens": empty}).json() == {"prompt": ""}


def test_every_response_carries_an_x_request_id(server, client):
    """As OpenAI's responses do (the SDK keeps it as `_request_id`); a client's own usable
    X-Request-Id comes back. Before: no such header."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=2
    )
    first = raw.headers["x-request-id"]
    assert re.fullmatch(r"req_[0-9a-f]{32}", first)
    assert raw.parse()._request_id == first
    again = client.models.with_raw_response.list().headers["x-request-id"]
    assert again != first
    traced = {"X-Request-Id": "gateway-trace-42"}
    keyed = {**traced, "Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, timeout=60) as plain:
        body = {"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}
        answers = [
            plain.post("/v1/completions", json=body, headers=keyed),
            plain.post("/v1/completions", json=body, headers=traced),  # 401
            plain.get("/v1/models/no-such-model", headers=keyed),
            plain.get("/health", headers=traced),
        ]
        assert [a.status_code for a in answers] == [200, 401, 404, 200]
        assert {a.headers["x-request-id"] for a in answers} == {"gateway-trace-42"}
        for unusable in ("has space", "x" * 129):
            answer = plain.get("/health", headers={"X-Request-Id": unusable})
            assert re.fullmatch(r"req_[0-9a-f]{32}", answer.headers["x-request-id"])


def test_a_streamed_text_with_unicode_line_separators_keeps_each_event_on_one_line(http):
    """JSON leaves U+0085, U+2028 and U+2029 raw, and SSE does not end a line at them, but
    str.splitlines does, and with it httpx's iter_lines, what many clients read a stream with
    (a sampled token's text can hold one: seen under load at temperature 1). The events escape
    them. Before: the echo's event came cut in two at each, and its first part was no JSON."""
    prompt = "a\u2028b\u2029c\x85d"
    body = {"model": MODEL, "prompt": prompt, "echo": True, "max_tokens": 2, "stream": True}
    with http.stream("POST", "/v1/completions", json=body) as response:
        assert response.status_code == 200
        events = sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert chunks[0]["choices"][0]["text"].startswith(prompt)


def test_continuous_usage_stats_put_the_usage_so_far_in_every_chunk(http):
    """vLLM's stream_options.continuous_usage_stats (with include_usage, as vLLM). Before: an
    unrecognized field, and only the last chunk had usage."""
    for path, body in (
        ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("/v1/completions", {"prompt": "hi", "n": 2}),
    ):
        body = {"model": MODEL, "max_tokens": 6, "stream": True, "ignore_eos": True, **body}
        options = {"include_usage": True, "continuous_usage_stats": True}
        with http.stream("POST", path, json={**body, "stream_options": options}) as response:
            assert response.status_code == 200
            events = [json.loads(line[6:]) for line in response.iter_lines() if line[6:7] == "{"]
        usages = [event["usage"] for event in events]
        counts = [u["completion_tokens"] for u in usages]
        assert counts == sorted(counts) and counts[0] >= 1 and counts[-1] == 6 * body.get("n", 1)
        assert {u["prompt_tokens"] for u in usages} == {usages[-1]["prompt_tokens"]}
        assert events[-1]["choices"] == []
        alone = {"continuous_usage_stats": True}  # without include_usage: no usage
        with http.stream("POST", path, json={**body, "stream_options": alone}) as response:
            events = [json.loads(line[6:]) for line in response.iter_lines() if line[6:7] == "{"]
        assert all("usage" not in event for event in events)
