"""pagoda's engine: token ids in, token ids out, over a paged KV cache.

The names below are imported on first use: the HTTP server imports the engine's light modules
(sampling parameters, sequences, config), and importing `LLM` would also bring in the model
runner, xgrammar and transformers' modeling code, seconds of start-up it never needs."""

import importlib

_EXPORTS = {
    "EngineConfig": "pagoda.engine.config",
    "LLM": "pagoda.engine.llm",
    "CompletionOutput": "pagoda.engine.llm",
    "RequestOutput": "pagoda.engine.llm",
    "LLMEngine": "pagoda.engine.llm_engine",
    "SamplingParams": "pagoda.engine.sampling_params",
    "StructuredOutputsParams": "pagoda.engine.sampling_params",
    "Logprob": "pagoda.engine.sequence",
    "SequenceDelta": "pagoda.engine.sequence",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'pagoda.engine' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
