"""GET /openapi.json: an OpenAPI 3.1 document of every route, made from the pydantic models the
server parses requests with (server/protocol.py and friends) and those describing its
responses (server/api_models.py). Errors have OpenAI's shape on every route."""

from __future__ import annotations

from dataclasses import dataclass, field
from functools import cache
from typing import Any

from pydantic import BaseModel
from pydantic.json_schema import models_json_schema
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from pagoda import __version__
from pagoda.server import api_models as out
from pagoda.server.embeddings import EmbeddingRequest
from pagoda.server.image_request import ImageGenerationRequest
from pagoda.server.image_store import URL_PATH
from pagoda.server.keys.store import KeySpec, KeyUpdate
from pagoda.server.lora_routes import LoadLoraAdapterRequest, UnloadLoraAdapterRequest
from pagoda.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
)
from pagoda.server.rerank import RERANK_PATHS, SCORE_PATHS, RerankRequest, ScoreRequest
from pagoda.server.responses_request import ResponsesRequest

REF = "#/components/schemas/{model}"
ERROR_STATUSES = {
    400: "Invalid request (the `param` names the field at fault)",
    401: "Missing or unknown API key",
    403: "The key may not use this route",
    404: "Unknown model or route",
    408: "The request body did not arrive in time",
    413: "The request body is over the size limit",
    429: "A rate limit, or the model's queue, is full: see Retry-After",
    503: "The model's engine is down, or the server is draining",
}


@dataclass(frozen=True)
class Operation:
    method: str
    path: str
    summary: str
    response: type[BaseModel] | None  # None: not JSON (see `media`)
    request: type[BaseModel] | None = None
    stream: type[BaseModel] | None = None  # the events of a `stream: true` answer
    stream_end: str = ", then `data: [DONE]`"
    status: int = 200
    media: dict[str, Any] | None = None
    query: tuple[str, ...] = ()
    auth: bool = True
    errors: tuple[int, ...] = (400, 401, 404, 408, 413, 429, 503)
    body_on_error: tuple[int, ...] = ()  # error statuses that may carry `response` instead
    tags: tuple[str, ...] = field(default=("openai",))


ADMIN_ERRORS = (400, 401, 404, 503)
OPERATIONS = (
    Operation(
        "post",
        "/v1/chat/completions",
        "Create a chat completion",
        out.ChatCompletion,
        ChatCompletionRequest,
        stream=out.ChatCompletionChunk,
    ),
    Operation(
        "post",
        "/v1/completions",
        "Create a completion",
        out.Completion,
        CompletionRequest,
        stream=out.Completion,
    ),
    Operation(
        "post",
        "/v1/responses",
        "Create a response (OpenAI's Responses API)",
        out.ResponseObject,
        ResponsesRequest,
        stream=out.ResponseStreamEvent,
        stream_end=" named in `event:`; no `[DONE]` follows the last",
    ),
    Operation(
        "get",
        "/v1/responses/{response_id}",
        "Retrieve a stored response; with stream=true, a background response's events",
        out.ResponseObject,
        stream=out.ResponseStreamEvent,
        stream_end=" named in `event:`, those numbered above `starting_after`",
        query=("stream", "starting_after"),
        errors=(400, 401, 404),
    ),
    Operation(
        "get",
        "/v1/responses/{response_id}/input_items",
        "List a stored response's input items",
        out.InputItemList,
        query=("limit", "order", "after", "before"),
        errors=(400, 401, 404),
    ),
    Operation(
        "post",
        "/v1/responses/{response_id}/cancel",
        "Cancel a background response",
        out.ResponseObject,
        errors=(400, 401, 404),
    ),
    Operation(
        "delete",
        "/v1/responses/{response_id}",
        "Delete a stored response",
        out.ResponseDeleted,
        errors=(401, 404),
    ),
    Operation("post", "/v1/embeddings", "Create embeddings", out.EmbeddingList, EmbeddingRequest),
    *(
        Operation("post", path, "Rerank documents by a query", out.RerankResponse, RerankRequest)
        for path in RERANK_PATHS
    ),
    *(
        Operation("post", path, "Score text pairs", out.ScoreList, ScoreRequest)
        for path in SCORE_PATHS
    ),
    Operation(
        "post",
        "/v1/images/generations",
        "Generate images",
        out.ImagesResponse,
        ImageGenerationRequest,
        stream=out.ImageStreamEvent,
    ),
    Operation(
        "get",
        URL_PATH + "{name}",
        "An image generated with response_format url, until its URL expires",
        None,
        media={f"image/{kind}": {"schema": {}} for kind in ("png", "jpeg", "webp")},
        auth=False,
        errors=(404,),
    ),
    Operation("get", "/v1/models", "List the models", out.ModelList, errors=(401,)),
    Operation("get", "/v1/models/{model_id}", "Retrieve a model", out.ModelCard, errors=(401, 404)),
    Operation(
        "post", "/tokenize", "Tokenize a prompt or messages", out.TokenizeResponse, TokenizeRequest
    ),
    Operation(
        "post", "/detokenize", "Token ids to text", out.DetokenizeResponse, DetokenizeRequest
    ),
    Operation(
        "get",
        "/tokenizer_info",
        "The tokenizer's configuration",
        out.TokenizerInfo,
        query=("model",),
        errors=(400, 401, 404, 503),
    ),
    Operation(
        "post",
        "/v1/load_lora_adapter",
        "Load a LoRA adapter into a free slot (vLLM's; the static --api-key only)",
        None,
        LoadLoraAdapterRequest,
        media={"text/plain": {"schema": {"type": "string"}}},
        errors=(400, 401, 403, 413, 503),
        tags=("lora",),
    ),
    Operation(
        "post",
        "/v1/unload_lora_adapter",
        "Unload a LoRA adapter (vLLM's; the static --api-key only)",
        None,
        UnloadLoraAdapterRequest,
        media={"text/plain": {"schema": {"type": "string"}}},
        errors=(400, 401, 403, 404, 413, 503),
        tags=("lora",),
    ),
    Operation(
        "get",
        "/health",
        "Health: 200 while any model serves, 503 when none does or while draining",
        out.Health,
        query=("model",),
        auth=False,
        errors=(404, 503),
        body_on_error=(503,),
        tags=("operations",),
    ),
    Operation(
        "get",
        "/metrics",
        "Prometheus metrics",
        None,
        media={"text/plain": {"schema": {"type": "string"}}},
        auth=False,
        errors=(),
        tags=("operations",),
    ),
    Operation(
        "get",
        "/admin/keys",
        "List the API keys (admin key)",
        out.KeyList,
        errors=ADMIN_ERRORS,
        tags=("admin",),
    ),
    Operation(
        "post",
        "/admin/keys",
        "Create an API key (admin key)",
        out.CreatedKey,
        KeySpec,
        status=201,
        errors=(*ADMIN_ERRORS, 409),
        tags=("admin",),
    ),
    Operation(
        "patch",
        "/admin/keys/{name}",
        "Change an API key's limits (admin key): the fields given, null clears one",
        out.KeyRow,
        KeyUpdate,
        errors=(*ADMIN_ERRORS, 409),
        tags=("admin",),
    ),
    Operation(
        "delete",
        "/admin/keys/{name}",
        "Revoke an API key (admin key)",
        out.KeyRow,
        errors=(*ADMIN_ERRORS, 409),
        tags=("admin",),
    ),
    Operation(
        "get",
        "/admin/usage",
        "Usage per key and model (admin key)",
        out.UsageList,
        query=("key", "since"),
        errors=ADMIN_ERRORS,
        tags=("admin",),
    ),
)


