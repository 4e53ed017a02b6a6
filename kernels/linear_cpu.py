"""fp32 linear layers on AVX-512 and AVX2 CPUs through a GEMM of our own (`csrc/linear_cpu.cpp`).

A decode step multiplies a few dozen rows by every weight of the model. MKL, which `F.linear`
calls, is built for large products: at 32 rows it reaches 110-120 GFLOP/s on the 2-core
AVX-512 machines here, where the kernel, streaming each weight panel once while it computes,
reaches about 200 (AVX2 EPYC: 87 against 149); on prefill-sized batches it stays within 10% of
MKL. Weights are repacked once, after loading, into the kernel's panel layout.

The panels may hold bf16 instead of fp32 (`weight_dtype`): the kernel widens them as they load
and computes in fp32, so a CPU without bf16 arithmetic (AVX2, AVX-512 before AVX512-BF16)
streams half the bytes where a decode step is bound by reading the weights.
"""

from __future__ import annotations

import ctypes

import torch
from torch import nn

from pagoda.kernels import cpu_native

NAME = "linear_cpu"


I32, I64, PTR = cpu_native.I32, cpu_native.I64, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_packed_size": (I64, [I32, I32]),
    "pagoda_pack_weight": (None, [PTR, PTR, I32, I32]),
    "pagoda_pack_weight_bf16": (None, [PTR, PTR, I32, I32]),
    "pagoda_linear": (None, [PTR, I64, PTR, PTR, PTR, I64, I32, I32, I32, I32]),
    "pagoda_linear_bf16_weights": (None, [PTR, I64, PTR, PTR, PTR, I64, I32, I32, I32, I32]),
}
WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _library() -> ctypes.CDLL | None:
    return cpu_native.load(NAME, SIGNATURES)


class PackedLinear(nn.Module):
    """`nn.Linear` (fp32 input and output, CPU) with its weight in the kernel's panel layout,
    held in `weight_dtype` (fp32, or bf16 rounded to nearest even), in `arena` if given."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        weight_dtype: torch.dtype = torch.float32,
        arena: cpu_native.Arena | None = None,
    ) -> None:
        super().__init__()
        lib = _library()
        if lib is None:
            raise RuntimeError(f"{NAME} is unavailable: {cpu_native.unavailable_reason(NAME)}")
        if weight.dtype != torch.float32 or weight.device.type != "cpu":
            raise ValueError(f"PackedLinear takes fp32 CPU weights, got {weight.dtype}")
        if weight_dtype not in WEIGHT_DTYPES:
            raise ValueError(f"weight_dtype must be fp32 or bf16, got {weight_dtype}")
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().contiguous()
        size = lib.pagoda_packed_size(self.out_features, self.in_features)
        packed = torch.empty(size, dtype=weight_dtype) if arena is None else arena.take(size)
        if weight_dtype == torch.float32:
            pack, self._linear = lib.pagoda_pack_weight, lib.pagoda_linear
        else:
            pack, self._linear = lib.pagoda_pack_weight_bf16, lib.pagoda_linear_bf16_weights
        pack(weight.data_ptr(), packed.data_ptr(), self.out_features, self.in_features)
        self.register_buffer("packed", packed)
        self.register_buffer("bias", None if bias is None else bias.detach().float().contiguous())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.stride(1) != 1 or x.dtype != torch.float32:
            x = x.float().contiguous()
        rows = x.shape[0]
        y = cpu_native.empty(rows, self.out_features)
        if rows:
            cpu_native.call(
                self._linear,
                x.data_ptr(),
                x.stride(0),
                self.packed.data_ptr(),
                None if self.bias is None else self.bias.data_ptr(),
                y.data_ptr(),
                self.out_features,
                rows,
                self.out_features,
                self.in_features,
                torch.get_num_threads(),
            )
        return y.view(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"weight_dtype={self.packed.dtype}"
        )


def pack_linears(model: nn.Module, weight_dtype: torch.dtype = torch.float32) -> int:
    """Swap every fp32 `nn.Linear` of a loaded CPU model for a `PackedLinear` holding its weight
    in `weight_dtype`, and give a model with tied embeddings a packed lm_head, all in one
    `cpu_native.Arena` (2 MiB pages). Returns how many were packed (0 without the kernel)."""
    lib = _library()
    if lib is None:
        return 0
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear and child.weight.dtype == torch.float32
    ]
    tied = getattr(model, "tie_word_embeddings", False) and model.lm_head is None
    tied = tied and model.embed_tokens.weight.dtype == torch.float32
    weights = [child.weight for _, _, child in swaps] + (
        [model.embed_tokens.weight] if tied else []
    )
    arena = cpu_native.Arena([lib.pagoda_packed_size(*w.shape) for w in weights], weight_dtype)
    for parent, name, child in swaps:
        setattr(parent, name, PackedLinear(child.weight, child.bias, weight_dtype, arena))
    if tied:
        model.lm_head = PackedLinear(model.embed_tokens.weight, None, weight_dtype, arena)
    return len(weights)
