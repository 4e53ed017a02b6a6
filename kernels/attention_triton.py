"""Paged attention in Triton: the CUDA path beside the torch reference in `kernels.attention`.

Same signatures, cache layout and semantics as the reference (read its docstring):
`cache[num_blocks, block_size, num_kv_heads, head_dim]`, a flat varlen batch, causal queries
at the last positions of each sequence, block-table entries past a sequence's end never read.

Four kernels; a step launches one (write, extend) or two (decode):

- `_write_kv_kernel`: one program per new token scatters its K and V rows into the cache slot
  `slot_mapping[t]`; a negative slot means "padding token, store nothing".
- decode (every query length 1): flash-decoding. `_decode_split_kernel` runs on a grid of
  (sequence, kv head, split); each program takes all query heads of its KV head as the rows of
  one tile (GQA packing: each KV tile is read once per group, the group padded to 16 rows for
  `tl.dot`), walks its split's share of the context with an online softmax and writes an
  unnormalised partial (acc, max, sum). `_decode_reduce_kernel` merges the splits. The number
  of splits is fixed by the launch (from the batch's longest possible context); each sequence
  cuts its own context into that many parts, so a CUDA graph captured for `max_model_len` still
  spreads a short context over every split instead of leaving most of them empty.
- prefill / extend / mixed batches: `_extend_kernel` on a grid of (query tile, kv head) over
  the flat batch: sequence s owns the tile slots from `query_start_loc[s] // BLOCK_Q + s` on,
  at most one more than its tiles, so the grid is `num_tokens // BLOCK_Q + num_seqs` and a
  decode row beside a long prefill chunk costs one tile, not as many as the chunk (a program
  finds its sequence by a binary search over those slot starts). A tile's rows are (query
  token, head of the group) pairs, so GQA packing holds here too. It attends to the cached
  prefix and the new tokens through the block table with the causal offset
  seq_len - query_len.

KV tiles of `TILE_N` positions are gathered position by position (block id from the table,
offset within the block), so the tile size does not depend on the cache's block size, and every
table or cache read past the sequence's length is masked off.
Heads of any size run in a tile of the next power of two (at least 16) with the extra columns
masked off: 80, 96 or 112 wide heads cost a 128-wide tile.

Precision: scores, softmax and accumulators are fp32. fp16/bf16 operands go to `tl.dot`
natively on a GPU; fp32 operands use `input_precision="ieee"` (no tf32). From sm_80 on, 16-bit
dots run on the tensor cores; on sm_75 (Turing) Triton lowers every dot to FMA loops, so there
they take the smaller tiles of the fp32 path (`_fma_dot`). Under the Triton
interpreter (CPU tensors, TRITON_INTERPRET=1) bf16 is only raw bits, so loads are converted
to fp32 before any math (`COMPUTE_DTYPE`).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from pagoda.kernels.attention import AttentionMetadata

_LOG2E = 1.4426950408889634
_MAX_SPLITS = 16
_MIN_TILES_PER_SPLIT = 4  # a decode split covers at least this many KV tiles
_TARGET_PROGRAMS = 512  # enough decode programs to fill a big GPU; past that, no split


@triton.jit
def _write_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_ptr,
    stride_kt,
    stride_kh,
    stride_vt,
    stride_vh,
    stride_cb,
    stride_ct,
    stride_ch,
    num_kv_heads,
    BLOCK_SIZE: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    t = tl.program_id(0)
    slot = tl.load(slot_ptr + t).to(tl.int64)
    heads = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, D_PAD)
    mask = (heads < num_kv_heads)[:, None] & (d < D)[None, :] & (slot >= 0)
    block = slot // BLOCK_SIZE
    offset = slot % BLOCK_SIZE
    dst = block * stride_cb + offset * stride_ct + heads[:, None] * stride_ch + d[None, :]
    k = tl.load(k_ptr + t * stride_kt + heads[:, None] * stride_kh + d[None, :], mask=mask)
    v = tl.load(v_ptr + t * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(k_cache_ptr + dst, k, mask=mask)
    tl.store(v_cache_ptr + dst, v, mask=mask)


@triton.jit
def _decode_split_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    part_acc_ptr,  # [B, Hq, num_splits, D] fp32, unnormalised
    part_max_ptr,  # [B, Hq, num_splits] fp32, running max of log2-scaled scores
    part_sum_ptr,  # [B, Hq, num_splits] fp32
    scale_log2,
    stride_qt,
    stride_qh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    num_heads,
    num_splits,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    MIN_SPLIT: tl.constexpr,  # tokens: a split covers at least this much context
    COMPUTE_DTYPE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)

    row = tl.load(query_start_loc_ptr + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - row
    seq_len = tl.where(q_len > 0, tl.load(seq_lens_ptr + seq), 0)
    # this sequence's share per split, in whole KV tiles: its own length, not the launch's
    split_len = (seq_len + num_splits - 1) // num_splits
    split_len = tl.maximum((split_len + TILE_N - 1) // TILE_N * TILE_N, MIN_SPLIT)
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    n = tl.arange(0, TILE_N)
    heads = kv_head * GROUP + g
    q = tl.load(
        q_ptr + row * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=(g < GROUP)[:, None] & d_mask[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)

    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    for tile_start in range(start, end, TILE_N):
        pos = tile_start + n
        valid = pos < end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = (
            block[:, None] * stride_cb
            + (pos % BLOCK_SIZE)[:, None] * stride_ct
            + kv_head * stride_ch
            + d[None, :]
        )
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(COMPUTE_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        s = tl.where(valid[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v, input_precision="ieee")
        m_i = m_new

    part = (seq * num_heads + heads) * num_splits + split
    head_mask = g < GROUP
    acc_mask = head_mask[:, None] & d_mask[None, :]
    tl.store(part_acc_ptr + part[:, None] * D + d[None, :], acc, mask=acc_mask)
    tl.store(part_max_ptr + part, m_i, mask=head_mask)
    tl.store(part_sum_ptr + part, l_i, mask=head_mask)


@triton.jit
def _decode_reduce_kernel(
    out_ptr,
    part_acc_ptr,
    part_max_ptr,
    part_sum_ptr,
    query_start_loc_ptr,
    stride_ot,
    stride_oh,
    num_heads,
    num_splits,
    SPLITS_PAD: tl.constexpr,
    D: tl.constexpr,
    D_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row = tl.load(query_start_loc_ptr + seq)
    if tl.load(query_start_loc_ptr + seq + 1) == row:
        return
    splits = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    part = (seq * num_heads + head) * num_splits + splits
    in_range = splits < num_splits
    m = tl.load(part_max_ptr + part, mask=in_range, other=float("-inf"))
    sums = tl.load(part_sum_ptr + part, mask=in_range, other=0.0)
    acc_mask = in_range[:, None] & d_mask[None, :]
    acc = tl.load(part_acc_ptr + part[:, None] * D + d[None, :], mask=acc_mask, other=0.0)
    m_max = tl.max(m, 0)
    m_max = tl.where(m_max == float("-inf"), 0.0, m_max)  # empty context: output 0, not NaN
    w = tl.exp2(m - m_max)
    denom = tl.sum(sums * w, 0)
    denom = tl.where(denom == 0.0, 1.0, denom)
    o = tl.sum(acc * w[:, None], 0) / denom
    out = out_ptr + row * stride_ot + head * stride_oh + d
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=d_mask)


@triton.jit
def _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q: tl.constexpr):
    """The sequence whose tile slots hold `tile`: the last s with
    query_start_loc[s] // BLOCK_Q + s <= tile (the slot starts strictly increase in s)."""
    lo = 0
    hi = num_seqs - 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        if tl.load(query_start_loc_ptr + mid) // BLOCK_Q + mid <= tile:
            lo = mid
        else:
            hi = mid - 1
    return lo


