"""The state of one generated sequence (one of a request's `n` choices) and what it emits."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from pagoda.engine.sampling_params import SamplingParams

if TYPE_CHECKING:
    from pagoda.engine.structured_output import SequenceGrammar


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(slots=True)
class Logprob:
    logprob: float
    rank: int  # 1 = the most likely token


# One generated token's logprobs: the chosen token and the top-k alternatives.
TokenLogprobs = dict[int, Logprob]


@dataclass(slots=True, eq=False)
class Sequence:
    """Everything the scheduler knows about a sequence is `token_ids` and
    `num_computed_tokens`: a step computes the KV of tokens `[num_computed_tokens, ...)`, and
    when it reaches the end a new token is sampled. Prefill, chunked prefill, decode and
    recomputation after preemption are all that one rule."""

    request_id: str
    index: int  # which of the request's n choices
    token_ids: list[int]  # prompt, then generated tokens
    num_prompt_tokens: int
    params: SamplingParams
    max_tokens: int  # params.max_tokens, bounded by the context length
    eos_token_ids: frozenset[int]
    generator: torch.Generator | None = None
    # A sibling whose prompt must be computed first, so that this one finds it in the prefix
    # cache instead of computing it again (n > 1).
    shares_prompt_with: Sequence | None = None
    # the LoRA adapter it runs under (engine/lora.py): its slot, and its id, unique to each
    # adapter loaded (a slot is reused), which keys its prefix cache; -1: the base model
    lora_slot: int = -1
    lora_id: int = -1
    status: SequenceStatus = SequenceStatus.WAITING
    num_computed_tokens: int = 0
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[bytes] = field(default_factory=list)  # of full blocks, in order
    num_hashed_blocks: int = 0  # of block_table, registered in the prefix cache
    finish_reason: str | None = None
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    logprobs: list[TokenLogprobs] = field(default_factory=list)
    # One entry per prompt token once computed (the first is None: nothing precedes it).
    prompt_logprobs: list[TokenLogprobs | None] = field(default_factory=list)
    grammar: SequenceGrammar | None = None  # structured outputs: the sampler's constraint

    @property
    def waiting_for_grammar(self) -> bool:
        return self.grammar is not None and self.grammar.matcher is None

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens :]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append(self, token_id: int, logprobs: TokenLogprobs | None) -> None:
        if self.max_tokens == 0:  # the prompt only: what its last position drew is dropped
            self.finish_reason = "length"
            return
        self.token_ids.append(token_id)
        if logprobs is not None:
            self.logprobs.append(logprobs)
        self.finish_reason = self._stop_reason(token_id)

    def _stop_reason(self, token_id: int) -> str | None:
        if self.num_output_tokens > self.params.min_tokens:  # the sampler masks stops before
            if token_id in self.params.stop_token_ids:
                return "stop"
            if token_id in self.eos_token_ids and not self.params.ignore_eos:
                return "stop"
        if self.num_output_tokens >= self.max_tokens:
            return "length"
        return None


@dataclass(slots=True)
class SequenceDelta:
    """What one step produced for one sequence: the streaming unit the frontend consumes."""

    request_id: str
    index: int
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprobs]
    prompt_logprobs: list[TokenLogprobs | None] | None  # on a sequence's first delta, if asked
    finish_reason: str | None
    num_prompt_tokens: int
    num_cached_tokens: int
