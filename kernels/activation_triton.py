"""SiLU(gate) * up as one Triton kernel (see kernels/activation.py)."""

import torch
import triton
import triton.language as tl


@triton.jit
def _silu_and_mul_kernel(
    gate_up_ptr,
    out_ptr,
    n_cols,
    in_stride_t,
    BLOCK: tl.constexpr,
):
    # One program per (token, block of BLOCK output columns).
    tok = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    row = gate_up_ptr + tok * in_stride_t
    gate = tl.load(row + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(row + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    out = gate * tl.sigmoid(gate) * up
    tl.store(out_ptr + tok * n_cols + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_launch_config(n_cols: int) -> tuple[int, int]:
    """(BLOCK, num_warps): up to 1024 output columns per program."""
    block = min(triton.next_power_of_2(n_cols), 1024)
    num_warps = 4 if block >= 512 else 1
    return block, num_warps


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """Same contract as kernels.activation.silu_and_mul: the last dim of gate_up is
    [gate | up] (2 * I); returns a new [..., I] tensor."""
    if gate_up.shape[-1] % 2:
        raise ValueError(f"last dim must be even ([gate | up]), got {gate_up.shape[-1]}")
    n_cols = gate_up.shape[-1] // 2
    out = torch.empty((*gate_up.shape[:-1], n_cols), dtype=gate_up.dtype, device=gate_up.device)
    if out.numel() == 0:
        return out
    rows = gate_up.reshape(-1, 2 * n_cols)
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    block, num_warps = silu_and_mul_launch_config(n_cols)
    grid = (rows.shape[0], triton.cdiv(n_cols, block))
    _silu_and_mul_kernel[grid](rows, out, n_cols, rows.stride(0), BLOCK=block, num_warps=num_warps)
    return out
