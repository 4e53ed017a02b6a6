"""RMSNorm with an optional fused residual add, as one Triton kernel (see kernels/norm.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    res_ptr,
    w_ptr,
    out_ptr,
    new_res_ptr,
    n_heads,
    x_stride_t,
    x_stride_h,
    res_stride_t,
    res_stride_h,
    n_cols,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # One program per normalized row: row = token * n_heads + head (n_heads is 1 for [T, H]).
    row = tl.program_id(0)
    tok = (row // n_heads).to(tl.int64)
    head = (row % n_heads).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols

    x = tl.load(x_ptr + tok * x_stride_t + head * x_stride_h + cols, mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + tok * res_stride_t + head * res_stride_h + cols, mask=mask, other=0.0)
        # residual + x is rounded to its dtype first (it is what the next layer adds onto)
        s = (r.to(tl.float32) + x).to(new_res_ptr.dtype.element_ty)
        tl.store(new_res_ptr + row.to(tl.int64) * n_cols + cols, s, mask=mask)
        x = s.to(tl.float32)

    variance = tl.sum(x * x, axis=0) / n_cols
    rstd = tl.rsqrt(variance + eps)
    # Cast back to the activation dtype before the weight multiply, as transformers does. Without
    # a residual, new_res_ptr is x_ptr (never written), so its element type is x's.
    normed = (x * rstd).to(new_res_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    out = (w * normed).to(out_ptr.dtype.element_ty)
    tl.store(out_ptr + row.to(tl.int64) * n_cols + cols, out, mask=mask)


def rms_norm_launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps) for rows of n_cols elements: the whole row is one tile."""
    block = triton.next_power_of_2(n_cols)
    num_warps = min(max(block // 512, 1), 16)
    return block, num_warps


def _as_rows(t: torch.Tensor) -> torch.Tensor:
    """A 2-D or 3-D view whose last dim is unit-strided (copies only when it is not)."""
    if t.dim() not in (2, 3):
        t = t.reshape(-1, t.shape[-1])
    if t.stride(-1) != 1:
        t = t.contiguous()
    return t


def _row_strides(t: torch.Tensor) -> tuple[int, int]:
    return (t.stride(0), t.stride(1)) if t.dim() == 3 else (t.stride(0), 0)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Same contract as kernels.norm.rms_norm: returns (normed, new_residual), normalizing over
    the last dim of x ([T, H], or a possibly strided [T, heads, D] view for q/k norm).

    new_residual = residual + x (a new tensor), or x itself when there is no residual.
    """
    n_cols = x.shape[-1]
    if weight.numel() != n_cols:
        raise ValueError(f"weight has {weight.numel()} elements, rows have {n_cols}")
    res_dtype = x.dtype if residual is None else torch.result_type(residual, x)
    out_dtype = torch.promote_types(weight.dtype, res_dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    new_res = x if residual is None else torch.empty(x.shape, dtype=res_dtype, device=x.device)
    if x.numel() == 0:
        return out, new_res

    xv = _as_rows(x)
    n_heads = xv.shape[1] if xv.dim() == 3 else 1
    n_rows = xv.shape[0] * n_heads
    if residual is None:
        rv, res_out = xv, xv
    else:
        if residual.shape != x.shape:
            raise ValueError(f"residual shape {tuple(residual.shape)} != x {tuple(x.shape)}")
        rv = _as_rows(residual)
        res_out = new_res
    block, num_warps = rms_norm_launch_config(n_cols)
    _rms_norm_kernel[(n_rows,)](
        xv,
        rv,
        weight.contiguous(),
        out,
        res_out,
        n_heads,
        *_row_strides(xv),
        *_row_strides(rv),
        n_cols,
        float(eps),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=num_warps,
    )
    return out, new_res
