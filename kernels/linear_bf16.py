"""bf16 linear layers on CPUs with AMX or AVX512-BF16: a kernel of our own (on AMX for every
batch, with AVX512-BF16 alone for a few rows), and oneDNN's packed weights in torch
(`mkldnn._reorder_linear_weight` / `_linear_pointwise`) for the rest.

The rest of a bf16 model on such a CPU keeps fp32 activations (the residual stream, norms,
rotary and attention queries run in the fp32 C++ kernels): each layer rounds its input to
bf16 and multiplies with fp32 accumulation. oneDNN alone (the path before the kernel) took
3.0x less time than fp32 `F.linear` over all of SmolLM2-135M's matmuls at 32 rows, 5.6x at
256 and 1.25x at 1 row (`benchmarks/linear_bf16.py`, one thread, busy machine).

At a decode step's few rows the matmul is bound by reading the weights, which oneDNN streams
at 60-70% of the copy bandwidth. A kernel of our own (`csrc/linear_bf16.cpp`) reads them at
close to copy speed from its own layout, with fp32 x rounded to bf16 inside it and fp32 sums
out (oneDNN rounds its results to bf16). On AMX tiles it takes every batch: each tile
instruction covers 16 rows, so rows cost little while the weights stream, and at prefill
sizes it keeps level with oneDNN or ahead (`benchmarks/linear_bf16.py`), so the weights are
held once, in the kernel's layout. A lone row goes through vdpbf16ps even there (faster at
one row, see the kernel), whose sums may differ from the tiles' in the last bits. With
AVX512-BF16 alone its arithmetic shows past 4 rows: larger batches go to oneDNN, and the
weights are held twice, in both layouts (SmolLM2-135M: 270 MB more). One plain copy could
serve both, as oneDNN also takes an unpacked bf16 weight, but it then reorders it on every
call, 30-40% slower at 32 and 256 rows.
"""

from __future__ import annotations

import ctypes
import functools
import sys
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import cpu_native

NAME = "linear_bf16"
# the most rows that go to the kernel rather than oneDNN (benchmarks/linear_bf16.py, 2 cores:
# on AMX level with oneDNN or ahead at every size; AVX512-BF16 ahead up to 4)
AMX_ROWS, AVX512_ROWS = sys.maxsize, 4

I32, I64, PTR = cpu_native.I32, cpu_native.I64, cpu_native.PTR
SIGNATURES: cpu_native.Signatures = {
    "pagoda_bf16_enable_amx": (I32, []),
    "pagoda_bf16_packed_size": (I64, [I32, I32]),
    "pagoda_bf16_pack_weight": (None, [PTR, PTR, I32, I32]),
    "pagoda_bf16_linear": (None, [PTR, I64, I32, PTR, PTR, PTR, I64, I32, I32, I32, I32, I32]),
    "pagoda_bf16_linear_silu_mul": (None, [PTR, I64, I32, PTR, PTR, I64, I32, I32, I32, I32]),
}
# gate and up rows per panel half of the fused MLP projection (the kernel's 32-row panels)
SILU_MUL_ROWS = 16


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


def kernel_rows(amx: bool) -> int:
    """The most rows a `Bf16Linear` gives the kernel (0 without it)."""
    if kernel_library() is None:
        return 0
    return AMX_ROWS if amx else AVX512_ROWS


def pack_panels(weight: torch.Tensor, arena: cpu_native.Arena | None = None) -> torch.Tensor:
    """A bf16 [N, K] weight in the kernel's layout of 32-row panels (in `arena` if given)."""
    lib = kernel_library()
    n, k = weight.shape
    weight = weight.detach().bfloat16().contiguous()
    size = lib.pagoda_bf16_packed_size(n, k)
    panels = torch.empty(size, dtype=torch.bfloat16) if arena is None else arena.take(size)
    lib.pagoda_bf16_pack_weight(weight.data_ptr(), panels.data_ptr(), n, k)
    return panels


