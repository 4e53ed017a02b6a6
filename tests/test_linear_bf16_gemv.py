"""The small-batch bf16 linear kernel (`csrc/linear_bf16.cpp`), on AMX tiles and with
AVX512-BF16, against torch's reference, the matmul of the bf16-rounded operands in fp32; and
its place in `Bf16Linear`.

Tolerance: both sides multiply the same bf16 values, and a product of two bf16 is exact in
fp32, so they differ only in the order of their fp32 additions. A row of K terms summed in
any order is off the exact sum by at most about K * 2^-24 times the sum of the terms' sizes
(sum |x||w|); the errors of a sum of random-signed terms grow as sqrt(K) in practice, so
1e-5 of that sum (about 170 ulps of it) holds both orders with a wide margin at these K
(the worst seen: 3e-7) and still catches a dropped or doubled pair of k (5e-3 or more).
"""

import functools

import pytest
import torch
from torch import nn

from pagoda.kernels import cpu_native, elementwise_cpu, linear_bf16

pytestmark = pytest.mark.skipif(
    linear_bf16.kernel_library() is None,
    reason="no AVX512-BF16, or the kernel does not build: "
    f"{cpu_native.unavailable_reason(linear_bf16.NAME)}",
)

# SmolLM2-135M's layers (qkv, o, gate_up, down, lm_head), then shapes off the 32-row panels
# and the 16 pairs of k of an AMX tile row: odd K, N below one panel, N one past a panel
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
SHAPES += [(33, 7), (5, 64), (100, 77), (31, 1), (70, 40)]
# AMX: a lone row (on vdpbf16ps), one tile of rows and less, two, more than one pass of two;
# AVX512-BF16: each row block size up to 8 and past it; both: rows that the threads convert in
# shares (from 64), unevenly
ROWS = {True: [1, 2, 3, 15, 16, 17, 31, 32, 33, 64, 129], False: [1, 2, 3, 4, 5, 7, 8, 9, 65]}
PATHS = [False, True] if linear_bf16.kernel_amx() else [False]


@functools.cache
def operands(n: int, k: int, bias: bool) -> tuple[torch.Tensor, torch.Tensor | None, ...]:
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    return w, b, linear_bf16.pack_panels(w)


