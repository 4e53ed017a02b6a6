"""The fused MoE layer on CUDA: tokens sorted by expert, then one grouped-GEMM Triton kernel
run twice (see kernels/moe.py for the layout and the torch reference).

1. `align`: the T * k (token, choice) pairs are sorted by expert and each expert's segment is
   padded to a multiple of BLOCK_M, so that every BLOCK_M-row tile belongs to one expert. All
   on the device with sizes known from the shapes alone: no host sync, so a CUDA graph can
   capture the layer. Tiles past the last expert's segment get expert -1 and exit at once.
2. gate/up: tile rows gather their token's row of x, times w13[e]^T -> [T * k, 2I]; the
   SiLU-and-mul kernel halves it to [T * k, I].
3. down: rows of that times w2[e]^T, scaled by the pair's routing weight -> [T * k, H]; the k
   rows of a token are summed.

Accumulation is fp32; fp16/bf16 operands go to the tensor cores (fp32 ones take the exact
`ieee` path, as torch's fp32 matmul does), intermediates are stored in the activation dtype,
as the reference stores them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from pagoda.kernels.activation_triton import silu_and_mul
from pagoda.kernels.attention_triton import _compute_dtype


@triton.jit
def _grouped_gemm_kernel(
    a_ptr,  # [rows, K]: row r // A_ROWS_PER_PAIR of pair r
    b_ptr,  # [E, N, K] stacked expert weights
    c_ptr,  # [T * k, N] one row per (token, choice) pair
    weights_ptr,  # [T * k] fp32 routing weights, read when MUL_WEIGHT
    sorted_pairs_ptr,  # [padded] int32 pair ids sorted by expert; num_pairs marks padding
    tile_experts_ptr,  # [tiles] int32 expert of each BLOCK_M tile, -1 past the end
    N,
    K,
    num_pairs,
    stride_am,
    stride_be,
    stride_bn,
    stride_cm,
    A_ROWS_PER_PAIR: tl.constexpr,  # top_k when a is x (one row per token), else 1
    MUL_WEIGHT: tl.constexpr,
    COMPUTE_DTYPE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile_m = tl.program_id(0)
    expert = tl.load(tile_experts_ptr + tile_m).to(tl.int64)
    if expert < 0:
        return
    pairs = tl.load(sorted_pairs_ptr + tile_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = pairs < num_pairs
    a_rows = (pairs // A_ROWS_PER_PAIR).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_tile = a_ptr + a_rows[:, None] * stride_am + ks[None, :]
    b_tile = b_ptr + expert * stride_be + cols[None, :].to(tl.int64) * stride_bn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        k_mask = ks + k0 < K
        a = tl.load(a_tile + k0, mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        b = tl.load(b_tile + k0, mask=k_mask[:, None] & col_mask[None, :], other=0.0)
        acc += tl.dot(a.to(COMPUTE_DTYPE), b.to(COMPUTE_DTYPE), input_precision="ieee")
    if MUL_WEIGHT:
        acc *= tl.load(weights_ptr + pairs, mask=row_mask, other=0.0)[:, None]
    c = c_ptr + pairs[:, None].to(tl.int64) * stride_cm + cols[None, :]
    tl.store(c, acc.to(c_ptr.dtype.element_ty), mask=row_mask[:, None] & col_mask[None, :])


@dataclass(frozen=True, slots=True)
class Alignment:
    sorted_pairs: torch.Tensor  # [padded] int32, pair ids by expert; num_pairs in padding
    tile_experts: torch.Tensor  # [padded // block_m] int32, -1 for unused tiles


def align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> Alignment:
    """Sort the (token, choice) pairs by expert, each expert's segment padded to block_m rows.
    The padded length is the bound T * k + E * (block_m - 1) rounded up to block_m."""
    flat = topk_ids.flatten().long()
    num_pairs = flat.numel()
    device = flat.device
    # not bincount: on CUDA it reads the largest id back to size its output (a host sync)
    counts = torch.zeros(num_experts, dtype=torch.int64, device=device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))
    padded_counts = (counts + block_m - 1) // block_m * block_m
    padded_ends = padded_counts.cumsum(0)
    order = flat.argsort(stable=True)
    # a pair's place: its expert's padded start + its rank among that expert's pairs
    sorted_experts = flat[order]
    ranks = torch.arange(num_pairs, device=device) - (counts.cumsum(0) - counts)[sorted_experts]
    places = padded_ends[sorted_experts] - padded_counts[sorted_experts] + ranks
    bound = num_pairs + num_experts * (block_m - 1)
    tiles = triton.cdiv(bound, block_m)
    sorted_pairs = torch.full((tiles * block_m,), num_pairs, dtype=torch.int32, device=device)
    sorted_pairs.scatter_(0, places, order.to(torch.int32))
    tile_starts = torch.arange(tiles, device=device) * block_m
    tile_experts = torch.searchsorted(padded_ends, tile_starts, right=True)
    tile_experts = torch.where(tile_experts < num_experts, tile_experts, -1).to(torch.int32)
    return Alignment(sorted_pairs, tile_experts)


def moe_launch_config(num_pairs: int, num_experts: int) -> dict:
    """Tile sizes and warps: 16-row tiles while the average expert sees few pairs (decode;
    less padding), 64 rows once it sees many."""
    block_m = 16 if num_pairs <= 2 * num_experts * 16 else 64
    return {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": 64, "num_warps": 4, "num_stages": 3}


def grouped_gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    alignment: Alignment,
    out: torch.Tensor,
    a_rows_per_pair: int,
    weights: torch.Tensor | None,
    config: dict,
) -> torch.Tensor:
    """out[p] = a[p // a_rows_per_pair] @ b[expert of p]^T (times weights[p] when given)."""
    _, n, k = b.shape
    tiles = alignment.tile_experts.numel()
    grid = (tiles, triton.cdiv(n, config["BLOCK_N"]))
    _grouped_gemm_kernel[grid](
        a,
        b,
        out,
        weights if weights is not None else out,  # never read without MUL_WEIGHT
        alignment.sorted_pairs,
        alignment.tile_experts,
        n,
        k,
        out.shape[0],
        a.stride(0),
        b.stride(0),
        b.stride(1),
        out.stride(0),
        A_ROWS_PER_PAIR=a_rows_per_pair,
        MUL_WEIGHT=weights is not None,
        COMPUTE_DTYPE=_compute_dtype(a.dtype, a.is_cuda),
        **config,
    )
    return out


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """Same contract as kernels.moe.fused_moe: sum_j topk_weights[t, j] *
    expert_{topk_ids[t, j]}(x[t]) for x [T, H]; returns [T, H]."""
    num_tokens, top_k = topk_ids.shape
    num_experts, two_inter, hidden = w13.shape
    if x.shape[0] == 0:
        return torch.zeros_like(x)
    if x.stride(-1) != 1 or w13.stride(-1) != 1 or w2.stride(-1) != 1:
        raise ValueError("x, w13 and w2 must have a unit-strided last dim")
    num_pairs = num_tokens * top_k
    config = moe_launch_config(num_pairs, num_experts)
    alignment = align(topk_ids, num_experts, config["BLOCK_M"])
    gate_up = torch.empty(num_pairs, two_inter, dtype=x.dtype, device=x.device)
    grouped_gemm(x, w13, alignment, gate_up, top_k, None, config)
    inter = silu_and_mul(gate_up)
    down = torch.empty(num_pairs, hidden, dtype=x.dtype, device=x.device)
    weights = topk_weights.flatten().float().contiguous()
    grouped_gemm(inter, w2, alignment, down, 1, weights, config)
    return down.view(num_tokens, top_k, hidden).sum(dim=1)
