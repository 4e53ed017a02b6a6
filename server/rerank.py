"""Reranking with a cross-encoder, as vLLM serves it: POST /rerank, /v1/rerank and /v2/rerank
(the Jina and Cohere shape: a query, documents, the best first) and POST /score, /v1/score
(vLLM's: text_1 against text_2, a score per pair, in order). A pair's score is the model's, as
`CrossEncoder.predict` gives it (engine/cross_encoder_worker.py)."""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, field_validator
from starlette.requests import Request
from starlette.responses import JSONResponse

from pagoda.engine.worker import Rejected
from pagoda.server.disconnect import unless_disconnected
from pagoda.server.embedding_client import Embeddings
from pagoda.server.embedding_metrics import EmbeddingMetrics
from pagoda.server.embeddings import (
    MAX_INPUTS,
    ServedRerankModel,
    TruncatePromptTokens,
    counted,
)
from pagoda.server.errors import invalid
from pagoda.server.keys.meter import Meter
from pagoda.server.worker_client import RequestRejected

# vLLM's paths: Jina's and Cohere's (v1, v2) shape, and its own score API
RERANK_PATHS = ("/rerank", "/v1/rerank", "/v2/rerank")
SCORE_PATHS = ("/score", "/v1/score")


class RerankDocument(BaseModel):
    """Cohere's (v1) and Jina's document object; only its text is read."""

    model_config = ConfigDict(extra="ignore")

    text: str


def _at_most(value: list, name: str) -> list:
    if len(value) > MAX_INPUTS:
        raise ValueError(f"at most {MAX_INPUTS} {name} are allowed per request, got {len(value)}")
    return value


class RerankRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    query: str
    documents: list[str | RerankDocument] = Field(min_length=1)
    # null or absent: every document; more than there are: every document
    top_n: int | None = Field(None, ge=1)
    return_documents: bool | None = None  # default true, as vLLM's
    truncate_prompt_tokens: TruncatePromptTokens | None = None
    # Cohere's (v2): each document cut to its first this many tokens, then paired
    max_tokens_per_doc: int | None = Field(None, ge=1)

    @field_validator("documents")
    @classmethod
    def _documents(cls, value: list) -> list:
        return _at_most(value, "documents")

    def texts(self) -> list[str]:
        return [d if isinstance(d, str) else d.text for d in self.documents]


class ScoreRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str
    text_1: str | list[str]
    text_2: str | list[str]
    truncate_prompt_tokens: TruncatePromptTokens | None = None

    @field_validator("text_1", "text_2")
    @classmethod
    def _texts(cls, value: str | list[str]) -> str | list[str]:
        if isinstance(value, list) and not value:
            raise ValueError("must not be an empty list")
        return _at_most(value, "texts") if isinstance(value, list) else value

    def pairs(self) -> list[list[str]]:
        """vLLM's pairing: one text_1 against every text_2, or text_1[i] with text_2[i]."""
        firsts = [self.text_1] if isinstance(self.text_1, str) else self.text_1
        seconds = [self.text_2] if isinstance(self.text_2, str) else self.text_2
        if len(firsts) == 1:
            firsts = firsts * len(seconds)
        if len(firsts) != len(seconds):
            raise invalid(
                f"text_1 has {len(firsts)} texts and text_2 {len(seconds)}: give one text_1, "
                "or as many as text_2 (they are paired in order).",
                param="text_1",
            )
        return [[first, second] for first, second in zip(firsts, seconds)]


async def create_rerank(
    model: ServedRerankModel,
    req: RerankRequest,
    request: Request,
    metrics: EmbeddingMetrics,
    meter: Meter,
) -> JSONResponse:
    texts = documents = req.texts()
    if req.max_tokens_per_doc is not None:  # off the event loop: long texts take a while
        documents = await model.tokenizing.run(
            model.inputs.leading_tokens, texts, req.max_tokens_per_doc
        )
    request_id = f"rerank-{uuid.uuid4().hex}"
    pairs = [[req.query, document] for document in documents]
    work = _score(model, request_id, pairs, req.truncate_prompt_tokens, request, meter)
    result = await counted(model.id, work, metrics, meter)
    scores = _scores(result)
    order = sorted(range(len(texts)), key=lambda i: -scores[i])[: req.top_n]
    results = []
    for index in order:
        item: dict[str, Any] = {"index": index, "relevance_score": scores[index]}
        if req.return_documents is not False:
            item["document"] = {"text": texts[index]}
        results.append(item)
    usage = {"prompt_tokens": result.num_tokens, "total_tokens": result.num_tokens}
    body = {"id": request_id, "model": model.id, "usage": usage, "results": results}
    return JSONResponse(body)


async def create_score(
    model: ServedRerankModel,
    req: ScoreRequest,
    request: Request,
    metrics: EmbeddingMetrics,
    meter: Meter,
) -> JSONResponse:
    request_id = f"score-{uuid.uuid4().hex}"
    work = _score(model, request_id, req.pairs(), req.truncate_prompt_tokens, request, meter)
    result = await counted(model.id, work, metrics, meter)
    data = [
        {"index": i, "object": "score", "score": score} for i, score in enumerate(_scores(result))
    ]
    tokens = result.num_tokens
    body = {
        "id": request_id,
        "object": "list",
        "created": int(time.time()),
        "model": model.id,
        "data": data,
        "usage": {"prompt_tokens": tokens, "total_tokens": tokens, "completion_tokens": 0},
    }
    return JSONResponse(body)


async def _score(
    model: ServedRerankModel,
    request_id: str,
    pairs: list[list[str]],
    truncate: int | None,
    request: Request,
    meter: Meter,
) -> Embeddings:
    """Admits the request and has the worker score its pairs, each cut to `truncate` tokens
    (else to the model's limit). The pairs are tokenized here only for a key whose tpm counts
    their tokens before admission (the worker tokenizes them again: it takes texts)."""
    model.check_queue()
    tokens = 0
    try:
        model.inputs.pair_truncation_limit(truncate)
        if meter.limits_tokens:  # off the event loop: long texts take a while
            token_ids, _ = await model.tokenizing.run(model.inputs.pair_token_ids, pairs, truncate)
            tokens = sum(map(len, token_ids))
    except Rejected as exc:
        raise RequestRejected(str(exc), exc.code, exc.param) from None
    meter.admit(model.id, tokens)
    work = model.client.embed(request_id, pairs, truncate, None)
    return await unless_disconnected(request, work)


def _scores(result: Embeddings) -> list[float]:
    return np.frombuffer(result.rows, dtype="<f4").tolist()
