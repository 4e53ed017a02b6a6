"""Paged attention on AVX-512 CPUs: decode rows through `csrc/attention_cpu.cpp`, which reads
each sequence's K/V in place through its block table; prefill chunks through the torch
reference (`kernels/attention.py`), whose gathers are small next to their matmuls.

The torch path copies every decode sequence's whole context out of the cache each layer
(index_select) before SDPA: 32 ms of a 120 ms decode step for 32 sequences of 200 tokens
here, where the kernel takes 19-24.
"""

from __future__ import annotations

import ctypes

import torch

from kernels import attention, cpu_native
from kernels.attention import AttentionMetadata

NAME = "attention_cpu"


I32, I64, F32, PTR = cpu_native.I32, cpu_native.I64, cpu_native.F32, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_paged_decode": (
        None,
        [PTR, I64, PTR, PTR, PTR, PTR, I64, PTR, PTR, I32, I32, I32, I32, I32, F32, I32],
    ),
}


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


def available() -> bool:
    return _library() is not None


def supports(dtype: torch.dtype, num_heads: int, num_kv_heads: int, head_dim: int) -> bool:
    """Whether the kernel takes this layer (the caller keeps the torch path otherwise)."""
    return dtype == torch.float32 and head_dim in (32, 64, 128) and _library() is not None


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as `kernels.attention.paged_attention`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    num_kv_heads = k_cache.shape[2]
    if not supports(q.dtype, num_heads, num_kv_heads, head_dim):
        return attention.paged_attention(q, k_cache, v_cache, meta, scale)
    decode = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
    if len(decode) == len(meta.query_lens_host):
        return _decode(q, k_cache, v_cache, meta, None, scale)
    out = attention.extend_attention(q, k_cache, v_cache, meta, scale)
    if decode:
        index = torch.tensor(decode)
        rows = meta.query_start_loc[index].long()
        sub = AttentionMetadata(
            query_start_loc=meta.query_start_loc,
            seq_lens=meta.seq_lens[index].contiguous(),
            block_tables=meta.block_tables[index].contiguous(),
            slot_mapping=meta.slot_mapping,
            max_query_len=1,
            max_seq_len=meta.max_seq_len,
            query_lens_host=[1] * len(decode),
            seq_lens_host=[meta.seq_lens_host[i] for i in decode],
        )
        out[rows] = _decode(q, k_cache, v_cache, sub, rows, scale)
    return out


def _decode(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    rows: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """Attention of q's rows `rows` (all rows when None), one per sequence of `meta`."""
    num_heads, head_dim = q.shape[1], q.shape[2]
    batch = len(meta.seq_lens_host)
    q = q if q.stride(2) == 1 and q.stride(1) == head_dim else q.contiguous()
    tables, seq_lens = meta.block_tables, meta.seq_lens
    assert tables.dtype == torch.int32 and seq_lens.dtype == torch.int32
    assert tables.stride(1) == 1 and seq_lens.is_contiguous()
    out = torch.empty(batch, num_heads, head_dim)
    _library().pagoda_paged_decode(
        q.data_ptr(),
        q.stride(0),
        None if rows is None else rows.data_ptr(),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        seq_lens.data_ptr(),
        out.data_ptr(),
        batch,
        num_heads,
        k_cache.shape[2],
        head_dim,
        k_cache.shape[1],
        scale,
        torch.get_num_threads(),
    )
    return out
