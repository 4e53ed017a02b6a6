"""Which set of device ops a model runs. Each op has a plain torch reference
(`kernels/<op>.py`) and a Triton version with the same signature (`kernels/<op>_triton.py`);
a model gets one set through `select`.

`kernels/` has no `__init__.py` on purpose: it is installed as `pagoda.kernels`, and a
namespace folder never shadows the PyPI distribution named `kernels` (which transformers
imports) when the repository's root is on `sys.path` (`python -m pagoda` from a checkout,
pytest)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from pagoda.kernels import activation, attention, attention_cpu, elementwise_cpu, moe, norm, rotary

BACKENDS = ("auto", "torch", "triton")


@dataclass(frozen=True, slots=True)
class Kernels:
    name: str
    rms_norm: Callable
    apply_rotary: Callable
    silu_and_mul: Callable
    write_kv_cache: Callable
    paged_attention: Callable
    fused_moe: Callable


TORCH = Kernels(
    "torch",
    norm.rms_norm,
    rotary.apply_rotary,
    activation.silu_and_mul,
    attention.write_kv_cache,
    attention.paged_attention,
    moe.fused_moe,
)


# fp32 on AVX-512 and AVX2 CPUs: kernels in C++ (`csrc/`) that fall back to the torch references for
# other dtypes and layouts; the loader gives the model's linear layers the CPU GEMM there too
# (`linear_cpu`).
CPU = Kernels(
    "cpu",
    elementwise_cpu.rms_norm,
    elementwise_cpu.apply_rotary,
    elementwise_cpu.silu_and_mul,
    attention_cpu.write_kv_cache,
    attention_cpu.paged_attention,
    moe.fused_moe,
)


def select(
    backend: str,
    device: torch.device,
    block_size: int = 16,
    dtype: torch.dtype = torch.float32,
    head_dim: int = 128,
) -> Kernels:
    """`auto`: Triton on CUDA (attention through flash-attn where it is installed and the
    cache pages, dtype and head size suit it), `CPU` on a CPU that can build it, the torch
    reference elsewhere. `triton` on a CPU works only under TRITON_INTERPRET=1 (the tests use
    it so)."""
    if backend not in BACKENDS:
        raise ValueError(f"kernel backend must be one of {BACKENDS}, got {backend!r}")
    on_cpu = backend == "auto" and device.type == "cpu"
    if on_cpu and attention_cpu.available() and elementwise_cpu.available():
        return CPU
    if backend == "torch" or (backend == "auto" and device.type != "cuda"):
        return TORCH
    # imported here: triton is needed only where it runs
    from pagoda.kernels import (
        activation_triton,
        attention_flash,
        attention_triton,
        moe_triton,
        norm_triton,
        rotary_triton,
        triton_compile_log,
    )

    triton_compile_log.log_compilations()
    flash = backend == "auto" and attention_flash.usable(block_size, dtype, head_dim, device)
    return Kernels(
        "triton+flash-attn" if flash else "triton",
        norm_triton.rms_norm,
        rotary_triton.apply_rotary,
        activation_triton.silu_and_mul,
        attention_triton.write_kv_cache,
        attention_flash.paged_attention if flash else attention_triton.paged_attention,
        moe_triton.fused_moe,
    )
