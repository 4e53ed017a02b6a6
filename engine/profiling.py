"""Sizing the KV cache on a GPU from a measured step, not a guess (vLLM's profile run).

Before the cache exists, the largest step the scheduler can hand out runs once on dummy
inputs: `max_num_batched_tokens` tokens over `max_num_seqs` sequences (one long prefill and
single-token rows), every row sampled with top-k, top-p, min-p, penalties and 20 logprobs, the
long one with prompt logprobs. Its peak memory above the weights, plus what CUDA graphs of
decode steps will keep, is held back; the cache gets the rest of the memory budget.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from torch import nn

from pagoda.engine.model_runner import ModelRunner
from pagoda.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from pagoda.engine.scheduler import ScheduledBatch
from pagoda.engine.sequence import Sequence

# every sampling path at once: the most memory a batch's sampling can take
WORST_CASE_PARAMS = SamplingParams(
    temperature=1.0,
    top_k=50,
    top_p=0.9,
    min_p=0.05,
    presence_penalty=0.5,
    frequency_penalty=0.5,
    repetition_penalty=1.1,
    logprobs=MAX_LOGPROBS,
    max_tokens=1,
)


def dummy_batch(num_tokens: int, num_seqs: int, block_size: int) -> ScheduledBatch:
    """`num_seqs` sequences of `num_tokens` new tokens in all, each ending this step; every
    block-table entry is block 0, so a one-block cache serves the whole batch."""
    num_seqs = max(1, min(num_seqs, num_tokens))
    lengths = [num_tokens - (num_seqs - 1)] + [1] * (num_seqs - 1)
    batch = ScheduledBatch()
    for index, length in enumerate(lengths):
        params = WORST_CASE_PARAMS
        if index == 0:
            params = replace(params, prompt_logprobs=MAX_LOGPROBS)
        seq = Sequence(
            request_id="profile",
            index=index,
            token_ids=[index % 100] * length,
            num_prompt_tokens=length,
            params=params,
            max_tokens=1,
            eos_token_ids=frozenset(),
        )
        seq.block_table = [0] * -(-length // block_size)
        batch.seqs.append(seq)
        batch.num_new_tokens.append(length)
    return batch


def run_dummy_step(
    model: nn.Module,
    num_tokens: int,
    num_seqs: int,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> None:
    """One step of the largest batch on a throw-away one-block cache, sampling included."""
    runner = ModelRunner(model, 1, block_size, device, dtype, seed=0)
    runner.run(dummy_batch(num_tokens, num_seqs, block_size))


def activation_peak(
    model: nn.Module,
    num_tokens: int,
    num_seqs: int,
    decode_graph_batch: int | None,
    block_size: int,
    device: torch.device,
    dtype: torch.dtype,
) -> int:
    """Bytes a step needs above what is allocated now (the weights): the largest step's peak,
    plus the peak of the largest captured decode batch, whose memory the graphs keep."""
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    peaks = []
    sizes = [(num_tokens, num_seqs)]
    if decode_graph_batch:
        sizes.append((decode_graph_batch, decode_graph_batch))
    for tokens, seqs in sizes:
        torch.cuda.reset_peak_memory_stats(device)
        run_dummy_step(model, tokens, seqs, block_size, device, dtype)
        torch.cuda.synchronize(device)
        peaks.append(torch.cuda.max_memory_allocated(device) - base)
    torch.cuda.empty_cache()
    return peaks[0] + (peaks[1] if len(peaks) > 1 else 0)


def kv_cache_budget(total: int, free: int, utilization: float, activations: int) -> int:
    """Bytes for the KV cache: the share of the card we may use, less what is in use now
    (weights, the CUDA context, other processes: total - free after emptying torch's cache)
    and less the measured activations."""
    return max(0, int(total * utilization) - (total - free) - activations)
