"""What the sampler needs on the device for one step, sent in one copy, and the per-sequence
token counts the penalties read, kept on the device across steps."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pagoda.engine.sequence import Sequence
from pagoda.engine.staging import HostToDevice


@dataclass(slots=True)
class TokenCounts:
    """Per penalised sequence, one row of `output` [R, V] (how often each token was generated)
    and of `seen` [R, V] (tokens of its prompt). A row is filled from the sequence's history
    once, when it is first sampled; after that each sampled token is added on the device.
    Rows of finished sequences are reused."""

    device: torch.device
    output: torch.Tensor | None = None
    seen: torch.Tensor | None = None
    rows: dict[Sequence, int] = field(default_factory=dict)
    counted: dict[Sequence, int] = field(default_factory=dict)  # output tokens in its row
    free: list[int] = field(default_factory=list)

    def release_finished(self) -> None:
        for seq in [s for s in self.rows if s.is_finished]:
            self.free.append(self.rows.pop(seq))
            self.counted.pop(seq, None)

    def row_of(self, seq: Sequence, vocab: int) -> int:
        row = self.rows.get(seq)
        if row is None:
            if not self.free:
                self._grow(vocab)
            row = self.rows[seq] = self.free.pop()
        return row

    def _grow(self, vocab: int) -> None:
        old = 0 if self.output is None else self.output.shape[0]
        new = max(8, 2 * old)
        output = torch.zeros(new, vocab, device=self.device)
        seen = torch.zeros(new, vocab, dtype=torch.bool, device=self.device)
        if old:
            output[:old], seen[:old] = self.output, self.seen
        self.output, self.seen = output, seen
        self.free += range(new - 1, old - 1, -1)


@dataclass(slots=True)
class SamplingTensors:
    """One step's sampling parameters on the device; None where no row of the batch uses it."""

    counts: TokenCounts
    all_greedy: bool = True
    any_greedy: bool = True
    any_top_k: bool = False
    any_top_p: bool = False
    any_min_p: bool = False
    temperature: torch.Tensor | None = None  # [B], 1 for greedy rows
    greedy: torch.Tensor | None = None  # [B] bool
    top_k: torch.Tensor | None = None  # [B], the vocabulary size where off
    top_p: torch.Tensor | None = None
    min_p: torch.Tensor | None = None
    repetition: torch.Tensor | None = None
    frequency: torch.Tensor | None = None
    presence: torch.Tensor | None = None
    bias_rows: torch.Tensor | None = None  # logit_bias as (row, token, value) triples
    bias_tokens: torch.Tensor | None = None
    bias_values: torch.Tensor | None = None
    # (row, token) pairs that must not be drawn this step: stops before min_tokens, and the
    # tokens that would complete a bad word
    banned_rows: torch.Tensor | None = None
    banned_tokens: torch.Tensor | None = None
    allowed: torch.Tensor | None = None  # rows with allowed_token_ids
    allowed_pairs: torch.Tensor | None = None  # (index into `allowed`, token) pairs
    allowed_tokens: torch.Tensor | None = None
    penalty_rows: torch.Tensor | None = None  # rows of the batch with penalties
    penalty_counts_rows: torch.Tensor | None = None  # their rows in `counts`
    penalty_seqs: list[Sequence] = field(default_factory=list)
    logprob_rows: torch.Tensor | None = None
    logprob_rows_host: list[int] = field(default_factory=list)
    logprob_ks: list[int] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        seqs: list[Sequence],
        vocab: int,
        counts: TokenCounts,
        staging: HostToDevice | None = None,
    ) -> SamplingTensors:
        """Everything from the sequences' parameters, in one host-to-device copy (none when
        the batch is plain greedy)."""
        params = [s.params for s in seqs]
        all_greedy = all(p.greedy for p in params)
        bias = [
            (row, token, value)
            for row, p in enumerate(params)
            for token, value in (p.logit_bias or {}).items()
            if 0 <= token < vocab
        ]
        banned = [(row, token) for row, s in enumerate(seqs) for token in _banned_now(s, vocab)]
        allowed = [row for row, p in enumerate(params) if p.allowed_token_ids is not None]
        allowed_pairs = [
            (i, token)
            for i, row in enumerate(allowed)
            for token in params[row].allowed_token_ids
            if 0 <= token < vocab
        ]
        penalised = [row for row, p in enumerate(params) if p.uses_penalties]
        wanted = [row for row, p in enumerate(params) if p.logprobs is not None]
        counts.release_finished()
        counts_rows = [counts.row_of(seqs[row], vocab) for row in penalised]
        history = _history_to_send(counts, [seqs[row] for row in penalised], counts_rows)
        needed = not all_greedy or bias or banned or allowed or penalised or wanted
        if not needed:
            return cls(counts)
        ints = [
            [p.top_k or vocab for p in params],
            [int(p.greedy) for p in params],
            [b[0] for b in bias],
            [b[1] for b in bias],
            [r for r, _ in banned],
            [t for _, t in banned],
            allowed,
            [i for i, _ in allowed_pairs],
            [t for _, t in allowed_pairs],
            penalised,
            counts_rows,
            wanted,
            *history,
        ]
        floats = [
            [p.temperature or 1.0 for p in params],
            [p.top_p for p in params],
            [p.min_p for p in params],
            [p.repetition_penalty for p in params],
            [p.frequency_penalty for p in params],
            [p.presence_penalty for p in params],
            [b[2] for b in bias],
        ]
        staging = staging or HostToDevice(counts.device)
        device_ints, device_floats = staging.send(ints, floats)
        top_k, greedy, b_rows, b_tokens, ban_rows, ban_tokens = device_ints[:6]
        allowed_rows, allowed_index, allowed_ids, pen_rows, pen_counts, lp_rows = device_ints[6:12]
        clear, prompt_rows, prompt_ids, out_rows, out_ids = device_ints[12:]
        temperature, top_p, min_p, repetition, frequency, presence, b_values = device_floats
        if penalised:
            counts.output.index_fill_(0, clear, 0.0)
            counts.seen.index_fill_(0, clear, False)
            counts.seen.index_put_(
                (prompt_rows, prompt_ids), torch.ones_like(prompt_ids, dtype=torch.bool)
            )
            counts.output.index_put_(
                (out_rows, out_ids), torch.ones_like(out_ids, dtype=torch.float32), accumulate=True
            )
        return cls(
            temperature=temperature,
            greedy=greedy.bool(),
            top_k=top_k,
            top_p=top_p,
            min_p=min_p,
            repetition=repetition,
            frequency=frequency,
            presence=presence,
            all_greedy=all_greedy,
            any_greedy=any(p.greedy for p in params),
            any_top_k=any(p.top_k for p in params),
            any_top_p=any(p.top_p < 1.0 for p in params),
            any_min_p=any(p.min_p for p in params),
            bias_rows=b_rows if bias else None,
            bias_tokens=b_tokens,
            bias_values=b_values,
            banned_rows=ban_rows if banned else None,
            banned_tokens=ban_tokens,
            allowed=allowed_rows if allowed else None,
            allowed_pairs=allowed_index,
            allowed_tokens=allowed_ids,
            penalty_rows=pen_rows if penalised else None,
            penalty_counts_rows=pen_counts,
            penalty_seqs=[seqs[row] for row in penalised],
            logprob_rows=lp_rows if wanted else None,
            logprob_rows_host=wanted,
            logprob_ks=[params[row].logprobs for row in wanted],
            counts=counts,
        )

    def count_sampled(self, token_ids: torch.Tensor) -> None:
        """Add the step's sampled tokens to the penalised sequences' counts, on the device."""
        if self.penalty_rows is None:
            return
        sampled = token_ids[self.penalty_rows]
        ones = torch.ones_like(sampled, dtype=torch.float32)
        self.counts.output.index_put_((self.penalty_counts_rows, sampled), ones, accumulate=True)
        for seq in self.penalty_seqs:
            self.counts.counted[seq] += 1


