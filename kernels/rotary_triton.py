"""Rotary position embedding (NeoX layout) as one Triton kernel (see kernels/rotary.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    n_heads,
    x_stride_t,
    x_stride_h,
    cos_stride_t,
    sin_stride_t,
    half_dim,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    # One program per (token, block of heads); every head of a token shares its cos/sin row.
    tok = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    d = tl.arange(0, BLOCK_D)
    d_mask = d < half_dim
    mask = (heads < n_heads)[:, None] & d_mask[None, :]

    cos_row = cos_ptr + tok * cos_stride_t
    sin_row = sin_ptr + tok * sin_stride_t
    cos1 = tl.load(cos_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    cos2 = tl.load(cos_row + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin1 = tl.load(sin_row + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]
    sin2 = tl.load(sin_row + half_dim + d, mask=d_mask, other=0.0).to(tl.float32)[None, :]

    x_off = tok * x_stride_t + heads[:, None].to(tl.int64) * x_stride_h + d[None, :]
    x1 = tl.load(x_ptr + x_off, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_ptr + x_off + half_dim, mask=mask, other=0.0).to(tl.float32)
    # x * cos + cat(-x2, x1) * sin
    o1 = x1 * cos1 - x2 * sin1
    o2 = x2 * cos2 + x1 * sin2

    head_dim = 2 * half_dim
    o_off = (tok * n_heads + heads[:, None].to(tl.int64)) * head_dim + d[None, :]
    out_ty = out_ptr.dtype.element_ty
    tl.store(out_ptr + o_off, o1.to(out_ty), mask=mask)
    tl.store(out_ptr + o_off + half_dim, o2.to(out_ty), mask=mask)


def rotary_launch_config(n_heads: int, head_dim: int) -> tuple[int, int, int]:
    """(BLOCK_H, BLOCK_D, num_warps): a tile of heads x half a head, at most 4096 elements."""
    block_d = triton.next_power_of_2(head_dim // 2)
    block_h = min(triton.next_power_of_2(n_heads), max(1, 4096 // block_d))
    num_warps = 4 if block_h * block_d >= 1024 else 1
    return block_h, block_d, num_warps


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.rotary.apply_rotary: x [T, H, D] (any strides, e.g. a slice of
    the fused qkv output), cos/sin [T, D]; returns a new contiguous [T, H, D] tensor."""
    n_tokens, n_heads, head_dim = x.shape
    if head_dim % 2:
        raise ValueError(f"head_dim must be even, got {head_dim}")
    if cos.shape != (n_tokens, head_dim) or sin.shape != (n_tokens, head_dim):
        raise ValueError(
            f"cos/sin must be [{n_tokens}, {head_dim}], got {tuple(cos.shape)}/{tuple(sin.shape)}"
        )
    out_dtype = torch.promote_types(torch.promote_types(x.dtype, cos.dtype), sin.dtype)
    out = torch.empty((n_tokens, n_heads, head_dim), dtype=out_dtype, device=x.device)
    if out.numel() == 0:
        return out
    if x.stride(-1) != 1:
        x = x.contiguous()
    if cos.stride(-1) != 1:
        cos = cos.contiguous()
    if sin.stride(-1) != 1:
        sin = sin.contiguous()
    block_h, block_d, num_warps = rotary_launch_config(n_heads, head_dim)
    grid = (n_tokens, triton.cdiv(n_heads, block_h))
    _rotary_kernel[grid](
        x,
        cos,
        sin,
        out,
        n_heads,
        x.stride(0),
        x.stride(1),
        cos.stride(0),
        sin.stride(0),
        head_dim // 2,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=num_warps,
    )
    return out
