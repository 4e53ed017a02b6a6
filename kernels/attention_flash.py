"""Paged attention through flash-attn's varlen kernel, when flash-attn is installed.

An optional fast path, never a dependency (it has no binary wheel; it builds with nvcc).
flash-attn 2 reads the cache through the block tables itself, but only for pages of a multiple
of 256 tokens, in fp16 or bf16, with a head size that is a multiple of 8 up to 256, on an
Ampere or newer GPU: `usable` tells whether a model and cache qualify, else the Triton path
serves (an fp32 entry would otherwise fail at its first step).
"""

from __future__ import annotations

import importlib.util

import torch

from pagoda.kernels.attention import AttentionMetadata
from pagoda.kernels.attention_triton import write_kv_cache

__all__ = ["paged_attention", "usable", "write_kv_cache"]


PAGE_MULTIPLE = 256
DTYPES = (torch.float16, torch.bfloat16)
MAX_HEAD_DIM = 256
MIN_CAPABILITY = (8, 0)


def usable(block_size: int, dtype: torch.dtype, head_dim: int, device: torch.device) -> bool:
    return (
        block_size % PAGE_MULTIPLE == 0
        and dtype in DTYPES
        and head_dim % 8 == 0
        and head_dim <= MAX_HEAD_DIM
        and device.type == "cuda"
        and importlib.util.find_spec("flash_attn") is not None
        and torch.cuda.get_device_capability(device) >= MIN_CAPABILITY
    )


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    meta: AttentionMetadata,
    scale: float,
) -> torch.Tensor:
    from flash_attn import flash_attn_varlen_func

    cu_seqlens_k = torch.zeros_like(meta.query_start_loc)
    torch.cumsum(meta.seq_lens, dim=0, out=cu_seqlens_k[1:])
    return flash_attn_varlen_func(
        q,
        k_cache,
        v_cache,
        cu_seqlens_q=meta.query_start_loc,
        cu_seqlens_k=cu_seqlens_k,
        max_seqlen_q=meta.max_query_len,
        max_seqlen_k=meta.max_seq_len,
        softmax_scale=scale,
        causal=True,  # bottom-right aligned: queries are the last tokens of their sequence
        block_table=meta.block_tables,
    )
