"""pagoda's engine: token ids in, token ids out, over a paged KV cache."""

from engine.config import EngineConfig
from engine.llm import LLM, CompletionOutput, RequestOutput
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import Logprob, SequenceDelta

__all__ = [
    "LLM",
    "CompletionOutput",
    "EngineConfig",
    "LLMEngine",
    "Logprob",
    "RequestOutput",
    "SamplingParams",
    "SequenceDelta",
]
