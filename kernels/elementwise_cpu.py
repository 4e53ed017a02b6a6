"""RMSNorm, SiLU-and-mul and rotary for fp32 on AVX-512 and AVX2 CPUs
(`csrc/elementwise_cpu.cpp`), with the signatures of the torch references in `norm.py`,
`activation.py` and `rotary.py`, which take every other dtype or layout. At decode batch sizes
the references cost 11 ms of a 120 ms step here (their 3-8 small ops each, 90 times a step),
the kernels about 5.

And an encoder's residual add and LayerNorm in bf16 (`add_layer_norm`): torch's add and bf16
LayerNorm took 0.22 ms over 1,450 rows of 384 (2 cores), the kernel's one pass 0.12-0.14 ms."""

from __future__ import annotations

import ctypes

import torch

from pagoda.kernels import activation, cpu_native, norm, rotary

NAME = "elementwise_cpu"


I32, I64, F32, PTR = cpu_native.I32, cpu_native.I64, cpu_native.F32, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_rms_norm": (None, [PTR, I64, PTR, PTR, PTR, PTR, I32, I32, F32, I32]),
    "pagoda_silu_and_mul": (None, [PTR, I64, PTR, I32, I32, I32]),
    "pagoda_rotary": (None, [PTR, I64, I64, PTR, PTR, PTR, I32, I32, I32, I32]),
    "pagoda_add_layer_norm_bf16": (None, [PTR, PTR, PTR, PTR, PTR, I32, I32, F32, I32]),
    "pagoda_argmax_rows": (None, [PTR, I64, PTR, I32, I32, I32]),
    "pagoda_kth_largest_rows": (None, [PTR, I64, PTR, PTR, I32, I32, I32]),
    "pagoda_top_p_cutoff_rows": (None, [PTR, I64, PTR, PTR, I32, I32, I32]),
    "pagoda_sample_rows": (None, [PTR, I64, PTR, PTR, PTR, I32, I32, I32]),
}


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


def available() -> bool:
    return _library() is not None


def _rows(x: torch.Tensor) -> bool:
    """fp32, 2-D, unit stride within a row: what the kernels read."""
    return x.dtype == torch.float32 and x.dim() == 2 and x.stride(1) == 1


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    if not (_rows(x) and weight.dtype == torch.float32 and weight.is_contiguous()) or (
        residual is not None and not (residual.dtype == torch.float32 and residual.is_contiguous())
    ):
        return norm.rms_norm(x, weight, eps, residual)
    rows, width = x.shape
    out = cpu_native.empty(rows, width)
    new_residual = x if residual is None else cpu_native.empty(rows, width)
    cpu_native.call(
        _library().pagoda_rms_norm,
        x.data_ptr(),
        x.stride(0),
        None if residual is None else residual.data_ptr(),
        weight.data_ptr(),
        out.data_ptr(),
        None if residual is None else new_residual.data_ptr(),
        rows,
        width,
        eps,
        torch.get_num_threads(),
    )
    return out, new_residual


def argmax_rows(logits: torch.Tensor) -> torch.Tensor:
    """`logits.max(dim=-1).indices` of fp32 rows [B, V] on the CPU, in one pass: torch's took
    0.44 ms at 32 x 49,152 (2 cores), the kernel 0.12 (a greedy decode step's sampling)."""
    if not (_rows(logits) and logits.device.type == "cpu" and available()):
        return logits.max(dim=-1).indices
    rows, width = logits.shape
    out = torch.empty(rows, dtype=torch.int64)
    _library().pagoda_argmax_rows(
        logits.data_ptr(), logits.stride(0), out.data_ptr(), rows, width, torch.get_num_threads()
    )
    return out


