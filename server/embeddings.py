"""POST /v1/embeddings: the request, its checks, and the OpenAI response (float or base64)."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from dataclasses import dataclass, field
from typing import Annotated, Any, ClassVar, Literal

import numpy as np
import pybase64
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.engine.embedding_inputs import EmbeddingInputs
from pagoda.engine.embedding_worker import EmbeddingConfig
from pagoda.engine.worker import Rejected
from pagoda.logs import at_revision
from pagoda.server.catalog import (
    CatalogEntry,
    EmbeddingSettings,
    resolve_revision,
    resolve_source,
)
from pagoda.server.disconnect import CLIENT_CLOSED, unless_disconnected
from pagoda.server.embedding_client import EmbeddingClient, Embeddings
from pagoda.server.embedding_metrics import EmbeddingMetrics
from pagoda.server.errors import APIError, invalid
from pagoda.server.keys.meter import Meter
from pagoda.server.overload import queue_full
from pagoda.server.protocol import check_prompt_shape
from pagoda.server.tokenizer_thread import TokenizerThread
from pagoda.server.worker_client import RequestRejected

logger = logging.getLogger(__name__)
MAX_INPUTS = 2048  # OpenAI's limit of inputs per request


def _check_input(value: Any) -> Any:
    check_prompt_shape(value, name="input")
    if value == "":
        raise ValueError("must not be an empty string")
    if isinstance(value, list) and len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} inputs are allowed per request, got {len(value)}")
    if isinstance(value, list) and isinstance(value[0], str):
        empty = next((i for i, item in enumerate(value) if not item), None)
        if empty is not None:
            raise ValueError(f"input {empty} is an empty string")
    return value


def _no_zero_tokens(value: int) -> int:
    if value == 0:
        raise ValueError("must be -1 (the model's limit) or a positive number of tokens")
    return value


# vLLM's extension: cut inputs (a cross-encoder's pairs) to this many tokens (-1: the model's
# limit) instead of refusing (or cutting to the limit) those over it
TruncatePromptTokens = Annotated[int, Field(ge=-1), AfterValidator(_no_zero_tokens)]


class EmbeddingRequest(BaseModel):
    # null is taken as "not given" throughout: many clients send every field
    model_config = ConfigDict(extra="ignore")

    model: str
    input: str | list[str] | list[int] | list[list[int]]
    encoding_format: Literal["float", "base64"] | None = None
    dimensions: int | None = Field(None, ge=1)
    user: str | None = None
    truncate_prompt_tokens: TruncatePromptTokens | None = None

    @field_validator("input", mode="before")
    @classmethod
    def _input(cls, value: Any) -> Any:
        return _check_input(value)

    def inputs(self) -> list[str] | list[list[int]]:
        if isinstance(self.input, str):
            return [self.input]
        if all(isinstance(item, int) for item in self.input):
            return [self.input]
        return self.input


@dataclass
class ServedEmbeddingModel:
    """An embedding model the server exposes: its worker process and its catalog settings."""

    id: str
    client: EmbeddingClient
    max_queued_requests: int
    matryoshka: bool = False
    matryoshka_dimensions: list[int] | None = None
    inputs: EmbeddingInputs | None = None  # the worker's tokenizer and limits, loaded here
    tokenizing: TokenizerThread = field(default_factory=TokenizerThread)
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    kind: ClassVar[str] = "embedding"

    @property
    def max_model_len(self) -> int:
        return self.client.info["max_model_len"]

    @property
    def dimensions(self) -> int:
        return self.client.info["dimensions"]

    def output_dimensions(self, wanted: int | None) -> int | None:
        """The Matryoshka size to cut to, or None for the model's full embeddings."""
        if wanted is None or wanted == self.dimensions:
            return None
        if not self.matryoshka:
            raise invalid(
                f"'{self.id}' does not support 'dimensions' (it is not a Matryoshka model): "
                f"its embeddings have {self.dimensions} dimensions.",
                param="dimensions",
            )
        allowed = self.matryoshka_dimensions
        if wanted > self.dimensions or (allowed and wanted not in allowed):
            sizes = allowed or f"1 to {self.dimensions}"
            raise invalid(f"dimensions must be one of {sizes}, got {wanted}.", param="dimensions")
        return wanted

    def check_queue(self) -> None:
        if self.client.num_in_flight >= self.max_queued_requests:
            what = f"{self.max_queued_requests} requests queued, its limit"
            raise queue_full(self.id, what)


async def create_embeddings(
    model: ServedEmbeddingModel,
    req: EmbeddingRequest,
    request: Request,
    metrics: EmbeddingMetrics,
    meter: Meter,
) -> JSONResponse:
    work = _embed(model, req, request, meter)
    result = await counted(model.id, work, metrics, meter)
    return JSONResponse(_response(model.id, result, req.encoding_format or "float"))


