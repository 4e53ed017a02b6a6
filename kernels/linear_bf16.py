"""bf16 linear layers on CPUs with AMX or AVX512-BF16, through oneDNN's packed weights in torch
(`mkldnn._reorder_linear_weight` / `_linear_pointwise`).

The rest of a bf16 model on such a CPU keeps fp32 activations (the residual stream, norms,
rotary and attention queries run in the fp32 C++ kernels): each layer casts its input to bf16,
oneDNN multiplies with fp32 accumulation on the AMX tiles, and the bf16 result comes back as
fp32. All of SmolLM2-135M's matmuls (`benchmarks/linear_bf16.py`, one thread, busy machine) took
3.0x less time than fp32 `F.linear` at 32 rows, 5.6x at 256 and 1.25x at 1 row (half the bytes
to read), and beat bf16 `F.linear` and the fp32 GEMM of `linear_cpu` at each.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import nn


@functools.cache
def available() -> bool:
    """Whether oneDNN runs bf16 natively here (AMX or AVX512-BF16), not through emulation."""
    if not torch.backends.mkldnn.is_available():
        return False
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return False
    return cpu_flags() & {"amx_bf16", "avx512_bf16"} != set()


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux /proc/cpuinfo; empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def describe() -> str:
    """What oneDNN will use, for the start-up log."""
    flags = cpu_flags()
    units = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return "+".join(units) or "no native bf16"


def padded_rows(rows: int) -> int:
    """The row count a multiply of `rows` rows runs at. oneDNN compiles a kernel for every new
    shape it meets (4-7 ms per layer shape here, `benchmarks/linear_bf16.py --jit`), so prefill
    chunks and embedding batches, whose row counts rarely repeat, paid more for compiling than
    for multiplying. Above 32 rows, counts are rounded up to one of 16 sizes per power of two
    (at most 6.25% more rows, zeros); up to 32 they are few, and kept exact."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


class OneDNNLinear(nn.Module):
    """`nn.Linear` with its weight in bf16, packed by oneDNN; takes and gives fp32 or bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        packed = torch.ops.mkldnn._reorder_linear_weight(weight.detach().bfloat16().contiguous())
        # an opaque oneDNN tensor: kept as an attribute, as module.to() and state_dict cannot
        # handle it
        self.packed = packed
        self.bias = None if bias is None else bias.detach().bfloat16().contiguous()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features).to(torch.bfloat16)
        rows = x.shape[0]
        if (padded := padded_rows(rows)) != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y[:rows].view(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16 oneDNN"


def pack_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of a loaded CPU model for a `OneDNNLinear`, and give a model with
    tied embeddings a packed lm_head. Returns how many were packed."""
    swaps = [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if type(child) is nn.Linear
    ]
    for parent, name, child in swaps:
        setattr(parent, name, OneDNNLinear(child.weight, child.bias))
    count = len(swaps)
    if getattr(model, "tie_word_embeddings", False) and model.lm_head is None:
        model.lm_head = OneDNNLinear(model.embed_tokens.weight)
        count += 1
    return count
