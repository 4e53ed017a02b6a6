"""The Starlette application: routes, keys (server/keys/), body limits and the OpenAI error
shape."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any, Protocol

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from pagoda.server import defaults, request_ids
from pagoda.server.chat import chat_completion, chat_prompt
from pagoda.server.completions import completion
from pagoda.server.disconnect import unless_disconnected
from pagoda.server.embeddings import EmbeddingRequest, create_embeddings
from pagoda.server.errors import APIError, invalid
from pagoda.server.generation import event_stream
from pagoda.server.image_request import ImageGenerationRequest
from pagoda.server.image_store import URL_PATH, ImageStore
from pagoda.server.images import (
    UNSERVED_PATHS,
    generate_images,
    image_file,
    unserved_image_endpoint,
)
from pagoda.server.keys.admin import admin_routes
from pagoda.server.keys.gateway import Gateway, KeyAuth
from pagoda.server.keys.meter import request_meter
from pagoda.server.lora_routes import lora_routes
from pagoda.server.metrics import Metrics
from pagoda.server.model_slots import GiveBackSlots, ModelSlots
from pagoda.server.openapi import openapi_json
from pagoda.server.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    TokenizeRequest,
    parse_body,
    parse_query,
)
from pagoda.server.rerank import (
    RERANK_PATHS,
    SCORE_PATHS,
    RerankRequest,
    ScoreRequest,
    create_rerank,
    create_score,
)
from pagoda.server.response_store import (
    InputItemsQuery,
    ResponseStore,
    RetrieveQuery,
    StoredResponse,
    owner_of,
)
from pagoda.server.responses import create_response
from pagoda.server.responses_request import ResponsesRequest
from pagoda.server.tokenizer_info import tokenizer_info
from pagoda.server.tools import plan_tools
from pagoda.server.worker_client import RequestRejected, WorkerDeadError

logger = logging.getLogger(__name__)
# what each kind of catalog entry serves, for the error that sends a client to the right one
ENDPOINTS = {
    "chat": "/v1/chat/completions, /v1/completions and /v1/responses",
    "embedding": "/v1/embeddings",
    "rerank": "/v1/rerank and /v1/score",
    "image": "/v1/images/generations",
}


class Served(Protocol):
    """A served model of any kind (chat: generation.ServedModel) and its worker process."""

    id: str
    kind: str
    client: Any  # a WorkerClient
    created: int
    owned_by: str
    max_model_len: int


def build_app(
    models: dict[str, Served],
    metrics: Metrics,
    *,
    api_keys: list[str] = (),
    gateway: Gateway | None = None,
    max_body_bytes: int = defaults.MAX_BODY_BYTES,
    body_timeout_s: float = defaults.BODY_TIMEOUT_S,
    max_concurrent_requests: int | None = None,
    on_shutdown=None,
    image_store: ImageStore | None = None,
    public_url: str | None = None,
    response_store: ResponseStore | None = None,
) -> Starlette:
    gateway = gateway or Gateway(api_keys)  # static keys only, as without a database
    # LoRA adapters: models of their own, served by their parent's engine
    adapters = {a.id: a for m in models.values() if m.kind == "chat" for a in m.adapters}
    named = {**models, **adapters}  # every id a request may name
    slots = ModelSlots(max_concurrent_requests)
    responses_kept = response_store if response_store is not None else ResponseStore()

    async def read_body(request: Request) -> bytes:
        content_type = request.headers.get("content-type")
        # none at all is read as JSON (as vLLM does): plain HTTP clients often send none
        if content_type and content_type.split(";")[0].strip().lower() != "application/json":
            raise invalid(f"Content-Type must be application/json, got {content_type!r}")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            raise _too_large(max_body_bytes)
        body = bytearray()
        try:
            async with asyncio.timeout(body_timeout_s):
                async for part in request.stream():
                    body += part
                    if len(body) > max_body_bytes:
                        raise _too_large(max_body_bytes)
        except TimeoutError:
            message = f"The request body did not arrive within {body_timeout_s:g} s."
            raise APIError(408, message, headers={"Connection": "close"}) from None
        return bytes(body)

    def served(request: Request, model_id: str, kind: str = "chat") -> Any:
        meter = request_meter(request)
        model = named.get(model_id)
        if model is None or not meter.allows(model_id):
            raise APIError(
                404,
                f"The model '{model_id}' does not exist or is not served here.",
                param="model",
                code="model_not_found",
            )
        if model.kind != kind:
            raise invalid(
                f"'{model_id}' is {'an' if model.kind[0] in 'aeiou' else 'a'} {model.kind} model: "
                f"it serves {ENDPOINTS[model.kind]}, not {ENDPOINTS[kind]}.",
                param="model",
            )
        if not model.client.healthy:
            why = f" ({model.client.reason})" if model.client.reason else ""
            # a model being restarted is worth a retry (the SDK waits Retry-After); one given
            # up on is not (the SDK would retry it twice for the same answer)
            given_up = model.client.state == "failed"
            raise APIError(
                503,
                f"The engine serving '{model_id}' is not running{why}.",
                headers={"x-should-retry": "false"} if given_up else {"Retry-After": "5"},
            )
        slots.take(request.scope, adapters[model_id].parent if model_id in adapters else model_id)
        return model

    async def chat(request: Request) -> Response:
        req = parse_body(ChatCompletionRequest, await read_body(request))
        meter = request_meter(request)
        work = chat_completion(served(request, req.model), req, metrics, meter)
        return await unless_disconnected(request, work)

    async def completions(request: Request) -> Response:
        req = parse_body(CompletionRequest, await read_body(request))
        meter = request_meter(request)
        work = completion(served(request, req.model), req, metrics, meter)
        return await unless_disconnected(request, work)

    async def responses(request: Request) -> Response:
        req = parse_body(ResponsesRequest, await read_body(request))
        meter = request_meter(request)
        model = served(request, req.model)
        work = create_response(model, req, metrics, meter, responses_kept)
        return await unless_disconnected(request, work)

    def kept_response(request: Request) -> StoredResponse:
        owner = owner_of(request_meter(request))
        return responses_kept.get(request.path_params["response_id"], owner)

    async def stored_response(request: Request) -> Response:
        """GET a stored response (or a background one's events), or DELETE it (one route: a
        405 lists both methods)."""
        stored = kept_response(request)
        response_id = stored.body["id"]
        if request.method == "DELETE":
            if stored.run is not None:
                await stored.run.cancel()
            responses_kept.delete(response_id, stored.owner)
            return JSONResponse({"id": response_id, "object": "response.deleted", "deleted": True})
        query = parse_query(RetrieveQuery, request.query_params)
        if not query.stream:
            return JSONResponse(stored.body)
        if stored.run is None:
            raise invalid(
                "stream: only a background response's events are kept to be streamed again",
                param="stream",
            )
        return event_stream(stored.run.follow(query.starting_after), request_meter(request))

    async def response_input_items(request: Request) -> Response:
        query = parse_query(InputItemsQuery, request.query_params)
        return JSONResponse(kept_response(request).input_page(query))

    async def cancel_response(request: Request) -> Response:
        stored = kept_response(request)
        status = stored.body["status"]
        if stored.run is None:
            raise invalid("Only a background response can be cancelled.")
        if status not in ("queued", "in_progress", "cancelled"):
            raise invalid(f"The response is {status}: it can no longer be cancelled.")
        await stored.run.cancel()
        return JSONResponse(stored.body)

    def first_model(request: Request, kind: str = "chat") -> str:
        """The model a request without `model` gets (vLLM serves one; here the first that the
        request's key may use: a key limited to some models never hears of the others)."""
        meter = request_meter(request)
        return next((m.id for m in named.values() if m.kind == kind and meter.allows(m.id)), "")

    async def images(request: Request) -> Response:
        req = parse_body(ImageGenerationRequest, await read_body(request))
        meter = request_meter(request)
        model = served(request, req.model or first_model(request, "image"), "image")
        meter.admit(model.id, images=req.n)
        return await generate_images(model, req, request, metrics.images, store, public_url, meter)

    async def image_files(request: Request) -> Response:
        return await image_file(request, store)

    async def embeddings(request: Request) -> Response:
        req = parse_body(EmbeddingRequest, await read_body(request))
        meter = request_meter(request)
        model = served(request, req.model, "embedding")
        return await create_embeddings(model, req, request, metrics.embeddings, meter)

    async def rerank(request: Request) -> Response:
        req = parse_body(RerankRequest, await read_body(request))
        meter = request_meter(request)
        model = served(request, req.model, "rerank")
        return await create_rerank(model, req, request, metrics.embeddings, meter)

    async def score(request: Request) -> Response:
        req = parse_body(ScoreRequest, await read_body(request))
        meter = request_meter(request)
        model = served(request, req.model, "rerank")
        return await create_score(model, req, request, metrics.embeddings, meter)

    def tokenizer_of(request: Request, model_id: str | None) -> Any:
        """The model whose tokenizer /tokenize, /detokenize and /tokenizer_info use. A key's
        models apply, and its rpm and max_concurrent count the request as any other; it
        generates nothing, so it costs nothing and takes no tokens from the tpm."""
        model = served(request, model_id or first_model(request))
        request_meter(request).admit(model.id)
        return model

    async def tokenize(request: Request) -> Response:
        req = parse_body(TokenizeRequest, await read_body(request))
        model = tokenizer_of(request, req.model)
        if req.messages is not None:
            tools = plan_tools(req, model.tool_call_parser, model.supports_tools)
            ids = await model.tokenizing.run(chat_prompt, model, req, tools)
        else:
            special = req.add_special_tokens
            ids = await model.tokenizing.run(
                model.tokenizer.encode, req.prompt, add_special_tokens=special
            )
        body = {"count": len(ids), "max_model_len": model.max_model_len, "tokens": ids}
        if req.return_token_strs:
            body["token_strs"] = model.tokenizer.convert_ids_to_tokens(ids)
        return JSONResponse(body)

    async def detokenize(request: Request) -> Response:
        req = parse_body(DetokenizeRequest, await read_body(request))
        model = tokenizer_of(request, req.model)
        if req.tokens:  # none is the empty text, as /tokenize gives for it
            model.check_prompt(req.tokens, param="tokens")
        return JSONResponse({"prompt": model.tokenizer.decode(req.tokens)})

    async def list_models(request: Request) -> Response:
        meter = request_meter(request)
        cards = [_model_card(m) for m in named.values() if meter.allows(m.id)]
        return JSONResponse({"object": "list", "data": cards})

    async def get_model(request: Request) -> Response:
        model_id = request.path_params["model_id"]
        if model_id not in named or not request_meter(request).allows(model_id):
            raise _unknown_model(model_id)
        return JSONResponse(_model_card(named[model_id]))

    async def get_tokenizer_info(request: Request) -> Response:
        model = tokenizer_of(request, request.query_params.get("model"))
        return JSONResponse(tokenizer_info(model.tokenizer, model.max_model_len))

    async def health(request: Request) -> Response:
        """200 while any model serves (a balancer keeps sending the models that work),
        503 when none does; ?model= asks about one (docs/reliability.md)."""
        states = {m.id: m.client.health() for m in models.values()}
        model_id = request.query_params.get("model")
        if model_id in adapters:  # its parent's engine serves it
            model_id = adapters[model_id].parent
        if model_id is not None:
            if model_id not in states:
                raise _unknown_model(model_id)
            ready = models[model_id].client.healthy
            return JSONResponse(states[model_id], status_code=200 if ready else 503)
        ready = sum(m.client.healthy for m in models.values())
        status = "ok" if ready == len(models) else "degraded" if ready else "unhealthy"
        body = {"status": status, "models": states}
        return JSONResponse(body, status_code=200 if ready else 503)

    async def metrics_endpoint(request: Request) -> Response:
        return Response(metrics.render(), media_type="text/plain; version=0.0.4")

    store = image_store
    if store is None and any(model.kind == "image" for model in models.values()):
        store = ImageStore()

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette):
        await gateway.start()
        yield
        if on_shutdown is not None:
            await on_shutdown()
        await gateway.close()  # the drained requests' usage rows

    app = Starlette(
        routes=[
            Route("/health", health, methods=["GET"]),
            Route("/metrics", metrics_endpoint, methods=["GET"]),
            Route("/openapi.json", openapi_json, methods=["GET"]),
            Route("/v1/models", list_models, methods=["GET"]),
            Route("/v1/models/{model_id:path}", get_model, methods=["GET"]),
            Route("/v1/chat/completions", chat, methods=["POST"]),
            Route("/v1/completions", completions, methods=["POST"]),
            Route("/v1/responses", responses, methods=["POST"]),
            Route("/v1/responses/{response_id}", stored_response, methods=["GET", "DELETE"]),
            Route("/v1/responses/{response_id}/input_items", response_input_items),
            Route("/v1/responses/{response_id}/cancel", cancel_response, methods=["POST"]),
            Route("/v1/images/generations", images, methods=["POST"]),
            Route(URL_PATH + "{name}", image_files, methods=["GET"]),
            *(Route(path, unserved_image_endpoint, methods=["POST"]) for path in UNSERVED_PATHS),
            Route("/v1/embeddings", embeddings, methods=["POST"]),
            *(Route(path, rerank, methods=["POST"]) for path in RERANK_PATHS),
            *(Route(path, score, methods=["POST"]) for path in SCORE_PATHS),
            Route("/tokenize", tokenize, methods=["POST"]),
            Route("/detokenize", detokenize, methods=["POST"]),
            Route("/tokenizer_info", get_tokenizer_info, methods=["GET"]),
            *lora_routes(models, adapters, named),
            *admin_routes(gateway),
        ],
        exception_handlers={
            APIError: lambda request, exc: exc.response(),
            HTTPException: _http_error,
            WorkerDeadError: lambda request, exc: APIError(503, str(exc)).response(),
            RequestRejected: lambda request, exc: invalid(str(exc), exc.param, exc.code).response(),
            Exception: _server_error,
        },
        lifespan=lifespan,
    )
    app.add_middleware(GiveBackSlots, slots=slots)
    app.add_middleware(KeyAuth, gateway=gateway)
    return app


