"""Device code. Each op has a plain torch reference; Triton versions will sit beside them."""

from kernels.activation import silu_and_mul
from kernels.attention import AttentionMetadata, paged_attention, write_kv_cache
from kernels.norm import rms_norm
from kernels.rotary import apply_rotary, rotary_cos_sin_cache

__all__ = [
    "AttentionMetadata",
    "apply_rotary",
    "paged_attention",
    "rms_norm",
    "rotary_cos_sin_cache",
    "silu_and_mul",
    "write_kv_cache",
]