def reference(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    y = x.bfloat16().float() @ w.float().T
    return y if b is None else y + b.float()


def assert_within_order_error(got: torch.Tensor, x: torch.Tensor, w: torch.Tensor, b) -> None:
    want = reference(x, w, b)
    scale = x.bfloat16().float().abs() @ w.float().abs().T
    if b is not None:
        scale = scale + b.float().abs()
    excess = (got - want).abs() - 1e-5 * scale
    assert excess.max() <= 0, (got - want).abs().max()


@pytest.mark.parametrize("amx", PATHS, ids=lambda amx: "amx" if amx else "avx512")
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_fp32_matmul_of_bf16_operands(amx, n, k, bias):
    w, b, panels = operands(n, k, bias)
    b32 = None if b is None else b.float()
    g = torch.Generator().manual_seed(n + k)
    for rows in ROWS[amx]:
        x = torch.randn(rows, k, generator=g)
        got = linear_bf16.panel_linear(x, panels, b32, n, amx)
        assert got.dtype == torch.float32 and got.shape == (rows, n)
        assert_within_order_error(got, x, w, b)
        got16 = linear_bf16.panel_linear(x.bfloat16(), panels, b32, n, amx)
        assert torch.equal(got16, got)  # bf16 x: the same pairs, read as they are


def test_avx512_layer_uses_the_kernel_up_to_its_rows_and_onednn_past_them():
    w, b, _ = operands(300, 200, True)
    layer = linear_bf16.Bf16Linear(w, b, amx=False)
    rows = layer.kernel_rows
    assert rows == linear_bf16.AVX512_ROWS and layer.packed is not None
    x = torch.randn(rows + 1, 200)
    small = layer(x[:rows])
    assert torch.equal(
        small, linear_bf16.panel_linear(x[:rows], layer.panels, b.float(), 300, False)
    )
    big = layer(x)  # oneDNN, which rounds its output to bf16
    torch.testing.assert_close(big[:rows], small.bfloat16().float(), rtol=2**-8, atol=1e-6)
    assert layer(x[:1].bfloat16()).dtype == torch.bfloat16


@pytest.mark.skipif(not linear_bf16.kernel_amx(), reason="no AMX")
def test_amx_layer_holds_one_copy_and_takes_every_batch():
    w, b, _ = operands(300, 200, True)
    layer = linear_bf16.Bf16Linear(w, b)
    assert layer.amx and layer.packed is None
    x = torch.randn(300, 200)  # a prefill chunk's worth: 9 passes of 32 rows, 2 blocks of 256
    assert torch.equal(layer(x), linear_bf16.panel_linear(x, layer.panels, b.float(), 300, True))
    assert_within_order_error(layer(x), x, w, b)


@pytest.mark.parametrize(("n", "k"), [(64, 32), (33, 7), (100, 77)])
def test_unpack_panels_gives_the_weight_back(n, k):
    w, _, panels = operands(n, k, False)
    assert torch.equal(linear_bf16.unpack_panels(panels, n, k), w)


def test_leading_dims_strided_rows_and_empty_batch():
    w, b, _ = operands(70, 48, True)
    layer = linear_bf16.Bf16Linear(w, b)
    x = torch.randn(1, 2, 96)[..., ::2]  # strided within a row: copied first
    assert layer(x).shape == (1, 2, 70)
    assert_within_order_error(layer(x).view(2, 70), x.reshape(2, 48), w, b)
    rows = torch.randn(9, 48)[::4]  # 3 rows, strided between rows: read in place
    assert_within_order_error(layer(rows), rows, w, b)
    assert layer(torch.empty(0, 48)).shape == (0, 70)


@pytest.mark.parametrize("amx", PATHS, ids=lambda amx: "amx" if amx else "avx512")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_strided_prefill_rows_read_in_place(amx, dtype):
    """From 64 rows the threads convert x in shares, each from its own rows' addresses."""
    w, b, panels = operands(100, 77, True)
    wide = torch.randn(129, 2 * 77).to(dtype)
    x = wide[:, 3:80]  # a row stride of 154
    got = linear_bf16.panel_linear(x, panels, b.float(), 100, amx)
    assert torch.equal(got, linear_bf16.panel_linear(x.contiguous(), panels, b.float(), 100, amx))
    assert_within_order_error(got, x.float(), w, b)


@pytest.mark.parametrize("amx", PATHS, ids=lambda amx: "amx" if amx else "avx512")
def test_thread_count_and_batch_do_not_change_a_row(amx):
    w, b, panels = operands(1000, 320, True)
    x = torch.randn(max(ROWS[amx]), 320)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_bf16.panel_linear(x, panels, b.float(), 1000, amx)
        torch.set_num_threads(2)
        two = linear_bf16.panel_linear(x, panels, b.float(), 1000, amx)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)
    alone = linear_bf16.panel_linear(x[5:6], panels, b.float(), 1000, amx)
    # a lone row goes to vdpbf16ps on AMX too: it is that path's row of a batch, to the bit
    batched = one if not amx else linear_bf16.panel_linear(x, panels, b.float(), 1000, False)
    assert torch.equal(alone, batched[5:6])


def test_pack_linears_gives_every_layer_the_kernel():
    model = nn.Sequential(nn.Linear(16, 24), nn.Linear(24, 8, bias=False))
    weights = [(layer.weight.detach().bfloat16(), layer.bias) for layer in model]
    assert linear_bf16.pack_linears(model) == 2
    assert all(layer.panels is not None for layer in model)
    x = torch.randn(1, 16)
    h = model[0](x)
    w, b = weights[0]
    assert_within_order_error(h, x, w, b.detach().bfloat16())
    assert_within_order_error(model[1](h), h, weights[1][0], None)


@pytest.mark.skipif(not linear_bf16.kernel_amx(), reason="no AMX")
@pytest.mark.parametrize(("intermediate", "k"), [(1536, 576), (64, 40), (32, 7)])
def test_fused_gate_up_gives_the_bits_down_proj_would_read(intermediate, k):
    """silu(gate) * up inside the gate_up kernel, rounded to bf16, is bit for bit the
    unfused path's: the same fp32 sums, the same activation code, the same rounding that
    down_proj applies to its fp32 input."""
    g = torch.Generator().manual_seed(intermediate + k)
    w = (torch.randn(2 * intermediate, k, generator=g) / k**0.5).bfloat16()
    fused, plain = linear_bf16.Bf16GateUpSiluMul(w), linear_bf16.Bf16Linear(w)
    assert torch.equal(fused.weight(), w)  # the interleaved panels hold the whole weight
    for rows in ROWS[True] + [512]:
        x = torch.randn(rows, k, generator=g)
        got = fused(x)
        assert got.dtype == torch.bfloat16 and got.shape == (rows, intermediate)
        assert torch.equal(got, elementwise_cpu.silu_and_mul(plain(x)).bfloat16())
        assert torch.equal(fused(x.bfloat16()), got)