def _too_large(limit: int) -> APIError:
    # the rest of the body is not read: the connection cannot carry another request
    message = f"The request body is larger than the limit of {limit} bytes."
    return APIError(413, message, headers={"Connection": "close"})


def _unknown_model(model_id: str) -> APIError:
    return APIError(
        404, f"The model '{model_id}' does not exist.", param="model", code="model_not_found"
    )


def _model_card(model: Served) -> dict:
    # root, parent and permission as vLLM's cards have them (`vllm bench serve` reads root); an
    # adapter's root is where it comes from, its parent the model it runs on
    parent = getattr(model, "parent", None)
    return {
        "id": model.id,
        "object": "model",
        "created": model.created,
        "owned_by": model.owned_by,
        "root": model.root if parent else model.id,
        "parent": parent,
        "max_model_len": model.max_model_len,
        "permission": [_permission(model)],
    }


def _permission(model: Served) -> dict:
    return {
        "id": f"modelperm-{model.id}",
        "object": "model_permission",
        "created": model.created,
        "allow_create_engine": False,
        "allow_sampling": True,
        "allow_logprobs": True,
        "allow_search_indices": False,
        "allow_view": True,
        "allow_fine_tuning": False,
        "organization": "*",
        "group": None,
        "is_blocking": False,
    }


async def _http_error(request: Request, exc: HTTPException) -> Response:
    message = {404: f"Unknown route {request.url.path}", 405: "Method not allowed"}.get(
        exc.status_code, str(exc.detail)
    )
    return APIError(exc.status_code, message, headers=exc.headers).response()  # 405: Allow


async def _server_error(request: Request, exc: Exception) -> Response:
    logger.exception(
        "unexpected error on %s (x-request-id %s)",
        request.url.path,
        request.scope.get(request_ids.SCOPE_KEY),
    )
    return APIError(500, "The server had an error while processing your request.").response()