@triton.jit
def _extend_kernel(
    q_ptr,
    k_cache_ptr,
    v_cache_ptr,
    out_ptr,
    block_tables_ptr,
    seq_lens_ptr,
    query_start_loc_ptr,
    scale_log2,
    stride_qt,
    stride_qh,
    stride_ot,
    stride_oh,
    stride_cb,
    stride_ct,
    stride_ch,
    stride_bt,
    num_seqs,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    BLOCK_Q: tl.constexpr,  # query tokens per tile; the tile has BLOCK_Q * GROUP_PAD rows
    D: tl.constexpr,
    D_PAD: tl.constexpr,
    BLOCK_SIZE: tl.constexpr,
    TILE_N: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
):
    tile = tl.program_id(0)
    kv_head = tl.program_id(1)
    seq = _find_sequence(query_start_loc_ptr, tile, num_seqs, BLOCK_Q)

    q_start = tl.load(query_start_loc_ptr + seq)
    q_tile = tile - (q_start // BLOCK_Q + seq)
    q_len = tl.load(query_start_loc_ptr + seq + 1) - q_start
    if q_tile * BLOCK_Q >= q_len:
        return
    seq_len = tl.load(seq_lens_ptr + seq)
    context = seq_len - q_len  # tokens cached before this step's queries

    BLOCK_M: tl.constexpr = BLOCK_Q * GROUP_PAD
    r = tl.arange(0, BLOCK_M)
    i = q_tile * BLOCK_Q + r // GROUP_PAD  # query token within the sequence's new tokens
    g = r % GROUP_PAD
    heads = kv_head * GROUP + g
    row_mask = (i < q_len) & (g < GROUP)
    d = tl.arange(0, D_PAD)
    d_mask = d < D
    n = tl.arange(0, TILE_N)
    q = tl.load(
        q_ptr + (q_start + i)[:, None] * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=row_mask[:, None] & d_mask[None, :],
        other=0.0,
    ).to(COMPUTE_DTYPE)
    # Rows past q_len (or past the group) see a longer causal window; their results are
    # dropped, and every row sees position 0, so no row's max stays -inf.
    q_pos = context + i

    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, D_PAD], tl.float32)
    table = block_tables_ptr + seq * stride_bt
    kv_end = tl.minimum(context + (q_tile + 1) * BLOCK_Q, seq_len)  # causal bound of the tile
    for tile_start in range(0, kv_end, TILE_N):
        pos = tile_start + n
        valid = pos < kv_end
        block = tl.load(table + pos // BLOCK_SIZE, mask=valid, other=0).to(tl.int64)
        kv_off = (
            block[:, None] * stride_cb
            + (pos % BLOCK_SIZE)[:, None] * stride_ct
            + kv_head * stride_ch
            + d[None, :]
        )
        kv_mask = valid[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(COMPUTE_DTYPE)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * scale_log2
        s = tl.where(valid[None, :] & (pos[None, :] <= q_pos[:, None]), s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(COMPUTE_DTYPE)
        acc = acc * alpha[:, None] + tl.dot(p.to(COMPUTE_DTYPE), v, input_precision="ieee")
        m_i = m_new

    o = acc / l_i[:, None]
    out = out_ptr + (q_start + i)[:, None] * stride_ot + heads[:, None] * stride_oh + d[None, :]
    tl.store(out, o.to(out_ptr.dtype.element_ty), mask=row_mask[:, None] & d_mask[None, :])


def _compute_dtype(dtype: torch.dtype, on_gpu: bool):
    """fp32 math for fp32 caches, and for bf16 under the interpreter (bf16 is raw bits there)."""
    if dtype == torch.float32 or (dtype == torch.bfloat16 and not on_gpu):
        return tl.float32
    return {torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}[dtype]


def _device_capability(device: torch.device) -> int | None:
    """A CUDA device's compute capability as one number (7.5 -> 75); None for the CPU
    tensors of the interpreter, which take the sm_80+ launch configurations."""
    if device.type != "cuda":
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _cuda_capability(index)


@functools.cache
def _cuda_capability(index: int) -> int:
    major, minor = torch.cuda.get_device_capability(index)
    return 10 * major + minor


def _fma_dot(dtype: torch.dtype, capability: int | None) -> bool:
    """Whether `tl.dot` runs as FMA loops instead of tensor-core MMA: fp32 operands (ieee
    precision), and every dtype before sm_80, where Triton emits no MMA (sm_75, Turing)."""
    return dtype.itemsize == 4 or (capability is not None and capability < 80)


def _tile_n(dtype: torch.dtype, capability: int | None) -> int:
    """KV positions per step. The FMA path keeps its operand layouts in shared memory: 64-wide
    fp32 tiles need over 100 KB of it at head_dim 128, and on sm_75 64-wide fp16 tiles need
    80-96 KiB at head_dim 256, past its 64 KiB per block (32-wide: 48 KiB)."""
    return 32 if _fma_dot(dtype, capability) else 64


# Launch configurations: constexprs plus num_warps, shared with the ahead-of-time test.


def _padded(head_dim: int) -> int:
    """The head's tile width: `tl.arange` lengths are powers of two and `tl.dot` needs K >= 16,
    so head sizes such as 80, 96 or 112 run in a masked 128-wide tile."""
    return max(16, triton.next_power_of_2(head_dim))


def _write_kv_config(num_kv_heads: int, head_dim: int, block_size: int) -> dict:
    heads_pad = triton.next_power_of_2(num_kv_heads)
    return {
        "BLOCK_SIZE": block_size,
        "HEADS_PAD": heads_pad,
        "D": head_dim,
        "D_PAD": _padded(head_dim),
        "num_warps": 4,
    }


def _decode_config(
    group: int, head_dim: int, block_size: int, dtype: torch.dtype, capability: int | None
) -> dict:
    tile_n = _tile_n(dtype, capability)
    return {
        "GROUP": group,
        "GROUP_PAD": max(16, triton.next_power_of_2(group)),
        "D": head_dim,
        "D_PAD": _padded(head_dim),
        "BLOCK_SIZE": block_size,
        "TILE_N": tile_n,
        "MIN_SPLIT": _MIN_TILES_PER_SPLIT * tile_n,
        "COMPUTE_DTYPE": _compute_dtype(dtype, capability is not None),
        "num_warps": 4,
    }


def _reduce_config(num_splits: int, head_dim: int) -> dict:
    splits_pad = triton.next_power_of_2(num_splits)
    return {
        "SPLITS_PAD": splits_pad,
        "D": head_dim,
        "D_PAD": _padded(head_dim),
        "num_warps": 1 if head_dim <= 64 else 2,
    }


def _extend_config(
    group: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
    capability: int | None,
    max_query_len: int,
) -> dict:
    group_pad = triton.next_power_of_2(group)
    # Tile rows are (query token, head of the group) pairs: 64 of them for real prefill
    # chunks (32 on the FMA path, see _tile_n), 16 when every query of the batch is short.
    # Heads wider than 128 take half as many rows: a 64 x 256 tile needs 104 KiB of shared
    # memory, past the 99 KiB of sm_86/sm_89 cards (RTX 30xx/40xx, A10, L4, L40).
    block_m = 32 if _fma_dot(dtype, capability) else 64
    if _padded(head_dim) > 128:
        block_m //= 2
    if max_query_len * group_pad <= 16:
        block_m = 16
    block_m = max(block_m, group_pad)
    return {
        "GROUP": group,
        "GROUP_PAD": group_pad,
        "BLOCK_Q": block_m // group_pad,
        "D": head_dim,
        "D_PAD": _padded(head_dim),
        "BLOCK_SIZE": block_size,
        "TILE_N": _tile_n(dtype, capability),
        "COMPUTE_DTYPE": _compute_dtype(dtype, capability is not None),
        "num_warps": 8 if block_m * _padded(head_dim) >= 64 * 128 else 4,
    }


def _check_cache(k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    assert k_cache.shape == v_cache.shape and k_cache.stride() == v_cache.stride()
    assert k_cache.stride(3) == 1, "cache rows must be contiguous in head_dim"


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [T, H, D] with unit stride in D (a slice of a fused qkv output is fine as it is)."""
    return x if x.stride(2) == 1 else x.contiguous()


def write_kv_cache(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Store k, v [T, Hkv, D] into the paged caches at `slot_mapping` [T] (negative: skip)."""
    _check_cache(k_cache, v_cache)
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _rows(k), _rows(v)
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        num_kv_heads,
        **_write_kv_config(num_kv_heads, head_dim, k_cache.shape[1]),
    )  # fmt: skip


def _num_splits(max_seq_len: int, batch: int, num_kv_heads: int, tile_n: int) -> int:
    """Split the context only when (sequence, kv head) programs alone leave the GPU idle.
    `max_seq_len` bounds the batch's contexts (a captured graph passes `max_model_len`); each
    sequence then divides its own context by this count (see `_decode_split_kernel`)."""
    by_length = max(1, triton.cdiv(max_seq_len, tile_n) // _MIN_TILES_PER_SPLIT)
    by_occupancy = max(1, _TARGET_PROGRAMS // (batch * num_kv_heads))
    return min(by_length, by_occupancy, _MAX_SPLITS)


def _partials(
    batch: int, num_heads: int, num_splits: int, head_dim: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Split-KV partials (acc, max, sum) in fp32; every split program writes its own, an empty
    split too (max -inf, sum 0)."""
    acc = torch.empty((batch, num_heads, num_splits, head_dim), dtype=torch.float32, device=device)
    max_ = torch.empty((batch, num_heads, num_splits), dtype=torch.float32, device=device)
    return acc, max_, torch.empty_like(max_)


def _extend_grid(num_tokens: int, batch: int, num_kv_heads: int, block_q: int) -> tuple:
    """Every (sequence, query tile) pair, plus at most one empty slot per sequence."""
    return (num_tokens // block_q + batch, num_kv_heads)


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    """Causal attention of q [T, Hq, D] over the cached context; returns [T, Hq, D].

    The new tokens' K/V must already be in the cache. Decode-only batches take the split-KV
    kernel; anything with a longer query takes the extend kernel for every row.
    """
    _check_cache(k_cache, v_cache)
    q = _rows(q)
    num_tokens, num_heads, head_dim = q.shape
    _, block_size, num_kv_heads, _ = k_cache.shape
    assert num_heads % num_kv_heads == 0 and k_cache.shape[3] == head_dim
    group = num_heads // num_kv_heads
    batch = meta.seq_lens.shape[0]
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    if num_tokens == 0:
        return out
    capability = _device_capability(q.device)
    scale_log2 = scale * _LOG2E
    cache_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
    table_stride = meta.block_tables.stride(0)

    if meta.max_query_len == 1:
        config = _decode_config(group, head_dim, block_size, k_cache.dtype, capability)
        tile_n = config["TILE_N"]
        num_splits = _num_splits(meta.max_seq_len, batch, num_kv_heads, tile_n)
        part_acc, part_max, part_sum = _partials(batch, num_heads, num_splits, head_dim, q.device)
        _decode_split_kernel[(batch, num_kv_heads, num_splits)](
            q, k_cache, v_cache, meta.block_tables, meta.seq_lens, meta.query_start_loc,
            part_acc, part_max, part_sum, scale_log2,
            q.stride(0), q.stride(1), *cache_strides, table_stride,
            num_heads, num_splits,
            **config,
        )  # fmt: skip
        _decode_reduce_kernel[(batch, num_heads)](
            out, part_acc, part_max, part_sum, meta.query_start_loc,
            out.stride(0), out.stride(1), num_heads, num_splits,
            **_reduce_config(num_splits, head_dim),
        )  # fmt: skip
        return out

    config = _extend_config(
        group, head_dim, block_size, k_cache.dtype, capability, meta.max_query_len
    )
    grid = _extend_grid(num_tokens, batch, num_kv_heads, config["BLOCK_Q"])
    _extend_kernel[grid](
        q, k_cache, v_cache, out, meta.block_tables, meta.seq_lens, meta.query_start_loc,
        scale_log2,
        q.stride(0), q.stride(1), out.stride(0), out.stride(1), *cache_strides, table_stride,
        batch,
        **config,
    )  # fmt: skip
    return out
