"""Paged attention on AVX-512 and AVX2 CPUs: decode rows and prefill chunks of one step in one
call to `csrc/attention_cpu.cpp`, which reads each sequence's K/V in place through its block table
(with AMX and a bf16 cache, the prefill chunks go to `csrc/prefill_attention_amx.cpp`).

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

from pagoda.kernels import attention, cpu_native, linear_bf16
from pagoda.kernels.attention import AttentionMetadata

NAME, AMX_NAME = "attention_cpu", "prefill_attention_amx"
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
AMX_SIGNATURES: cpu_native.Signatures = {"pagoda_prefill_attention_amx": (None, ATTEND)}
# cache dtype -> suffix of the kernels that read and write it (q and out are fp32 either way)
CACHE_DTYPES = {torch.float32: "", torch.bfloat16: "_bf16"}


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


def available() -> bool:
    return _library() is not None


def prefill_on_amx(cache_dtype: torch.dtype, head_dim: int) -> bool:
    """Whether prefill chunks over this cache go to `csrc/prefill_attention_amx.cpp`: a bf16
    cache, whole 32-dim tile rows, and AMX granted (the bf16 linears ask for it first). Its
    queries and probabilities are rounded to bf16 (fp32 sums), as the linears' inputs are, and
    as flash attention does on GPUs. SmolLM2-135M's shapes (9 heads of 64, 3 KV heads), bf16
    cache, 2 cores, alternated: a 4 x 128-token prefill step's attention over 30 layers 17.5
    ms on fp32 vectors, 10.1 on the tiles; a layer of 4 fresh 128-token prompts 0.55 against
    0.27 ms, of one 512-token prompt 1.55 against 0.63, of 4 chunks of 128 after 384 cached
    tokens 2.62 against 1.12."""
    ok = cache_dtype == torch.bfloat16 and head_dim % 32 == 0 and linear_bf16.kernel_amx()
    return ok and cpu_native.load(AMX_NAME, AMX_SIGNATURES) is not None


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
    amx = meta.max_query_len > 1 and prefill_on_amx(k_cache.dtype, head_dim)
    kernels = [(attend, 0 if amx else LONG_PREFILL)]  # (kernel, longest prefill context it takes)
    if amx:
        kernels.append((cpu_native.load(AMX_NAME).pagoda_prefill_attention_amx, LONG_PREFILL))
    for kernel, longest in kernels:
        _attend(kernel, q, k_cache, v_cache, meta, scale, out, longest)
    if meta.max_seq_len > LONG_PREFILL and meta.max_query_len > 1:
        attention.extend_attention(q, k_cache, v_cache, meta, scale, out, LONG_PREFILL)
    return out


def _attend(
    kernel: ctypes._CFuncPtr,
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
    out: torch.Tensor,
    longest_prefill: int,
) -> None:
    """One of the kernels over the step's batch: decode rows, and prefill chunks with at most
    `longest_prefill` tokens of context."""
    _, num_heads, head_dim = q.shape
    tables, seq_lens, starts = meta.block_tables, meta.seq_lens, meta.query_start_loc
    cpu_native.call(
        kernel,
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
        longest_prefill,
        torch.get_num_threads(),
    )
