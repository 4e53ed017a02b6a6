"""The CPU elementwise kernels against the torch references (norm, activation, rotary)."""

import pytest
import torch

from pagoda.kernels import activation, cpu_native, elementwise_cpu, norm, rotary

pytestmark = pytest.mark.skipif(
    cpu_native.unavailable_reason("elementwise_cpu") is not None,
    reason=f"CPU elementwise kernels: {cpu_native.unavailable_reason('elementwise_cpu')}",
)

TOL = {"rtol": 2e-6, "atol": 2e-6}


# widths: whole 16-lane vectors and ragged tails; rows: decode-sized and past the threshold
# where the rows are split between threads
@pytest.mark.parametrize("rows", [1, 7, 300])
@pytest.mark.parametrize("width", [64, 576, 100, 5])
@pytest.mark.parametrize("with_residual", [False, True])
def test_rms_norm(rows, width, with_residual):
    g = torch.Generator().manual_seed(rows * width)
    x = torch.randn(rows, width, generator=g) * 3
    residual = torch.randn(rows, width, generator=g) if with_residual else None
    weight = torch.randn(width, generator=g)
    out, new_residual = elementwise_cpu.rms_norm(x, weight, 1e-5, residual)
    ref_out, ref_residual = norm.rms_norm(x, weight, 1e-5, residual)
    torch.testing.assert_close(out, ref_out, **TOL)
    torch.testing.assert_close(new_residual, ref_residual, **TOL)
    if residual is None:
        assert new_residual is x  # as the reference: the input is the next residual


def test_rms_norm_strided_rows_and_other_dtypes():
    x = torch.randn(6, 2, 48)[:, 0]  # row stride 96
    weight = torch.randn(48)
    out, _ = elementwise_cpu.rms_norm(x, weight, 1e-6)
    torch.testing.assert_close(out, norm.rms_norm(x, weight, 1e-6)[0], **TOL)
    x16, w16 = x.bfloat16(), weight.bfloat16()  # the reference's path
    assert torch.equal(
        elementwise_cpu.rms_norm(x16, w16, 1e-6)[0], norm.rms_norm(x16, w16, 1e-6)[0]
    )


@pytest.mark.parametrize("rows", [1, 32, 200])
@pytest.mark.parametrize("inner", [1536, 24, 7])
def test_silu_and_mul(rows, inner):
    g = torch.Generator().manual_seed(inner)
    gate_up = torch.randn(rows, 2 * inner, generator=g) * 6  # far into both tails of silu
    gate_up[0, :4] = torch.tensor([-100.0, 100.0, 0.0, -0.0])
    torch.testing.assert_close(
        elementwise_cpu.silu_and_mul(gate_up), activation.silu_and_mul(gate_up), **TOL
    )


@pytest.mark.parametrize(("heads", "head_dim"), [(12, 64), (4, 128), (3, 40)])
@pytest.mark.parametrize("tokens", [1, 33, 400])
def test_rotary_on_strided_head_views(tokens, heads, head_dim):
    cos, sin = rotary.rotary_cos_sin_cache(head_dim, 512, {"rope_theta": 10000.0})
    positions = torch.randint(0, 512, (tokens,))
    # q and k heads as a slice of the fused qkv output, as the model passes them
    qkv = torch.randn(tokens, heads + 2, head_dim)
    x = qkv[:, :heads]
    got = elementwise_cpu.apply_rotary(x, cos[positions], sin[positions])
    torch.testing.assert_close(got, rotary.apply_rotary(x, cos[positions], sin[positions]), **TOL)


# an encoder's residual add and LayerNorm in bf16, against torch's bf16 add then LayerNorm
@pytest.mark.parametrize("rows", [1, 300])
@pytest.mark.parametrize("width", [384, 100])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("affine", [False, True])
def test_add_layer_norm_bf16(rows, width, with_residual, affine):
    g = torch.Generator().manual_seed(rows + width)
    layer = torch.nn.LayerNorm(width, eps=1e-12, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            layer.weight.normal_(generator=g)
            layer.bias.normal_(generator=g)
    layer = layer.bfloat16()
    x = (torch.randn(rows, width, generator=g) * 3).bfloat16()
    residual = torch.randn(rows, width, generator=g).bfloat16() if with_residual else None
    with torch.no_grad():
        expected = layer(x if residual is None else x + residual)
        out = elementwise_cpu.add_layer_norm(x, residual, layer)
    # the same arithmetic summed in another order: at most one bf16 step apart, nearly all equal
    steps = (out.float() - expected.float()).abs() / expected.float().abs().clamp(min=1e-3)
    assert steps.max() <= 2**-7 and (out == expected).float().mean() >= 0.99


def test_add_layer_norm_leaves_fp32_to_torch():
    layer = torch.nn.LayerNorm(64)
    x, residual = torch.randn(3, 64), torch.randn(3, 64)
    with torch.no_grad():
        assert torch.equal(elementwise_cpu.add_layer_norm(x, residual, layer), layer(x + residual))


@pytest.mark.parametrize("rows,width", [(1, 49152), (32, 49152), (3, 1000), (5, 17), (2, 1)])
def test_argmax_rows_matches_torch(rows, width):
    torch.manual_seed(rows * width)
    logits = torch.randn(rows, width)
    assert torch.equal(elementwise_cpu.argmax_rows(logits), logits.max(dim=-1).indices)
    strided = torch.randn(rows, width + 7)[:, :width]  # rows `width + 7` apart
    assert torch.equal(elementwise_cpu.argmax_rows(strided), strided.max(dim=-1).indices)


def test_argmax_rows_ties_masks_and_nan_as_torch():
    """The first of equal maxima (across and within the kernel's 16 lanes), 0 for a row where
    every token is masked, the first NaN where there is one: torch's max(dim=-1).indices."""
    logits = torch.full((6, 100), float("-inf"))
    logits[1, [7, 50, 23]] = 3.0  # lanes 7, 2, 7 of their vectors
    logits[2, 3], logits[2, 99] = 5.0, float("nan")
    logits[3, [10, 20]] = float("nan")
    logits[4] = torch.arange(100) % 4  # many equal maxima: the first is 3
    logits[5, 96:] = 1.0  # the maximum in the last, partial vector
    got = elementwise_cpu.argmax_rows(logits)
    assert got.dtype == torch.int64
    assert got.tolist() == logits.max(dim=-1).indices.tolist() == [0, 7, 99, 10, 3, 96]


def test_argmax_rows_leaves_other_dtypes_to_torch():
    logits = torch.randn(4, 300, dtype=torch.bfloat16)
    assert torch.equal(elementwise_cpu.argmax_rows(logits), logits.max(dim=-1).indices)