async def counted(
    model_id: str, work: Awaitable[Embeddings], metrics: EmbeddingMetrics, meter: Meter
) -> Embeddings:
    """The worker's answer to a request, counted in the metrics by outcome, and its tokens
    in the key's usage."""
    start = time.monotonic()
    status = "failed"
    try:
        result = await work
        status = "ok"
    except RequestRejected:
        status = "rejected"
        raise
    except APIError as exc:
        if exc.status == CLIENT_CLOSED:
            status = "aborted"
        elif exc.status < 500:
            status = "rejected"
        raise
    finally:
        metrics.requests.labels(model_id, status).inc()
    metrics.latency.labels(model_id).observe(time.monotonic() - start)
    metrics.inputs.labels(model_id).inc(result.num_rows)
    metrics.input_tokens.labels(model_id).inc(result.num_tokens)
    meter.record(input_tokens=result.num_tokens)
    return result


async def _embed(
    model: ServedEmbeddingModel, req: EmbeddingRequest, request: Request, meter: Meter
) -> Embeddings:
    """Checks and admits the request, then has the worker embed it. Texts are tokenized here
    only for a key whose tpm counts their tokens before admission: elsewhere the worker does
    it between its passes (on 2 cores a tokenizer thread here cost 4-9% of texts/s at 16
    concurrent requests). Token ids and the truncation are checked here in any case: past
    2**64 they do not even reach the worker."""
    dimensions = model.output_dimensions(req.dimensions)
    model.check_queue()
    inputs, truncate = req.inputs(), req.truncate_prompt_tokens
    texts = bool(inputs) and isinstance(inputs[0], str)
    tokens = 0
    try:
        model.inputs.truncation_limit(truncate)
        if not texts or meter.limits_tokens:  # off the event loop: long texts take a while
            inputs = await model.tokenizing.run(model.inputs.token_ids, inputs, truncate)
            truncate, tokens = None, sum(map(len, inputs))
    except Rejected as exc:
        raise RequestRejected(str(exc), exc.code, exc.param) from None
    meter.admit(model.id, tokens)
    work = model.client.embed(f"embd-{uuid.uuid4().hex}", inputs, truncate, dimensions)
    return await unless_disconnected(request, work)


def _response(model_id: str, result: Embeddings, encoding_format: str) -> dict:
    if encoding_format == "base64":
        rows = [pybase64.b64encode(result.row(i)).decode() for i in range(result.num_rows)]
    else:
        matrix = np.frombuffer(result.rows, dtype="<f4").reshape(result.num_rows, -1)
        rows = matrix.tolist()
    return {
        "object": "list",
        "data": [{"object": "embedding", "index": i, "embedding": e} for i, e in enumerate(rows)],
        "model": model_id,
        "usage": {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens},
    }


class ServedRerankModel(ServedEmbeddingModel):
    """A cross-encoder: the embedding worker's queue, a score for a row (server/rerank.py)."""

    kind: ClassVar[str] = "rerank"


async def start_embedding_models(entries: list[CatalogEntry]) -> dict[str, ServedEmbeddingModel]:
    """A worker for each enabled embedding or rerank entry; a failure stops those already
    started."""
    entries = [e for e in entries if e.enabled and e.kind in ("embedding", "rerank")]
    clients = [EmbeddingClient(_worker_config(e), e.id) for e in entries]
    results = await asyncio.gather(*(c.start() for c in clients), return_exceptions=True)
    failed = [(e, r) for e, r in zip(entries, results) if isinstance(r, BaseException)]
    if failed:
        await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        entry, exc = failed[0]
        if not isinstance(exc, Exception):
            raise exc
        raise RuntimeError(f"{entry._where}: {exc}") from exc
    served = {}
    for entry, client in zip(entries, clients):
        settings = entry.embedding or EmbeddingSettings()
        info = client.info
        served_class = ServedRerankModel if entry.kind == "rerank" else ServedEmbeddingModel
        served[entry.id] = served_class(
            entry.id,
            client,
            settings.max_queued_requests,
            settings.matryoshka,
            settings.matryoshka_dimensions,
            inputs=await asyncio.to_thread(_inputs, info),
            owned_by=entry.owned_by,
        )
        logger.info(
            "serving %s (%s)%s on %s (%s): %d dimensions, max %d tokens, batches of up to %d "
            "inputs and %d padded tokens",
            entry.id,
            entry.kind,
            at_revision(info["revision"]),
            info["device"],
            info["dtype"],
            info["dimensions"],
            info["max_model_len"],
            info["max_batch_size"],
            info["max_batch_tokens"],
        )
    return served


def _inputs(info: dict) -> EmbeddingInputs:
    """The worker's tokenizer: its settings from where the worker loaded it, its pipeline as
    the worker runs it."""
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    pipeline = Tokenizer.from_str(info["tokenizer_json"])
    tokenizer = AutoTokenizer.from_pretrained(
        info["tokenizer"], revision=info["revision"], tokenizer_object=pipeline
    )
    return EmbeddingInputs(tokenizer, info["prompt"], info["vocab_size"], info["max_model_len"])


def _worker_config(entry: CatalogEntry) -> EmbeddingConfig:
    kwargs = entry.engine.model_dump(include={"dtype", "device"}) if entry.engine else {}
    if entry.embedding is not None:
        kwargs.update(entry.embedding.worker_kwargs())
    return EmbeddingConfig(
        resolve_source(entry),
        revision=resolve_revision(entry),
        max_model_len=entry.max_model_len,
        cross_encoder=entry.kind == "rerank",
        **kwargs,
    )
