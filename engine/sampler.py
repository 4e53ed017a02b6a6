"""Batched sampling over sequences with different parameters.

Order of logit processing (vLLM's): the grammar's token bitmask (structured outputs),
allowed_token_ids, logit_bias, banned tokens (stops before min_tokens, bad words), penalties,
then greedy argmax, or temperature, top-k, top-p, min-p and a draw. Logprobs are those of the
model distribution, constrained by the grammar where there is one. A draw inverts the row's
cumulative distribution at one uniform number, a seeded sequence's from its own generator, so
its draws do not depend on its batch.

The step's parameters reach the device in one copy (`SamplingTensors`, through the runner's
staging buffer), and penalties read token counts kept on the device (`TokenCounts`), so a
step waits on the device once, for its sampled tokens (and once more for logprobs).
"""

from __future__ import annotations

import torch

from pagoda.engine.sampling_tensors import SamplingTensors, TokenCounts
from pagoda.engine.sequence import Logprob, Sequence, TokenLogprobs
from pagoda.engine.structured_output import accept_tokens, apply_bitmask
from pagoda.kernels import elementwise_cpu


def sample(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator,
    tensors: SamplingTensors | None = None,
) -> list[tuple[int, TokenLogprobs | None]]:
    """Draw one token per row of `logits` [B, V] (fp32, modified in place) for `seqs` [B].
    `tensors`: the step's parameters already on the device (built here when not given)."""
    if tensors is None:
        tensors = SamplingTensors.build(seqs, logits.shape[-1], TokenCounts(logits.device))
    apply_bitmask(logits, seqs)
    raw = logits
    if tensors.allowed is not None:
        logits = _unless_nothing_left(_keep_allowed_tokens(logits.clone(), tensors), logits)
    if tensors.bias_rows is not None:
        logits = _apply_logit_bias(logits.clone(), tensors)
    if tensors.banned_rows is not None:
        logits = _unless_nothing_left(_mask_banned_tokens(logits.clone(), tensors), logits)
    if tensors.penalty_rows is not None:
        logits = _apply_penalties(logits.clone(), tensors)

    token_ids = _argmax(logits) if tensors.all_greedy else _draw(logits, seqs, generator, tensors)
    tensors.count_sampled(token_ids)

    token_list = token_ids.tolist()
    accept_tokens(seqs, token_list)
    logprob_list: list[TokenLogprobs | None] = [None] * len(seqs)
    if tensors.logprob_rows is not None:
        wanted, ks = tensors.logprob_rows, tensors.logprob_ks
        entries = token_logprobs(raw[wanted], token_ids[wanted], ks)
        for i, entry in zip(tensors.logprob_rows_host, entries):
            logprob_list[i] = entry
    return list(zip(token_list, logprob_list))


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    """Per row of `logits`: the logprob and rank of `chosen`, plus the top `ks[row]` tokens."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1))
    ranks = (logprobs > chosen_lp).sum(dim=-1, keepdim=True) + 1
    max_k = max(ks)
    top_lp, top_ids = logprobs.topk(max_k, dim=-1)
    # one read back: [token, logprob, rank, k top ids, k top logprobs] per row, in float64
    # (exact for token ids and ranks)
    columns = (chosen.unsqueeze(1), chosen_lp, ranks, top_ids, top_lp)
    rows = torch.cat([c.double() for c in columns], dim=1).tolist()
    entries: list[TokenLogprobs] = []
    for row, k in zip(rows, ks):
        token, lp, rank = int(row[0]), row[1], int(row[2])
        entry = {token: Logprob(lp, rank)}
        for r in range(k):
            entry.setdefault(int(row[3 + r]), Logprob(row[3 + max_k + r], r + 1))
        entries.append(entry)
    return entries


def _unless_nothing_left(masked: torch.Tensor, before: torch.Tensor) -> torch.Tensor:
    """`masked`, except rows where it left no token drawable: those keep `before`. Constraints
    that leave nothing (allowed_token_ids outside a grammar, or only stops before min_tokens)
    give way in the order they were applied: the later one yields. Without this a greedy row
    would take token 0 and a drawn one an index past the vocabulary."""
    alive = torch.isfinite(masked).any(dim=-1, keepdim=True)
    return torch.where(alive, masked, before)


def _apply_logit_bias(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    return logits.index_put_((t.bias_rows, t.bias_tokens), t.bias_values, accumulate=True)


def _keep_allowed_tokens(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    keep = torch.zeros(len(t.allowed), logits.shape[-1], dtype=torch.bool, device=logits.device)
    keep[t.allowed_pairs, t.allowed_tokens] = True
    logits[t.allowed] = logits[t.allowed].masked_fill_(~keep, float("-inf"))
    return logits


def _mask_banned_tokens(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    masked = torch.full((), float("-inf"), device=logits.device)
    return logits.index_put_((t.banned_rows, t.banned_tokens), masked)


def _apply_penalties(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    rows = t.penalty_rows
    output_counts = t.counts.output[t.penalty_counts_rows]  # [P, V]
    seen = t.counts.seen[t.penalty_counts_rows] | (output_counts > 0)
    part = logits[rows]
    repetition = t.repetition[rows].unsqueeze(1)
    penalized = torch.where(part > 0, part / repetition, part * repetition)
    part = torch.where(seen, penalized, part)
    part -= t.frequency[rows].unsqueeze(1) * output_counts
    part -= t.presence[rows].unsqueeze(1) * (output_counts > 0)
    logits[rows] = part
    return logits


def _draw(
    logits: torch.Tensor,
    seqs: list[Sequence],
    generator: torch.Generator,
    t: SamplingTensors,
) -> torch.Tensor:
    uniform = _uniforms(seqs, generator, logits.device)
    drawn = None
    if not (t.any_top_k or t.any_top_p or t.any_min_p):
        drawn = elementwise_cpu.sample_rows(logits, t.temperature, uniform)
    if drawn is None:
        drawn = _inverse_cdf(_probabilities(logits, t), uniform)
    if not t.any_greedy:
        return drawn
    return torch.where(t.greedy, _argmax(logits), drawn)


def _probabilities(logits: torch.Tensor, t: SamplingTensors) -> torch.Tensor:
    """The rows' distributions after temperature, top-k, top-p and min-p: top-p and min-p
    zero the tokens they drop, and the rows are not renormalized after (the draw needs not)."""
    scaled = logits / t.temperature.unsqueeze(1)
    if t.any_top_k:
        kth = elementwise_cpu.kth_largest_rows(scaled, t.top_k)
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))
    probs = scaled.softmax(dim=-1)
    if t.any_top_p:
        probs = probs.masked_fill(probs < elementwise_cpu.top_p_cutoff_rows(probs, t.top_p), 0.0)
    if t.any_min_p:
        threshold = t.min_p.unsqueeze(1) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def _uniforms(seqs: list[Sequence], generator: torch.Generator, device) -> torch.Tensor:
    """[B, 1] uniform numbers in [0, 1): a seeded sequence's from its own generator."""
    uniform = torch.rand(len(seqs), 1, generator=generator, device=device)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            uniform[row] = torch.rand(1, generator=seq.generator, device=device)
    return uniform


def _inverse_cdf(probs: torch.Tensor, uniform: torch.Tensor) -> torch.Tensor:
    """A token per row of probs [B, V] (rows need not sum to 1): the first whose cumulative
    probability passes `uniform` [B, 1] of the row's total. One random number a row, where the
    exponential race drew one a token (torch's exponential_ took 28 ms at 32 x 49,152 on 2
    cores, a decode step's forward pass about 20). Tokens of zero probability add nothing to the
    sum, so they are never the first to pass it."""
    cumulative = probs.cumsum(dim=-1)
    total = cumulative[:, -1:]
    # below the total even where u * total rounds up to it
    target = torch.minimum(uniform * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cumulative, target, right=True).squeeze(1)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    # max's indices: the same first maximal index as argmax, 2.5x faster on CPU (32 x 49152);
    # on a CPU with the kernels, one pass of our own, 3.6x faster again
    return elementwise_cpu.argmax_rows(logits)
