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


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k, v [T, Hkv, D] into the paged caches at `slot_mapping` [T]."""
    num_kv_heads, head_dim = k.shape[1], k.shape[2]
    k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, slot_mapping, v)


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
    out = torch.empty_like(q)
    decode_rows: list[int] = []
    starts = meta.query_start_loc.tolist() if meta.max_query_len > 1 else None
    for s, (q_len, seq_len) in enumerate(zip(meta.query_lens_host, meta.seq_lens_host)):
        if q_len == 1:
            decode_rows.append(s)
            continue
        start = starts[s]
        out[start : start + q_len] = _extend_attention(
            q[start : start + q_len], k_cache, v_cache, meta.block_tables[s], seq_len, scale
        )
    if decode_rows:
        if len(decode_rows) == len(meta.seq_lens_host):
            rows = slice(None)
            token_rows = slice(None)
        else:
            rows = torch.tensor(decode_rows, device=q.device)
            token_rows = meta.query_start_loc[rows]
        out[token_rows] = _decode_attention(
            q[token_rows], k_cache, v_cache, meta.block_tables[rows], meta.seq_lens[rows], scale
        )
    return out


def _gather(cache: torch.Tensor, block_table: torch.Tensor, num_blocks: int) -> torch.Tensor:
    """Contiguous [..., num_blocks * block_size, Hkv, D] view of a sequence's cached tokens."""
    blocks = cache[block_table[..., :num_blocks]]
    return blocks.flatten(-4, -3)


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
    k = _gather(k_cache, block_table, num_blocks)[:seq_len]
    v = _gather(v_cache, block_table, num_blocks)[:seq_len]
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
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    batch, num_heads, head_dim = q.shape
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    max_len = int(seq_lens.max())
    num_blocks = -(-max_len // block_size)
    k = _gather(k_cache, block_tables, num_blocks).transpose(1, 2)  # [B, Hkv, L, D]
    v = _gather(v_cache, block_tables, num_blocks).transpose(1, 2)
    # GQA packing: the query heads sharing a KV head become that head's query rows, so each
    # KV head is read once and no repeat of K/V is needed.
    group = num_heads // num_kv_heads
    q4 = q.view(batch, num_kv_heads, group, head_dim)
    positions = torch.arange(k.shape[2], device=q.device)
    mask = (positions[None, :] < seq_lens[:, None])[:, None, None, :]
    o = F.scaled_dot_product_attention(q4, k, v, attn_mask=mask, scale=scale)
    return o.reshape(batch, num_heads, head_dim)
