"""pagoda's engine: token ids in, token ids out, over a paged KV cache."""

from pagoda.engine.config import EngineConfig
from pagoda.engine.llm import LLM, CompletionOutput, RequestOutput
from pagoda.engine.llm_engine import LLMEngine
from pagoda.engine.sampling_params import SamplingParams, StructuredOutputsParams
from pagoda.engine.sequence import Logprob, SequenceDelta

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "SequenceDelta",
    "StructuredOutputsParams",
]
