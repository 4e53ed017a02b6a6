"""The small-batch bf16 linear kernel (`csrc/linear_bf16.cpp`) against torch's reference, the
matmul of the bf16-rounded operands in fp32, and its place in `OneDNNLinear`.

Tolerance: both sides multiply the same bf16 values, and a product of two bf16 is exact in
fp32, so they differ only in the order of their fp32 additions. A row of K terms summed in
any order is off the exact sum by at most about K * 2^-24 times the sum of the terms' sizes
(sum |x||w|); the errors of a sum of random-signed terms grow as sqrt(K) in practice, so
1e-5 of that sum (about 170 ulps of it) holds both orders with a wide margin at these K
(the worst seen: 3e-7) and still catches a dropped or doubled pair of k (5e-3 or more).
"""

import pytest
import torch
from torch import nn

from pagoda.kernels import cpu_native, linear_bf16

pytestmark = pytest.mark.skipif(
    linear_bf16.gemv_library() is None,
    reason="no AVX512-BF16, or the kernel does not build: "
    f"{cpu_native.unavailable_reason(linear_bf16.NAME)}",
)

ROWS = range(1, linear_bf16.GEMV_ROWS + 1)
# SmolLM2-135M's layers (qkv, o, gate_up, down, lm_head), then shapes off the 32-row panels
# and the pairs of k: odd K, N below one panel, N one past a panel
SHAPES = [(960, 576), (576, 576), (3072, 576), (576, 1536), (49152, 576)]
SHAPES += [(33, 7), (5, 64), (100, 77), (31, 1)]


def operands(n: int, k: int, rows: int, bias: bool) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(n * 7 + k)
    w = (torch.randn(n, k, generator=g) / k**0.5).bfloat16()
    b = torch.randn(n, generator=g).bfloat16() if bias else None
    x = torch.randn(rows, k, generator=g)
    return w, b, x


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


def gemv(layer: linear_bf16.OneDNNLinear, x: torch.Tensor) -> torch.Tensor:
    assert x.shape[0] <= linear_bf16.GEMV_ROWS  # the kernel's side of forward
    return layer(x)


@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize(("n", "k"), SHAPES)
@pytest.mark.parametrize("bias", [False, True])
def test_kernel_matches_fp32_matmul_of_bf16_operands(rows, n, k, bias):
    w, b, x = operands(n, k, rows, bias)
    got = gemv(linear_bf16.OneDNNLinear(w, b), x)
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    assert_within_order_error(got, x, w, b)


def test_bf16_input_gives_bf16_output_of_the_same_sums():
    w, b, x = operands(200, 96, 3, True)
    layer = linear_bf16.OneDNNLinear(w, b)
    got = layer(x.bfloat16())
    assert got.dtype == torch.bfloat16
    torch.testing.assert_close(got, layer(x).bfloat16(), rtol=0, atol=0)


def test_leading_dims_strided_rows_and_empty_batch():
    w, b, _ = operands(70, 48, 1, True)
    layer = linear_bf16.OneDNNLinear(w, b)
    x = torch.randn(1, 2, 96)[..., ::2]  # strided within a row: copied first
    assert layer(x).shape == (1, 2, 70)
    assert_within_order_error(layer(x).view(2, 70), x.reshape(2, 48), w, b)
    rows = torch.randn(9, 48)[::4]  # 3 rows, strided between rows: read in place
    assert_within_order_error(layer(rows), rows, w, b)
    assert layer(torch.empty(0, 48)).shape == (0, 70)


def test_thread_count_does_not_change_results():
    w, b, x = operands(1000, 320, linear_bf16.GEMV_ROWS, True)
    layer = linear_bf16.OneDNNLinear(w, b)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        two = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_batches_past_the_threshold_keep_onednn_and_agree():
    w, b, x = operands(300, 200, linear_bf16.GEMV_ROWS + 1, True)
    layer = linear_bf16.OneDNNLinear(w, b)
    big = layer(x)  # oneDNN, which rounds its output to bf16
    small = torch.cat([layer(x[i : i + 1]) for i in range(x.shape[0])])
    torch.testing.assert_close(big, small.bfloat16().float(), rtol=2**-8, atol=1e-6)


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
