"""Paged attention on AVX-512 CPUs: decode rows and prefill chunks of one step in one call to
`csrc/attention_cpu.cpp`, which reads each sequence's K/V in place through its block table.

The torch path copies every sequence's whole context out of the cache each layer (index_select)
before SDPA. Per 30 layers on the 2-core dev machine, caches out of the CPU caches: decode of 32
sequences x 200 tokens 33 ms there, 17 here; a prefill step of 4 x 128 tokens 36 ms, 19 here.
Decode is bound by reading K/V from memory (about 20 GB/s); prefill by arithmetic. Each query
tile reads its whole context, so past LONG_PREFILL tokens of context torch's blocked SDPA wins
(one layer of a fresh prompt: 1024 tokens 9 ms there, 6 here; 1536 about 16 both; 2048 26 against
29; 4096 90 against 132), and those chunks keep the torch path.
The cache may be bf16 (half the bytes to read per decode step); queries, outputs and all
arithmetic stay fp32.
"""

from __future__ import annotations

import ctypes

import torch

from pagoda.kernels import attention, cpu_native
from pagoda.kernels.attention import AttentionMetadata

NAME = "attention_cpu"
LONG_PREFILL = 1536


I32, I64, F32, PTR = cpu_native.I32, cpu_native.I64, cpu_native.F32, cpu_native.PTR
WRITE = [PTR, I64, PTR, I64, PTR, PTR, PTR, I32, I32]
ATTEND = [PTR, I64, PTR, PTR, PTR, I64, PTR, PTR, PTR, I32, I32, I32, I32, I32, F32, I32, I32]
SIGNATURES: cpu_native.Signatures = {
    "pagoda_write_kv_cache": (None, WRITE),
    "pagoda_write_kv_cache_bf16": (None, WRITE),
    "pagoda_paged_attention": (None, ATTEND),
    "pagoda_paged_attention_bf16": (None, ATTEND),
}
# cache dtype -> suffix of the kernels that read and write it (q and out are fp32 either way)
CACHE_DTYPES = {torch.float32: "", torch.bfloat16: "_bf16"}


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


def available() -> bool:
    return _library() is not None


def supports(
    dtype: torch.dtype,
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    cache_dtype: torch.dtype = torch.float32,
) -> bool:
    """Whether the kernel takes this layer (the caller keeps the torch path otherwise): fp32
    queries over an fp32 or bf16 cache."""
    ok = dtype == torch.float32 and cache_dtype in CACHE_DTYPES and head_dim in (32, 64, 128)
    return ok and _library() is not None


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Same contract as `kernels.attention.write_kv_cache`: one memcpy per token and cache
    instead of index_copy_'s dispatch, 60 times a decode step."""
    tokens, heads, head_dim = k.shape
    rows_ok = all(t.stride(2) == 1 and t.stride(1) == head_dim for t in (k, v))
    fp32_rows = k.dtype == v.dtype == torch.float32 and k_cache.dtype == v_cache.dtype
    if not (rows_ok and fp32_rows and k_cache.dtype in CACHE_DTYPES and available()):
        return attention.write_kv_cache(k, v, k_cache, v_cache, slot_mapping)
    assert slot_mapping.dtype == torch.int64 and slot_mapping.is_contiguous()
    assert k_cache.is_contiguous() and v_cache.is_contiguous()
    write = getattr(_library(), "pagoda_write_kv_cache" + CACHE_DTYPES[k_cache.dtype])
    cpu_native.call(
        write,
        k.data_ptr(),
        k.stride(0),
        v.data_ptr(),
        v.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        slot_mapping.data_ptr(),
        tokens,
        heads * head_dim,
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Same contract as `kernels.attention.paged_attention`."""
    num_tokens, num_heads, head_dim = q.shape
    if not supports(q.dtype, num_heads, k_cache.shape[2], head_dim, k_cache.dtype):
        return attention.paged_attention(q, k_cache, v_cache, meta, scale)
    q = q if q.stride(2) == 1 and q.stride(1) == head_dim else q.contiguous()
    tables, seq_lens, starts = meta.block_tables, meta.seq_lens, meta.query_start_loc
    assert tables.dtype == seq_lens.dtype == starts.dtype == torch.int32
    assert tables.stride(1) == 1 and seq_lens.is_contiguous() and starts.is_contiguous()
    out = cpu_native.empty(num_tokens, num_heads, head_dim)
    attend = getattr(_library(), "pagoda_paged_attention" + CACHE_DTYPES[k_cache.dtype])
    cpu_native.call(
        attend,
        q.data_ptr(),
        q.stride(0),
        k_cache.data_ptr(),
        v_cache.data_ptr(),
        tables.data_ptr(),
        tables.stride(0),
        starts.data_ptr(),
        seq_lens.data_ptr(),
        out.data_ptr(),
        len(meta.seq_lens_host),
        num_heads,
        k_cache.shape[2],
        head_dim,
        k_cache.shape[1],
        scale,
        LONG_PREFILL,
        torch.get_num_threads(),
    )
    if meta.max_seq_len > LONG_PREFILL and meta.max_query_len > 1:
        attention.extend_attention(q, k_cache, v_cache, meta, scale, out, LONG_PREFILL)
    return out