@cache
def openapi_document() -> dict[str, Any]:
    requests = {op.request for op in OPERATIONS if op.request is not None}
    responses = {m for op in OPERATIONS for m in (op.response, op.stream) if m is not None}
    responses.add(out.ErrorResponse)
    keyed = [(m, "validation") for m in requests] + [(m, "serialization") for m in responses]
    refs, defs = models_json_schema(sorted(keyed, key=lambda k: k[0].__name__), ref_template=REF)
    error_ref = refs[(out.ErrorResponse, "serialization")]
    paths: dict[str, dict] = {}
    for op in OPERATIONS:
        paths.setdefault(op.path, {})[op.method] = _operation(op, refs, error_ref)
    return {
        "openapi": "3.1.0",
        "info": {"title": "pagoda", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": defs["$defs"],
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
    }


def _operation(op: Operation, refs: dict, error_ref: dict) -> dict[str, Any]:
    if op.response is not None:
        content = {"application/json": {"schema": refs[(op.response, "serialization")]}}
    else:
        content = dict(op.media or {})
    if op.stream is not None:
        events = f"`data: <JSON>` events, each a {op.stream.__name__}{op.stream_end}"
        content["text/event-stream"] = {
            "schema": {"type": "string", "description": f"with `stream: true`: {events}"}
        }
    responses: dict[str, Any] = {str(op.status): {"description": "OK", "content": content}}
    for status in op.errors:
        responses[str(status)] = {
            "description": ERROR_STATUSES.get(status, "Conflict: the key exists, or is revoked"),
            "content": {"application/json": {"schema": error_ref}},
        }
        if status in op.body_on_error:
            schema = {"anyOf": [refs[(op.response, "serialization")], error_ref]}
            responses[str(status)]["content"]["application/json"]["schema"] = schema
    operation: dict[str, Any] = {
        "summary": op.summary,
        "operationId": f"{op.method}_{op.path.strip('/').replace('/', '_').strip('{}')}",
        "tags": list(op.tags),
        "responses": responses,
    }
    params = [_path_param(name) for name in _path_names(op.path)]
    params += [
        {"name": name, "in": "query", "required": False, "schema": {"type": "string"}}
        for name in op.query
    ]
    if params:
        operation["parameters"] = params
    if op.request is not None:
        operation["requestBody"] = {
            "required": True,
            "content": {"application/json": {"schema": refs[(op.request, "validation")]}},
        }
    operation["security"] = [{"bearer": []}] if op.auth else []
    return operation


def _path_names(path: str) -> list[str]:
    return [part[1:-1] for part in path.split("/") if part.startswith("{")]


def _path_param(name: str) -> dict[str, Any]:
    return {"name": name, "in": "path", "required": True, "schema": {"type": "string"}}


async def openapi_json(request: Request) -> Response:
    return JSONResponse(openapi_document())
