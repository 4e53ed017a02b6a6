"""Paged attention over a flat, unpadded batch: the torch reference path.

Layout of one layer's cache (K and V alike):

    cache[num_blocks, block_size, num_kv_heads, head_dim]

Token `p` of a sequence lives in physical block `block_tables[s, p // block_size]` at offset
`p % block_size`; its flat slot is `block * block_size + offset` (what `slot_mapping` holds for
the tokens of this step). Sequence `s` owns the query rows `query_start_loc[s]:query_start_loc[s+1]`
of the flat batch; those queries sit at the last positions of its `seq_lens[s]` tokens, so the
query at row `query_start_loc[s] + i` may attend to positions `<= seq_lens[s] - query_len + i`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(slots=True)
class AttentionMetadata:
    query_start_loc: torch.Tensor  # [B + 1] int32, cumulative query lengths
    seq_lens: torch.Tensor  # [B] int32, tokens in context after this step
    block_tables: torch.Tensor  # [B, max_blocks] int32; entries past a sequence's end are junk
    slot_mapping: torch.Tensor  # [T] int64, cache slot of each new token
    max_query_len: int
    max_seq_len: int
    # Host copies the torch path loops over (no device sync needed to read them).
    query_lens_host: list[int]
    seq_lens_host: list[int]
    decode_plan: DecodePlan | None = None  # the torch path's gather plan, built on first use


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k, v [T, Hkv, D] into the paged caches at `slot_mapping` [T]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    # the cache may be narrower than the activations (bf16 cache, fp32 model on a CPU)
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k.to(k_cache.dtype))
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v.to(v_cache.dtype))


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the cached context; returns [T, Hq, D].

    The new tokens' K/V must already be in the cache. Single-token queries (decode) are
    gathered and attended in one batched call; longer queries (prefill chunks) one by one,
    since padding them together would waste most of the work.
    """
    if meta.max_query_len == 1:
        return _decode_attention(q, k_cache, v_cache, _decode_plan(meta, k_cache.shape[1]), scale)
    out = extend_attention(q, k_cache, v_cache, meta, scale)
    plan = _decode_plan(meta, k_cache.shape[1])
    if plan is not None:
        out[plan.token_rows] = _decode_attention(q[plan.token_rows], k_cache, v_cache, plan, scale)
    return out


def extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor | None = None,
    min_context: int = 0,
) -> torch.Tensor:
    """[T, Hq, D] (`out` when given) with the rows of multi-token queries whose context exceeds
    `min_context` tokens attended; the other rows are left as they are for the caller."""
    out = torch.empty_like(q) if out is None else out
    start = 0
    for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if q_len > 1 and seq_len > min_context:
            rows = slice(start, start + q_len)
            out[rows] = _extend_attention(
                q[rows], k_cache, v_cache, meta.block_tables[s], seq_len, scale
            )
        start += q_len
    return out


@dataclass(slots=True)
class DecodePlan:
    """Where the single-query sequences of a step read their context: the same for every
    layer, so it is built once per step and kept on the metadata."""

    token_rows: torch.Tensor | slice  # rows of q that are single-token queries
    slots: torch.Tensor  # [b * L] flat cache slots of each sequence's first L positions
    mask: torch.Tensor | None  # [b, 1, 1, L], None when no position is padding
    batch: int
    length: int


def _decode_plan(meta: AttentionMetadata, block_size: int) -> DecodePlan | None:
    if meta.decode_plan is not None:
        return meta.decode_plan
    seqs = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
    if not seqs:
        return None
    device = meta.seq_lens.device
    if len(seqs) == len(meta.query_lens_host):
        token_rows, tables, seq_lens = slice(None), meta.block_tables, meta.seq_lens
        lens_host = meta.seq_lens_host
    else:
        index = torch.tensor(seqs, device=device)
        token_rows = meta.query_start_loc[index]
        tables, seq_lens = meta.block_tables[index], meta.seq_lens[index]
        lens_host = [meta.seq_lens_host[i] for i in seqs]
    length = max(lens_host)
    positions = torch.arange(length, device=device)
    blocks = tables.long().gather(1, (positions // block_size).expand(len(seqs), -1))
    slots = (blocks * block_size + positions % block_size).flatten()
    mask = None
    if min(lens_host) != length:
        mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]
    meta.decode_plan = DecodePlan(token_rows, slots, mask, len(seqs), length)
    return meta.decode_plan


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Contiguous [num_blocks * block_size, Hkv, D] copy of a sequence's cached tokens."""
    return cache[block_table[:num_blocks]].flatten(0, 1)


def _extend_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_table: torch.Tensor,
    seq_len: int,
    scale: float,
) -> torch.Tensor:
    q_len = q.shape[0]
    block_size = k_cache.shape[1]
    num_blocks = -(-seq_len // block_size)
    k = _gather(k_cache, block_table, num_blocks)[:seq_len].to(q.dtype)
    v = _gather(v_cache, block_table, num_blocks)[:seq_len].to(q.dtype)
    # [1, H, T, D] layout for SDPA
    q4, k4, v4 = (t.transpose(0, 1).unsqueeze(0) for t in (q, k, v))
    if q_len == seq_len:
        o = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale, enable_gqa=True)
    else:
        offset = seq_len - q_len
        q_pos = torch.arange(q_len, device=q.device)[:, None] + offset
        mask = torch.arange(seq_len, device=q.device)[None, :] <= q_pos
        o = F.scaled_dot_product_attention(q4, k4, v4, attn_mask=mask, scale=scale, enable_gqa=True)
    return o.squeeze(0).transpose(0, 1)


def _decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    plan: DecodePlan,
    scale: float,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    num_kv_heads = k_cache.shape[2]
    shape = (batch, plan.length, num_kv_heads, head_dim)
    k = k_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.slots).view(shape)
    v = v_cache.view(-1, num_kv_heads, head_dim).index_select(0, plan.slots).view(shape)
    k, v = k.to(q.dtype), v.to(q.dtype)  # a bf16 cache under an fp32 model (CPU bf16 path)
    # GQA packing: the query heads sharing a KV head become that head's query rows, so each
    # KV head is read once and no repeat of K/V is needed.
    group = num_heads // num_kv_heads
    q4 = q.view(batch, num_kv_heads, group, head_dim)
    o = F.scaled_dot_product_attention(
        q4, k.transpose(1, 2), v.transpose(1, 2), attn_mask=plan.mask, scale=scale
    )
    return o.reshape(batch, num_heads, head_dim)
