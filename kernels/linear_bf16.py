"""bf16 linear layers on CPUs with AMX or AVX512-BF16: a kernel of our own for a few rows, and
oneDNN's packed weights in torch (`mkldnn._reorder_linear_weight` / `_linear_pointwise`) for
more.

The rest of a bf16 model on such a CPU keeps fp32 activations (the residual stream, norms,
rotary and attention queries run in the fp32 C++ kernels): each layer casts its input to bf16,
oneDNN multiplies with fp32 accumulation on the AMX tiles, and the bf16 result comes back as
fp32. All of SmolLM2-135M's matmuls (`benchmarks/linear_bf16.py`, one thread, busy machine) took
3.0x less time than fp32 `F.linear` at 32 rows, 5.6x at 256 and 1.25x at 1 row (half the bytes
to read), and beat bf16 `F.linear` and the fp32 GEMM of `linear_cpu` at each.

At a decode step's few rows the matmul is bound by reading the weights, which oneDNN streams
at 60-70% of the copy bandwidth. Up to `kernel_rows()` rows go to a kernel of our own instead
(`csrc/linear_bf16.cpp`), which reads its own copy of the weights at close to copy speed: on
AMX tiles up to 64 rows (each tile instruction takes 16 rows, so rows cost little while the
weights stream), with AVX512-BF16 alone up to 4 (past that its arithmetic shows). Larger
batches keep oneDNN. The two copies double the bf16 weight memory (SmolLM2-135M: 270 MB
more): one plain copy could serve both, as oneDNN also takes an unpacked bf16 weight, but it
then reorders it on every call, 30-40% slower at 32 and 256 rows. The kernel returns its fp32
sums; oneDNN rounds its results to bf16.
"""

from __future__ import annotations

import ctypes
import functools

import torch
from torch import nn

from pagoda.kernels import cpu_native

NAME = "linear_bf16"
# the most rows that go to the kernel rather than oneDNN (benchmarks/linear_bf16.py, 2 cores:
# on AMX ahead of oneDNN up to 64 rows and level at 128; AVX512-BF16 ahead up to 4)
AMX_ROWS, AVX512_ROWS = 64, 4

I32, I64, PTR = cpu_native.I32, cpu_native.I64, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_bf16_enable_amx": (I32, []),
    "pagoda_bf16_packed_size": (I64, [I32, I32]),
    "pagoda_bf16_pack_weight": (None, [PTR, PTR, I32, I32]),
    "pagoda_bf16_linear": (None, [PTR, I64, I32, PTR, PTR, PTR, I64, I32, I32, I32, I32, I32]),
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


def kernel_library() -> ctypes.CDLL | None:
    """The small-batch kernel, where the CPU has AVX512-BF16 and it builds; else None."""
    if "avx512_bf16" not in cpu_flags():
        return None
    return cpu_native.load(NAME, SIGNATURES)


@functools.cache
def kernel_amx() -> bool:
    """Whether the kernel runs on AMX tiles: the CPU has them and Linux grants their state."""
    lib = kernel_library()
    return lib is not None and "amx_bf16" in cpu_flags() and bool(lib.pagoda_bf16_enable_amx())


def kernel_rows() -> int:
    """The most rows a `OneDNNLinear` gives the kernel (0 without it)."""
    if kernel_library() is None:
        return 0
    return AMX_ROWS if kernel_amx() else AVX512_ROWS


def pack_panels(weight: torch.Tensor) -> torch.Tensor:
    """A bf16 [N, K] weight in the kernel's layout of 32-row panels."""
    lib = kernel_library()
    n, k = weight.shape
    weight = weight.detach().bfloat16().contiguous()
    panels = torch.empty(lib.pagoda_bf16_packed_size(n, k), dtype=torch.bfloat16)
    lib.pagoda_bf16_pack_weight(weight.data_ptr(), panels.data_ptr(), n, k)
    return panels


def panel_linear(
    x: torch.Tensor,
    panels: torch.Tensor,
    bias: torch.Tensor | None,
    out_features: int,
    amx: bool,
) -> torch.Tensor:
    """fp32 x @ W^T (+ bias) of 2-D fp32 or bf16 x, W packed by `pack_panels`, an fp32 bias,
    on AMX tiles or with AVX512-BF16 (either computes any number of rows)."""
    if x.dtype not in (torch.float32, torch.bfloat16) or x.stride(-1) != 1:
        x = x.float().contiguous()
    rows, in_features = x.shape
    y = torch.empty(rows, out_features)
    if rows:
        kernel_library().pagoda_bf16_linear(
            x.data_ptr(),
            x.stride(0),
            x.dtype == torch.bfloat16,
            panels.data_ptr(),
            None if bias is None else bias.data_ptr(),
            y.data_ptr(),
            out_features,
            rows,
            out_features,
            in_features,
            torch.get_num_threads(),
            amx,
        )
    return y


def describe() -> str:
    """What the bf16 linears run on, for the start-up log."""
    flags = cpu_flags()
    units = [name for name in ("amx_bf16", "avx512_bf16") if name in flags]
    onednn = "+".join(units) or "no native bf16"
    if not kernel_rows():
        return f"oneDNN on {onednn}"
    kernel = "AMX" if kernel_amx() else "AVX512-BF16"
    return f"pagoda's {kernel} kernel up to {kernel_rows()} rows, oneDNN on {onednn} past that"


class OneDNNLinear(nn.Module):
    """`nn.Linear` with its weight in bf16, packed by oneDNN and, where the kernel runs, also
    in its panels for batches of up to `kernel_rows()`; takes and gives fp32 or bf16."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().bfloat16().contiguous()
        # an opaque oneDNN tensor: kept as an attribute, as module.to() and state_dict cannot
        # handle it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if bias is None else bias.detach().bfloat16().contiguous()
        self.kernel_rows = kernel_rows()
        self.amx = kernel_amx()
        self.panels = pack_panels(weight) if self.kernel_rows else None
        # the kernel adds the bf16 bias in fp32, as oneDNN does
        self.bias_fp32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        lead = x.shape[:-1]
        x = x.reshape(-1, self.in_features)
        if x.shape[0] <= self.kernel_rows:
            y = panel_linear(x, self.panels, self.bias_fp32, self.out_features, self.amx)
        else:
            x = x.to(torch.bfloat16)
            y = torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return y.view(*lead, self.out_features).to(dtype)

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}"
        return f"{shape}, bf16, kernel up to {self.kernel_rows} rows, oneDNN past that"


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
