"""Batched sampling over sequences with different parameters.

Order of logit processing (vLLM's): the grammar's token bitmask (structured outputs), logit_bias,
min_tokens (stops masked), penalties, then greedy argmax, or temperature, top-k, top-p, min-p
and a draw. Logprobs are those of the model distribution, constrained by the grammar where there
is one. Draws use the exponential race (argmax of p / Exp(1) noise), with the noise of a seeded
sequence from its own generator, so its draws do not depend on its batch.
"""

from __future__ import annotations

import torch

from pagoda.engine.sequence import Logprob, Sequence, TokenLogprobs
from pagoda.engine.structured_output import accept_tokens, apply_bitmask


def sample(
    logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator
) -> list[tuple[int, TokenLogprobs | None]]:
    """Draw one token per row of `logits` [B, V] (fp32, modified in place) for `seqs` [B]."""
    apply_bitmask(logits, seqs)
    raw = logits
    params = [s.params for s in seqs]
    if any(p.logit_bias for p in params):
        logits = _apply_logit_bias(logits.clone(), seqs)
    if any(s.num_output_tokens < s.params.min_tokens for s in seqs):
        logits = _mask_stops_before_min_tokens(logits.clone(), seqs)
    if any(p.uses_penalties for p in params):
        logits = _apply_penalties(logits.clone(), seqs)

    greedy = all(p.greedy for p in params)
    token_ids = _argmax(logits) if greedy else _draw(logits, seqs, generator)

    token_list = token_ids.tolist()
    accept_tokens(seqs, token_list)
    logprob_list: list[TokenLogprobs | None] = [None] * len(seqs)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if wanted:
        ks = [params[i].logprobs for i in wanted]
        for i, entry in zip(wanted, token_logprobs(raw[wanted], token_ids[wanted], ks)):
            logprob_list[i] = entry
    return list(zip(token_list, logprob_list))


def token_logprobs(
    logits: torch.Tensor, chosen: torch.Tensor, ks: list[int]
) -> list[TokenLogprobs]:
    """Per row of `logits`: the logprob and rank of `chosen`, plus the top `ks[row]` tokens."""
    logprobs = logits.float().log_softmax(dim=-1)
    chosen_lp = logprobs.gather(1, chosen.unsqueeze(1)).squeeze(1)
    ranks = ((logprobs > chosen_lp.unsqueeze(1)).sum(dim=-1) + 1).tolist()
    max_k = max(ks)
    top_lp, top_ids = logprobs.topk(max_k, dim=-1) if max_k else (None, None)
    top_lp_rows = top_lp.tolist() if max_k else None
    top_id_rows = top_ids.tolist() if max_k else None
    entries: list[TokenLogprobs] = []
    for row, (token, lp, k) in enumerate(zip(chosen.tolist(), chosen_lp.tolist(), ks)):
        entry = {token: Logprob(lp, ranks[row])}
        for rank in range(k):
            entry.setdefault(top_id_rows[row][rank], Logprob(top_lp_rows[row][rank], rank + 1))
        entries.append(entry)
    return entries


def _apply_logit_bias(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab = logits.shape[-1]
    for row, seq in enumerate(seqs):
        for token_id, bias in (seq.params.logit_bias or {}).items():
            if 0 <= token_id < vocab:
                logits[row, token_id] += bias
    return logits


def _mask_stops_before_min_tokens(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    for row, seq in enumerate(seqs):
        if seq.num_output_tokens < seq.params.min_tokens:
            stops = set(seq.params.stop_token_ids)
            if not seq.params.ignore_eos:
                stops |= seq.eos_token_ids
            logits[row, list(stops)] = float("-inf")
    return logits


def _token_counts(rows: list[list[int]], vocab: int, device: torch.device) -> torch.Tensor:
    counts = torch.zeros(len(rows), vocab + 1, device=device)
    width = max((len(r) for r in rows), default=0)
    if width:
        ids = torch.full((len(rows), width), vocab, dtype=torch.long)  # pad into a spare column
        for i, r in enumerate(rows):
            ids[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        counts.scatter_add_(1, ids.to(device), torch.ones(ids.shape, device=device))
    return counts[:, :vocab]


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    vocab, device = logits.shape[-1], logits.device
    output_counts = _token_counts([s.output_token_ids for s in seqs], vocab, device)
    prompt_seen = _token_counts([s.token_ids[: s.num_prompt_tokens] for s in seqs], vocab, device)
    column = lambda values: torch.tensor(values, device=device).unsqueeze(1)  # noqa: E731
    repetition = column([s.params.repetition_penalty for s in seqs])
    seen = (output_counts + prompt_seen) > 0
    penalized = torch.where(logits > 0, logits / repetition, logits * repetition)
    logits = torch.where(seen, penalized, logits)
    logits -= column([s.params.frequency_penalty for s in seqs]) * output_counts
    logits -= column([s.params.presence_penalty for s in seqs]) * (output_counts > 0)
    return logits


def _draw(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator) -> torch.Tensor:
    device = logits.device
    params = [s.params for s in seqs]
    greedy_rows = torch.tensor([p.greedy for p in params], device=device)
    temperature = torch.tensor([p.temperature or 1.0 for p in params], device=device)
    scaled = logits / temperature.unsqueeze(1)

    top_k = [p.top_k for p in params]
    if any(top_k):
        vocab = logits.shape[-1]
        k = torch.tensor([t if t else vocab for t in top_k], device=device).clamp(max=vocab)
        sorted_desc = scaled.sort(dim=-1, descending=True).values
        kth = sorted_desc.gather(1, (k - 1).unsqueeze(1))
        scaled = scaled.masked_fill(scaled < kth, float("-inf"))

    top_p = [p.top_p for p in params]
    if any(t < 1.0 for t in top_p):
        sorted_logits, order = scaled.sort(dim=-1, descending=True)
        cumulative = sorted_logits.softmax(dim=-1).cumsum(dim=-1)
        # drop a token when the tokens ranked before it already cover top_p
        drop_sorted = (cumulative - sorted_logits.softmax(dim=-1)) >= torch.tensor(
            top_p, device=device
        ).unsqueeze(1)
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        scaled = scaled.masked_fill(drop, float("-inf"))

    probs = scaled.softmax(dim=-1)
    min_p = [p.min_p for p in params]
    if any(min_p):
        threshold = torch.tensor(min_p, device=device).unsqueeze(1) * probs.amax(-1, keepdim=True)
        probs = probs.masked_fill(probs < threshold, 0.0)

    noise = torch.empty_like(probs)
    noise.exponential_(generator=generator)
    for row, seq in enumerate(seqs):
        if seq.generator is not None:
            noise[row].exponential_(generator=seq.generator)
    drawn = (probs / noise).argmax(dim=-1)
    return torch.where(greedy_rows, _argmax(logits), drawn)


def _argmax(logits: torch.Tensor) -> torch.Tensor:
    # max's indices: the same first maximal index as argmax, 2.5x faster on CPU (32 x 49152)
    return logits.max(dim=-1).indices
