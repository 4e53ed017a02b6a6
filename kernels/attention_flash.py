"""Paged attention through flash-attn's varlen kernel, when flash-attn is installed.

An optional fast path, never a dependency (it has no binary wheel; it builds with nvcc).
flash-attn reads the cache through the block tables itself, but only for pages of a multiple
of 256 tokens: `usable` tells whether a cache layout qualifies, else the Triton path serves.
"""

from __future__ import annotations

import importlib.util

import torch

from pagoda.kernels.attention import AttentionMetadata
from pagoda.kernels.attention_triton import write_kv_cache

PAGE_MULTIPLE = 256

__all__ = ["paged_attention", "usable", "write_kv_cache"]


def usable(block_size: int) -> bool:
    return block_size % PAGE_MULTIPLE == 0 and importlib.util.find_spec("flash_attn") is not None


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = torch.zeros_like(meta.query_start_loc)
    torch.cumsum(meta.seq_lens, dim=0, out=cu_seqlens_k[1:])
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q=meta.query_start_loc,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_seq_len,
        softmax_scale=scale,
        causal=True,  # bottom-right aligned: queries are the last tokens of their sequence
        block_table=meta.block_tables,
    )
