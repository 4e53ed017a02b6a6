"""Bidirectional attention over packed sequences (`csrc/packed_attention_bf16.cpp`): an
encoder's batch as one run of tokens, each sequence attending to itself alone, in bf16 on
AMX tiles with fp32 sums.

An embedding batch packed into rows of a fixed width needs a block-diagonal mask, and torch's
SDPA then computes every row's full width squared: 64 texts of 8-64 words (37 rows of 96
tokens, MiniLM's 12 heads of 32) took 4.0 ms a layer in bf16 on 2 cores, with the mask or
without. `packed_attention_reference` is the same in torch, one SDPA call per sequence, for
the tests and for CPUs without AMX.
"""

from __future__ import annotations

import ctypes
import functools

import torch
import torch.nn.functional as F

from pagoda.kernels import cpu_native, linear_bf16

NAME = "packed_attention_bf16"
I32, I64, F32, PTR = cpu_native.I32, cpu_native.I64, cpu_native.F32, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_packed_attention_bf16": (
        None,
        [PTR, I64, PTR, I64, PTR, I64, PTR, PTR, I32, I32, I32, I32, F32, I32],
    ),
}


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


@functools.cache
def available() -> bool:
    """Whether the kernel runs here: AMX tiles, granted by Linux, and a build."""
    return linear_bf16.kernel_amx() and _library() is not None


def supports(query: torch.Tensor, key: torch.Tensor) -> bool:
    """Whether the kernel takes these (tokens, heads, head_dim) rows."""
    heads, dim = query.shape[-2:]
    return (
        query.dtype == key.dtype == torch.bfloat16
        and dim % 32 == 0
        and heads % key.shape[-2] == 0
        and available()
    )


def packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """Attention of (tokens, heads, head_dim) bf16 rows, sequence s owning the tokens
    cu_seqlens[s] to cu_seqlens[s + 1]; key and value have the same or fewer (kv) heads. Each
    tensor's last two dimensions must be dense (a token stride of its own is fine)."""
    tokens, heads, dim = query.shape
    for t in (query, key, value):
        assert t.stride(-1) == 1 and t.stride(-2) == dim, "heads must be dense within a token"
    out = torch.empty(tokens, heads, dim, dtype=torch.bfloat16)
    cu_seqlens = cu_seqlens.to(torch.int32).contiguous()
    _library().pagoda_packed_attention_bf16(
        query.data_ptr(),
        query.stride(0),
        key.data_ptr(),
        key.stride(0),
        value.data_ptr(),
        value.stride(0),
        out.data_ptr(),
        cu_seqlens.data_ptr(),
        len(cu_seqlens) - 1,
        heads,
        key.shape[1],
        dim,
        scale,
        torch.get_num_threads(),
    )
    return out


def packed_attention_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    cu_seqlens: torch.Tensor,
    scale: float,
) -> torch.Tensor:
    """The same as `packed_attention`, in torch: one SDPA call per sequence."""
    out = torch.empty_like(query)
    group = query.shape[1] // key.shape[1]
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds, bounds[1:]):
        q, k, v = (t[start:end].transpose(0, 1) for t in (query, key, value))
        if group > 1:
            k, v = k.repeat_interleave(group, 0), v.repeat_interleave(group, 0)
        out[start:end] = F.scaled_dot_product_attention(q, k, v, scale=scale).transpose(0, 1)
    return out