def unpack_panels(panels: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """The bf16 [N, K] weight back from `pack_panels`' layout."""
    pairs = ((in_features + 1) // 2 + 15) // 16 * 16  # as the kernel pads k
    grid = panels.view(-1, pairs, 32, 2).permute(0, 2, 1, 3).reshape(-1, 2 * pairs)
    return grid[:out_features, :in_features].contiguous()


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
    y = cpu_native.empty(rows, out_features)
    if rows:
        cpu_native.call(
            kernel_library().pagoda_bf16_linear,
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
    onednn = f"oneDNN on {'+'.join(units) or 'no native bf16'}"
    rows = kernel_rows(kernel_amx())
    if rows == AMX_ROWS:
        return "pagoda's AMX kernel"
    if rows:
        return f"pagoda's AVX512-BF16 kernel up to {rows} rows, {onednn} past that"
    return onednn


def padded_rows(rows: int) -> int:
    """The row count oneDNN multiplies `rows` rows at. It compiles a kernel for every new
    shape it meets (4-7 ms per layer shape here, `benchmarks/linear_bf16.py --jit`), so prefill
    chunks and embedding batches, whose row counts rarely repeat, paid more for compiling than
    for multiplying. Above 32 rows, counts are rounded up to one of 16 sizes per power of two
    (at most 6.25% more rows, zeros); up to 32 they are few, and kept exact."""
    if rows <= 32:
        return rows
    step = 1 << (rows.bit_length() - 5)
    return -(-rows // step) * step


class Bf16Linear(nn.Module):
    """`nn.Linear` with its weight in bf16, in the kernel's panels for batches of up to
    `kernel_rows` (every batch, on AMX) and packed by oneDNN for larger ones; takes fp32 or
    bf16 and gives the same, or fp32 always with `fp32_out` (a down_proj reading the bf16 of
    `Bf16GateUpSiluMul` into the fp32 residual stream). `amx` (default: where it runs) picks
    the kernel's instructions."""

    def __init__(
        self,
        weight: torch.Tensor,
        bias: torch.Tensor | None = None,
        amx: bool | None = None,
        fp32_out: bool = False,
        arena: cpu_native.Arena | None = None,
    ) -> None:
        super().__init__()
        self.fp32_out = fp32_out
        self.out_features, self.in_features = weight.shape
        weight = weight.detach().bfloat16().contiguous()
        self.amx = kernel_amx() if amx is None else amx
        self.kernel_rows = kernel_rows(self.amx)
        self.panels = pack_panels(weight, arena) if self.kernel_rows else None
        # an opaque oneDNN tensor: kept as an attribute, as module.to() and state_dict cannot
        # handle it
        self.packed = None
        if self.kernel_rows < AMX_ROWS:
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if bias is None else bias.detach().bfloat16().contiguous()
        # the kernel adds the bf16 bias in fp32, as oneDNN does
        self.bias_fp32 = None if self.bias is None else self.bias.float()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # the engine's 2-D fp32 rows skip the reshapes and casts (each ~0.7 us, 120 calls a step)
        shape = x.shape
        flat = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        if flat.shape[0] <= self.kernel_rows:
            y = panel_linear(flat, self.panels, self.bias_fp32, self.out_features, self.amx)
        else:
            y = self._onednn(flat.to(torch.bfloat16))
        if x.dim() != 2:
            y = y.view(*shape[:-1], self.out_features)
        out_dtype = torch.float32 if self.fp32_out else x.dtype
        return y if y.dtype == out_dtype else y.to(out_dtype)

    def _onednn(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if (padded := padded_rows(rows)) != rows:
            x = F.pad(x, (0, 0, 0, padded - rows))
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")[:rows]

    def extra_repr(self) -> str:
        shape = f"in_features={self.in_features}, out_features={self.out_features}, bf16"
        if self.kernel_rows == AMX_ROWS:
            return f"{shape}, AMX kernel"
        return f"{shape}, kernel up to {self.kernel_rows} rows, oneDNN past that"


class Bf16GateUpSiluMul(nn.Module):
    """An MLP's gate_up projection (gate rows, then up rows) with silu(gate) * up applied in
    the same kernel, on AMX: gives down_proj's input in bf16, the very bits down_proj would
    round the fp32 product to. The fp32 gate_up (twice the output) is never written, and the
    activation's own pass over it is gone."""

    applies_silu_and_mul = True

    def __init__(self, weight: torch.Tensor, arena: cpu_native.Arena | None = None) -> None:
        super().__init__()
        width, self.in_features = weight.shape
        self.out_features = width // 2
        weight = weight.detach().bfloat16()
        # gate rows 0-15, up rows 0-15, gate rows 16-31, ...: each panel holds 16 outputs
        halves = weight.view(2, -1, SILU_MUL_ROWS, self.in_features).transpose(0, 1)
        self.panels = pack_panels(halves.reshape(width, self.in_features), arena)

    def weight(self) -> torch.Tensor:
        """The bf16 [2 * out_features, in_features] weight back: gate rows, then up rows."""
        width = 2 * self.out_features
        interleaved = unpack_panels(self.panels, width, self.in_features)
        halves = interleaved.view(-1, 2, SILU_MUL_ROWS, self.in_features).transpose(0, 1)
        return halves.reshape(width, self.in_features)

    @staticmethod
    def fits(linear: nn.Module) -> bool:
        """Whether `linear` (an MLP's gate_up) can be fused: AMX, no bias, whole panels."""
        width = getattr(linear, "out_features", 1)
        shape_ok = width % (2 * SILU_MUL_ROWS) == 0 and getattr(linear, "bias", None) is None
        return shape_ok and type(linear) is nn.Linear and kernel_amx()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype not in (torch.float32, torch.bfloat16) or x.dim() != 2 or x.stride(-1) != 1:
            x = x.reshape(-1, self.in_features).float().contiguous()
        rows = x.shape[0]
        out = cpu_native.empty(rows, self.out_features, dtype=torch.bfloat16)
        if rows:
            cpu_native.call(
                kernel_library().pagoda_bf16_linear_silu_mul,
                x.data_ptr(),
                x.stride(0),
                x.dtype == torch.bfloat16,
                self.panels.data_ptr(),
                out.data_ptr(),
                self.out_features,
                rows,
                2 * self.out_features,
                self.in_features,
                torch.get_num_threads(),
            )
        return out

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bf16, AMX"


def child_modules(
    model: nn.Module, keep: Callable[[nn.Module], bool]
) -> list[tuple[nn.Module, str, nn.Module]]:
    """Every (parent, name, child) below `model` whose child `keep` takes, listed before the
    caller swaps any."""
    return [
        (parent, name, child)
        for parent in model.modules()
        for name, child in parent.named_children()
        if keep(child)
    ]


def pack_linears(model: nn.Module, fuse_gate_up: bool = True) -> int:
    """Swap every `nn.Linear` of a loaded CPU model for a `Bf16Linear` (an MLP's gate_up, on
    AMX and with `fuse_gate_up`, for a `Bf16GateUpSiluMul`), and give a model with tied
    embeddings a packed lm_head. Returns how many were packed. The kernel's weights share one
    `cpu_native.Arena`."""
    fits = Bf16GateUpSiluMul.fits if fuse_gate_up else lambda linear: False
    mlps = [m for m in model.modules() if fits(getattr(m, "gate_up_proj", 0))]
    gate_ups = {id(mlp.gate_up_proj) for mlp in mlps}
    swaps = child_modules(
        model, lambda child: type(child) is nn.Linear and id(child) not in gate_ups
    )
    tied = getattr(model, "tie_word_embeddings", False) and model.lm_head is None
    weights = [child.weight for _, _, child in swaps] + [m.gate_up_proj.weight for m in mlps]
    weights += [model.embed_tokens.weight] if tied else []
    sizes = [kernel_library().pagoda_bf16_packed_size(n, k) for n, k in (w.shape for w in weights)]
    arena = cpu_native.Arena(sizes, torch.bfloat16) if kernel_rows(kernel_amx()) else None
    for mlp in mlps:
        mlp.gate_up_proj = Bf16GateUpSiluMul(mlp.gate_up_proj.weight, arena)
    fused_mlps = {id(mlp) for mlp in mlps}
    for parent, name, child in swaps:
        # the down_proj after a fused gate_up reads bf16 and writes the fp32 residual stream
        fp32_out = id(parent) in fused_mlps and name == "down_proj"
        setattr(parent, name, Bf16Linear(child.weight, child.bias, fp32_out=fp32_out, arena=arena))
    if tied:
        model.lm_head = Bf16Linear(model.embed_tokens.weight, arena=arena)
    return len(swaps) + len(mlps) + tied