def _banned_now(seq: Sequence, vocab: int) -> list[int]:
    """Tokens that must not be drawn next: the stops, before min_tokens are out, and the last
    token of each bad word whose other tokens end the output (vLLM's meaning: the output never
    completes a bad word's token sequence)."""
    params = seq.params
    held_back = seq.num_output_tokens < params.min_tokens
    if not held_back and not params.bad_words_token_ids:  # most sequences, every step
        return []
    banned: set[int] = set()
    if held_back:
        banned.update(params.stop_token_ids)
        if not params.ignore_eos:
            banned |= seq.eos_token_ids
    for word in params.bad_words_token_ids or ():
        *head, last = word
        if not head or seq.output_token_ids[-len(head) :] == head:
            banned.add(last)
    return sorted(t for t in banned if 0 <= t < vocab)


def _history_to_send(counts: TokenCounts, seqs: list[Sequence], rows: list[int]) -> list[list[int]]:
    """Rows to clear and the (row, token) pairs of the prompts and outputs to count, for the
    sequences whose row is new or does not hold their history (recomputed, or reused)."""
    clear, prompt_rows, prompt_ids, out_rows, out_ids = [], [], [], [], []
    for seq, row in zip(seqs, rows):
        if counts.counted.get(seq) == seq.num_output_tokens:
            continue
        clear.append(row)
        prompt = seq.token_ids[: seq.num_prompt_tokens]
        prompt_rows += [row] * len(prompt)
        prompt_ids += prompt
        out_rows += [row] * seq.num_output_tokens
        out_ids += seq.output_token_ids
        counts.counted[seq] = seq.num_output_tokens
    return [clear, prompt_rows, prompt_ids, out_rows, out_ids]
