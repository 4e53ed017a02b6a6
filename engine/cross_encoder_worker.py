"""The reranking worker: one sentence-transformers CrossEncoder (num_labels 1) in its own
process, batched by the embedding worker's queue (engine/embedding_worker.py).

An add's payload is `pairs, truncate, dimensions` (the embedding worker's, so that both share
the client): `pairs` a list of [query, document] texts, `truncate` None or a pair's most tokens
(vLLM's truncate_prompt_tokens, -1 for the model's limit); `dimensions` is unused. A pair is cut
to the model's limit, or to `truncate`, as `CrossEncoder.predict` cuts it to its max_length.
Each pair's output row is its one score, after the model's activation (sigmoid unless the model
names another), as `CrossEncoder.predict` gives it. Batches are padded: the pair's two texts
have token type ids of their own, which the packed layouts do not carry.
"""

from __future__ import annotations

import logging
from functools import partial

import torch

from pagoda.engine.embedding_worker import (
    EmbeddingConfig,
    EmbeddingWorker,
    Item,
)
from pagoda.engine.model_folder import cross_encoder_problem
from pagoda.engine.worker import run_worker
from pagoda.logs import LogSettings, at_revision

logger = logging.getLogger(__name__)


class CrossEncoderWorker(EmbeddingWorker):
    def _load(self) -> None:
        # heavy (transformers' modeling code): only in the worker, not in the server
        from sentence_transformers import CrossEncoder

        config = self.config
        model = CrossEncoder(config.model, device=str(self.device), revision=config.revision)
        trained_as = getattr(model[0].model.config, "architectures", None) or []
        problem = cross_encoder_problem(config.model, trained_as, model.num_labels)
        if problem is not None:
            raise ValueError(problem)
        task = getattr(model[0], "transformer_task", None)
        if len(model) != 1 or task != "sequence-classification" or model.prompts:
            # a causal LM scored through a template (LogitScore, e.g. Qwen3-Reranker), or a
            # prompt: its pairs are not tokenized as plain pairs, which is all this worker does
            raise ValueError(
                f"{config.model} is not a sequence-classification cross-encoder without "
                "prompts (BERT, RoBERTa, XLM-RoBERTa rerankers): pagoda does not serve it"
            )
        self._adopt(model, "")
        self.activation = model.activation_fn
        self.dim = 1
        self.layout = "padded"
        logger.info(
            "loaded cross-encoder %s%s on %s (%s): activation %s, max %d tokens a pair",
            config.model,
            at_revision(config.revision),
            self.device,
            str(self.dtype).removeprefix("torch."),
            type(self.activation).__name__,
            self.max_model_len,
        )

    def add(
        self, request_id: str, pairs: list[list[str]], truncate: int | None, dimensions: None
    ) -> None:
        self._check_id(request_id)
        token_ids, token_type_ids = self.inputs.pair_token_ids(pairs, truncate)
        self._enqueue(request_id, token_ids, token_type_ids=token_type_ids)

    def _run(self, batch: list[Item]) -> torch.Tensor:
        types = [item.token_type_ids for item in batch] if self.token_type_ids else None
        return self._embed_padded([item.token_ids for item in batch], types)

    def _outputs(self, features: dict) -> torch.Tensor:
        # upcast first, as CrossEncoder.predict does (ties in half precision)
        return self.activation(features["scores"].float()).cpu()


def run_cross_encoder_worker(
    config: EmbeddingConfig, input_addr: str, output_addr: str, log_settings: LogSettings
) -> None:
    """Process entry point (module level, picklable arguments: a worker process's target)."""
    load = partial(CrossEncoderWorker, config)
    run_worker(load, input_addr, output_addr, log_settings)
