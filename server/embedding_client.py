"""The server's handle on one embedding worker process, or one reranking (cross-encoder)
worker: both take lists of inputs and answer rows of floats."""

from __future__ import annotations

from dataclasses import dataclass

from pagoda.engine.cross_encoder_worker import run_cross_encoder_worker
from pagoda.engine.embedding_worker import EmbeddingConfig, run_embedding_worker
from pagoda.server.worker_client import WorkerClient


@dataclass(slots=True)
class Embeddings:
    rows: bytes  # float32 little-endian, row after row, in input order
    num_rows: int
    dimensions: int
    num_tokens: int

    def row(self, index: int) -> bytes:
        width = 4 * self.dimensions
        return self.rows[index * width : (index + 1) * width]


class EmbeddingClient(WorkerClient):
    kind = "embedding"

    def __init__(self, config: EmbeddingConfig, name: str) -> None:
        if config.cross_encoder:
            self.kind = "rerank"
            super().__init__(name, run_cross_encoder_worker, (config,))
        else:
            super().__init__(name, run_embedding_worker, (config,))
        self.config = config
        self.stats = {"running": 0, "waiting": 0}

    def decode_output(self, fields: list) -> Embeddings:
        return Embeddings(*fields[1:])

    async def embed(
        self,
        request_id: str,
        inputs: list[str] | list[list[int]] | list[list[str]],
        truncate: int | None,
        dimensions: int | None,
    ) -> Embeddings:
        """`inputs`: a reranker's are [query, document] pairs; its rows are their scores.
        Cancelling the call drops the request's inputs from the batches not yet run."""
        return await self.call(request_id, [inputs, truncate, dimensions])
