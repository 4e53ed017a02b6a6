"""bf16 linear layers on CPUs with AMX or AVX512-BF16, through oneDNN's packed weights in torch
(`mkldnn._reorder_linear_weight` / `_linear_pointwise`).

The rest of a bf16 model on such a CPU keeps fp32 activations (the residual stream, norms,
rotary and attention queries run in the fp32 C++ kernels): each layer casts its input to bf16,
oneDNN multiplies with fp32 accumulation on the AMX tiles, and the bf16 result comes back as
fp32. All of SmolLM2-135M's matmuls (`benchmarks/linear_bf16.py`, one thread, busy machine) took
3.0x less time than fp32 `F.linear` at 32 rows, 5.6x at 256 and 1.25x at 1 row (half the bytes
to read), and beat bf16 `F.linear` and the fp32 GEMM of `linear_cpu` at each.

At a decode step's few rows the matmul is bound by reading the weights, which oneDNN streams
at about 60% of the copy bandwidth. Up to `GEMV_ROWS` rows go to a kernel of our own instead
(`csrc/linear_bf16.cpp`, AVX512-BF16), which reads its own copy of the weights at close to
copy speed; larger batches keep oneDNN's AMX kernels. The two copies double the bf16 weight
memory (SmolLM2-135M: 270 MB more): oneDNN also takes a plain bf16 weight, which the kernel
could share, but reorders it on every call, 30-40% slower at 32 and 256 rows.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from pagoda.kernels import cpu_native

NAME = "linear_bf16"
# the most rows that go to the kernel rather than oneDNN (benchmarks/linear_bf16.py)
GEMV_ROWS = 4

I32, I64, PTR = cpu_native.I32, cpu_native.I64, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_bf16_packed_size": (I64, [I32, I32]),
    "pagoda_bf16_pack_weight": (None, [PTR, PTR, I32, I32]),
    "pagoda_bf16_linear": (None, [PTR, I64, I32, PTR, PTR, PTR, I64, I32, I32, I32, I32]),
}


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


def gemv_library() -> ctypes.CDLL | None:
    """The small-batch kernel, where the CPU has AVX512-BF16 and it builds; else None."""
    if "avx512_bf16" not in cpu_flags():
        return None
    return cpu_native.load(NAME, SIGNATURES)


def describe() -> str:
    """What oneDNN will use, for the start-up log."""
    flags = cpu_flags()
    units = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    return "+".join(units) or "no native bf16"


class OneDNNLinear(nn.Module):
    """`nn.Linear` with its weight in bf16, packed by oneDNN and, where the CPU has
    AVX512-BF16, also in the small-batch kernel's panels; takes and gives fp32 or bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().bfloat16().contiguous()
        # an opaque oneDNN tensor: kept as an attribute, as module.to() and state_dict cannot
        # handle it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if bias is None else bias.detach().bfloat16().contiguous()
        self._lib = gemv_library()
        self.panels = None if self._lib is None else self._pack_panels(weight)
        # the kernel adds the bf16 bias in fp32, as oneDNN does
        self.bias_fp32 = None if self.bias is None else self.bias.float()

    def _pack_panels(self, weight: torch.Tensor) -> torch.Tensor:
        n, k = self.out_features, self.in_features
        panels = torch.empty(self._lib.pagoda_bf16_packed_size(n, k), dtype=torch.bfloat16)
        self._lib.pagoda_bf16_pack_weight(weight.data_ptr(), panels.data_ptr(), n, k)
        return panels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if self.panels is not None and x.shape[0] <= GEMV_ROWS:
            y = self._gemv(x)
        else:
            x = x.to(torch.bfloat16)
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y.view(*lead, self.out_features).to(dtype)

    def _gemv(self, x: torch.Tensor) -> torch.Tensor:
        """fp32 y of the kernel, for fp32 or bf16 x with unit stride in a row."""
        if x.dtype not in (torch.float32, torch.bfloat16) or x.stride(-1) != 1:
            x = x.float().contiguous()
        rows = x.shape[0]
        y = torch.empty(rows, self.out_features)
        if rows:
            self._lib.pagoda_bf16_linear(
                x.data_ptr(),
                x.stride(0),
                x.dtype == torch.bfloat16,
                self.panels.data_ptr(),
                None if self.bias_fp32 is None else self.bias_fp32.data_ptr(),
                y.data_ptr(),
                self.out_features,
                rows,
                self.out_features,
                self.in_features,
                torch.get_num_threads(),
            )
        return y

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        if self.panels is None:
            return f"{shape}, bf16 oneDNN"
        return f"{shape}, bf16 oneDNN, kernel up to {GEMV_ROWS} rows"


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
