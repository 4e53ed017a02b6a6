"""The CPU linear kernel against torch's F.linear (the reference), and in the engine."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from pagoda.kernels import cpu_native, linear_cpu

pytestmark = pytest.mark.skipif(
    cpu_native.unavailable_reason("linear_cpu") is not None,
    reason=f"CPU linear kernel: {cpu_native.unavailable_reason('linear_cpu')}",
)


def make(n: int, k: int, bias: bool, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, k, generator=g) / k**0.5
    return w, (torch.randn(n, generator=g) if bias else None)


# rows: 1, a block's worth (12), one more, a decode batch, a prefill chunk; columns: whole
# 32-wide panels and ragged ones (the masked stores); depths odd and even
@pytest.mark.parametrize("rows", [1, 5, 12, 13, 32, 100, 300])
@pytest.mark.parametrize(("n", "k"), [(64, 48), (50, 37), (832, 576), (7, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_f_linear(rows, n, k, bias):
    w, b = make(n, k, bias)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    got = linear_cpu.PackedLinear(w, b)(x)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got, F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_leading_dims_strided_input_and_empty_batch():
    w, b = make(40, 24, True)
    layer = linear_cpu.PackedLinear(w, b)
    x = torch.randn(3, 5, 48)[..., ::2]  # last dim strided: copied before the call
    torch.testing.assert_close(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)
    rows = torch.randn(20, 24)[::3]  # rows strided, last dim contiguous: used as is
    torch.testing.assert_close(layer(rows), F.linear(rows, w, b), rtol=1e-5, atol=1e-5)
    assert layer(torch.empty(0, 24)).shape == (0, 40)


def test_a_row_is_the_same_bits_whatever_its_batch():
    w, _ = make(96, 200, False)
    layer = linear_cpu.PackedLinear(w)
    x = torch.randn(37, 200)
    together = layer(x)
    for i in (0, 11, 12, 36):
        assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])
    assert torch.equal(layer(x[10:30]), together[10:30])


def test_thread_count_does_not_change_results():
    w, b = make(256, 128, True)
    layer = linear_cpu.PackedLinear(w, b)
    x = torch.randn(33, 128)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = layer(x)
        torch.set_num_threads(2)
        two = layer(x)
    finally:
        torch.set_num_threads(before)
    assert torch.equal(one, two)


def test_pack_linears_swaps_every_fp32_linear_and_ties_the_lm_head():
    class Tied(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed_tokens = nn.Embedding(100, 16)
            self.proj = nn.Linear(16, 24)
            self.inner = nn.Sequential(nn.Linear(24, 16, bias=False))
            self.tie_word_embeddings = True
            self.lm_head = None

    model = Tied()
    reference = {n: m.weight.detach().clone() for n, m in model.named_modules() if n in ("proj",)}
    assert linear_cpu.pack_linears(model) == 3
    assert isinstance(model.proj, linear_cpu.PackedLinear)
    assert isinstance(model.inner[0], linear_cpu.PackedLinear)
    h = torch.randn(4, 16)
    torch.testing.assert_close(
        model.lm_head(h), h @ model.embed_tokens.weight.t(), rtol=1e-5, atol=1e-5
    )
    torch.testing.assert_close(
        model.proj(h), F.linear(h, reference["proj"], model.proj.bias), rtol=1e-5, atol=1e-5
    )


def test_engine_packs_on_cpu_and_keeps_greedy_output(tiny_models):
    from pagoda.engine import LLM, SamplingParams

    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (3, 40, 90)]
    params = SamplingParams(temperature=0, max_tokens=24, min_tokens=24)
    packed = LLM(str(tiny_models["qwen2"]), dtype="float32")  # qkv bias: the bias path
    plain = LLM(str(tiny_models["qwen2"]), dtype="float32", kernel_backend="torch")
    model = packed.engine.runner.model
    assert isinstance(model.layers[0].self_attn.qkv_proj, linear_cpu.PackedLinear)
    assert isinstance(plain.engine.runner.model.layers[0].self_attn.qkv_proj, nn.Linear)
    a = [o.outputs[0].token_ids for o in packed.generate(prompts, params)]
    b = [o.outputs[0].token_ids for o in plain.generate(prompts, params)]
    assert a == b


# -- bf16 weights, widened to fp32 in the kernel ----------------------------------------------

BF16_ROWS = [1, 3, 4, 12, 13, 32, 100]  # one row block (read directly) and more (widened once)


@pytest.mark.parametrize("rows", BF16_ROWS)
@pytest.mark.parametrize(("n", "k"), [(64, 48), (50, 37), (832, 576), (7, 3)])
@pytest.mark.parametrize("bias", [False, True])
def test_bf16_weights_match_f_linear_on_the_rounded_weight(rows, n, k, bias):
    """The weight rounded to bf16 (nearest even, as torch rounds), x and the sums in fp32."""
    w, b = make(n, k, bias)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(1))
    layer = linear_cpu.PackedLinear(w, b, weight_dtype=torch.bfloat16)
    assert layer.packed.dtype == torch.bfloat16
    assert layer.packed.numel() == -(-n // 32) * 32 * k  # half the bytes of the fp32 panels
    expected = F.linear(x, w.bfloat16().float(), b)
    torch.testing.assert_close(layer(x), expected, rtol=1e-5, atol=1e-5)
    # and not the fp32 weight's product: the rounding is there
    assert not torch.allclose(layer(x), F.linear(x, w, b), rtol=1e-5, atol=1e-5)


def test_bf16_weights_give_a_row_the_same_bits_whatever_its_batch():
    """Rows read the panels directly in a batch of one block and from a widened copy in larger
    ones: the same fused multiply-adds in the same order either way."""
    w, b = make(96, 200, True)
    layer = linear_cpu.PackedLinear(w, b, weight_dtype=torch.bfloat16)
    x = torch.randn(37, 200)
    together = layer(x)
    for i in (0, 2, 3, 36):
        assert torch.equal(layer(x[i : i + 1]), together[i : i + 1])
    assert torch.equal(layer(x[:3]), together[:3])
    assert torch.equal(layer(x[5:30]), together[5:30])


def test_bf16_weights_refuse_other_dtypes():
    w, _ = make(8, 8, False)
    with pytest.raises(ValueError, match="weight_dtype"):
        linear_cpu.PackedLinear(w, weight_dtype=torch.float16)


def test_engine_in_bf16_without_native_bf16_packs_bf16_weights(tiny_models, monkeypatch):
    """On a CPU without AMX or AVX512-BF16 (forced here where it has them), dtype bfloat16
    gives bf16 weight panels, a bf16 KV cache and fp32 activations. (Its accuracy against
    transformers, on real weights: tests/test_bf16_cpu.py.)"""
    from pagoda.engine import LLM, SamplingParams
    from pagoda.kernels import linear_bf16

    monkeypatch.setattr(linear_bf16, "available", lambda: False)
    llm = LLM(str(tiny_models["qwen2"]), dtype="bfloat16")
    runner = llm.engine.runner
    layer = runner.model.layers[0].self_attn.qkv_proj
    assert isinstance(layer, linear_cpu.PackedLinear) and layer.packed.dtype == torch.bfloat16
    assert layer.bias.dtype == torch.float32
    assert runner.kv_caches[0][0].dtype == torch.bfloat16
    assert runner.model.layers[0].input_layernorm.weight.dtype == torch.float32
    out = llm.generate([{"prompt_token_ids": list(range(5, 45))}], SamplingParams(max_tokens=8))
    assert len(out[0].outputs[0].token_ids) == 8