def kth_largest_rows(x: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the k[b]-th largest value of each row of x [B, V] (int64 k; -inf where k >= V),
    what top-k keeps at and above. On the CPU without sorting (`csrc/elementwise_cpu.cpp`): 0.8
    ms at 32 x 49,152 and k = 50 (2 cores), where torch's sort of the rows took 48."""
    rows, width = x.shape
    if not (_rows(x) and x.device.type == "cpu" and available()):
        kth = x.sort(dim=-1, descending=True).values.gather(1, (k.clamp(max=width) - 1)[:, None])
        return torch.where(k[:, None] < width, kth, float("-inf"))
    k = k.contiguous()
    out = torch.empty(rows, 1)
    _library().pagoda_kth_largest_rows(
        x.data_ptr(),
        x.stride(0),
        k.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        torch.get_num_threads(),
    )
    return out


def top_p_cutoff_rows(probs: torch.Tensor, top_p: torch.Tensor) -> torch.Tensor:
    """[B, 1]: the smallest probability top-p keeps in each row of probs [B, V] (0 where top_p
    >= 1): a token is kept when the tokens more probable than it hold less than top_p of the
    mass, equal ones together. On the CPU a quickselect by mass over the tokens that can be
    kept: 1.1-1.5 ms at 32 x 49,152 and top_p 0.9 (2 cores), against 48 for torch's sort."""
    rows, width = probs.shape
    if not (_rows(probs) and probs.device.type == "cpu" and available()):
        ranked = probs.sort(dim=-1, descending=True).values
        kept = (ranked.cumsum(dim=-1) - ranked < top_p[:, None]).sum(dim=-1, keepdim=True)
        return torch.where(top_p[:, None] < 1, ranked.gather(1, kept - 1), 0.0)
    top_p = top_p.float().contiguous()
    out = torch.empty(rows, 1)
    _library().pagoda_top_p_cutoff_rows(
        probs.data_ptr(),
        probs.stride(0),
        top_p.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        torch.get_num_threads(),
    )
    return out


def sample_rows(
    logits: torch.Tensor, temperature: torch.Tensor, uniform: torch.Tensor
) -> torch.Tensor | None:
    """[B]: a token per row of logits [B, V] from softmax(logits / temperature), the first whose
    cumulative probability passes uniform [B, 1] of the row's total, in one kernel on the CPU:
    0.53 ms at 32 x 49,152 (2 cores) against 5.1 for the torch ops. None where the kernel does
    not take the rows (the caller inverts the distribution with torch)."""
    if not (_rows(logits) and logits.device.type == "cpu" and available()):
        return None
    rows, width = logits.shape
    temperature, uniform = temperature.float().contiguous(), uniform.float().contiguous()
    out = torch.empty(rows, dtype=torch.int64)
    _library().pagoda_sample_rows(
        logits.data_ptr(),
        logits.stride(0),
        temperature.data_ptr(),
        uniform.data_ptr(),
        out.data_ptr(),
        rows,
        width,
        torch.get_num_threads(),
    )
    return out


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    if not _rows(gate_up):
        return activation.silu_and_mul(gate_up)
    rows, width = gate_up.shape
    out = cpu_native.empty(rows, width // 2)
    cpu_native.call(
        _library().pagoda_silu_and_mul,
        gate_up.data_ptr(),
        gate_up.stride(0),
        out.data_ptr(),
        rows,
        width // 2,
        torch.get_num_threads(),
    )
    return out


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    ok = x.dtype == cos.dtype == sin.dtype == torch.float32 and x.dim() == 3 and x.stride(2) == 1
    if not (ok and cos.is_contiguous() and sin.is_contiguous()):
        return rotary.apply_rotary(x, cos, sin)
    tokens, heads, head_dim = x.shape
    out = cpu_native.empty(tokens, heads, head_dim)
    cpu_native.call(
        _library().pagoda_rotary,
        x.data_ptr(),
        x.stride(0),
        x.stride(1),
        cos.data_ptr(),
        sin.data_ptr(),
        out.data_ptr(),
        tokens,
        heads,
        head_dim,
        torch.get_num_threads(),
    )
    return out


def add_layer_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm_layer: torch.nn.LayerNorm
) -> torch.Tensor:
    """`norm_layer(x + residual)`, in one pass where x, residual and the layer are bf16 (any
    leading shape, contiguous)."""
    params = [p for p in (norm_layer.weight, norm_layer.bias) if p is not None]
    tensors = [x, *params] + ([] if residual is None else [residual])
    fits = all(t.dtype == torch.bfloat16 and t.is_contiguous() for t in tensors)
    if not (fits and len(norm_layer.normalized_shape) == 1 and available()):
        return norm_layer(x if residual is None else x + residual)
    width = x.shape[-1]
    out = torch.empty_like(x)
    _library().pagoda_add_layer_norm_bf16(
        x.data_ptr(),
        None if residual is None else residual.data_ptr(),
        None if norm_layer.weight is None else norm_layer.weight.data_ptr(),
        None if norm_layer.bias is None else norm_layer.bias.data_ptr(),
        out.data_ptr(),
        x.numel() // width,
        width,
        norm_layer.eps,
        torch.get_num_threads(),
    )
    return out
