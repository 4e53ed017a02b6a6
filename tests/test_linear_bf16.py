"""`Bf16Linear` (pagoda's kernel, and oneDNN's packed weights past its rows without AMX) against
torch's bf16 matmul in fp32 (the reference)."""

import copy
import logging
import re
from pathlib import Path

import pytest
import torch
from torch import nn

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.config import EngineConfig
from pagoda.kernels import cpu_native, linear_bf16

pytestmark = pytest.mark.skipif(
    not linear_bf16.available(), reason="the CPU runs no native bf16 (AMX, AVX512-BF16)"
)


# rows: 1, a decode batch, a prefill chunk, and counts oneDNN runs padded (33 -> 34, 261 -> 264);
# shapes: SmolLM2's qkv and down, a ragged one
@pytest.mark.parametrize("rows", [1, 32, 33, 256, 261])
@pytest.mark.parametrize(("n", "k"), [(960, 576), (576, 1536), (50, 37)])
@pytest.mark.parametrize("bias", [False, True])
def test_matches_bf16_matmul_with_fp32_accumulation(rows, n, k, bias):
    g = torch.Generator().manual_seed(rows * n + k)
    w = torch.randn(n, k, generator=g) / k**0.5
    b = torch.randn(n, generator=g) if bias else None
    x = torch.randn(rows, k, generator=g)
    got = linear_bf16.Bf16Linear(w, b)(x)
    # the exact product of the bf16-rounded operands, rounded to bf16 once at the end
    expected = x.bfloat16().double() @ w.bfloat16().double().t()
    if bias:
        expected += b.bfloat16().double()
    assert got.dtype == torch.float32 and got.shape == (rows, n)
    # one bf16 rounding of the result (relative 2^-8) plus fp32 accumulation order
    torch.testing.assert_close(got.double(), expected, rtol=2**-8, atol=1e-3)


def test_keeps_the_input_dtype_and_leading_dims():
    layer = linear_bf16.Bf16Linear(torch.randn(8, 16))
    assert layer(torch.randn(2, 3, 16)).shape == (2, 3, 8)
    assert layer(torch.randn(4, 16, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_onednn_rows_run_padded_and_the_padding_changes_nothing():
    layer = linear_bf16.Bf16Linear(torch.randn(8, 16), amx=False)  # oneDNN past 4 rows
    x = torch.randn(65, 16, dtype=torch.bfloat16)  # run as 68 rows
    unpadded = torch.ops.mkldnn._linear_pointwise(x, layer.packed, None, "none", [], "")
    assert torch.equal(layer(x), unpadded)


def test_row_counts_fall_into_few_sizes_with_little_padding():
    sizes = {linear_bf16.padded_rows(rows) for rows in range(1, 4097)}
    assert len(sizes) == 32 + 16 * 7  # exact up to 32, then 16 per power of two
    for rows in range(1, 4097):
        padded = linear_bf16.padded_rows(rows)
        assert rows <= padded <= rows * 1.0625
        assert linear_bf16.padded_rows(padded) == padded


def test_pack_linears_swaps_every_linear_and_ties_the_lm_head():
    model = nn.Module()
    model.a, model.b = nn.Linear(16, 8), nn.Linear(8, 4, bias=False)
    model.embed_tokens = nn.Embedding(10, 16)
    model.tie_word_embeddings, model.lm_head = True, None
    assert linear_bf16.pack_linears(model) == 3
    assert all(type(m) is linear_bf16.Bf16Linear for m in (model.a, model.b, model.lm_head))
    x = torch.randn(2, 16)
    expected = x.bfloat16().float() @ model.embed_tokens.weight.bfloat16().float().t()
    torch.testing.assert_close(model.lm_head(x), expected, rtol=2**-7, atol=1e-2)


@pytest.mark.skipif(not linear_bf16.kernel_amx(), reason="no AMX")
def test_pack_linears_fuses_the_mlp_activation_into_gate_up(tiny_models):
    """On AMX an MLP's gate_up takes the activation along and hands down_proj bf16; the
    layer's output is bit for bit the unfused one's, and stays fp32 for the residual."""
    llm = LLM(str(tiny_models["llama"]), max_model_len=256, dtype="bfloat16")
    mlp = llm.engine.runner.model.layers[0].mlp
    assert type(mlp.gate_up_proj) is linear_bf16.Bf16GateUpSiluMul
    unfused = copy.copy(mlp)
    unfused.gate_up_proj = linear_bf16.Bf16Linear(mlp.gate_up_proj.weight())
    for rows in (1, 7, 300):
        x = torch.randn(rows, 128)
        got = mlp(x)
        assert got.dtype == torch.float32
        assert torch.equal(got, unfused(x))


def test_auto_dtype_on_this_cpu_is_bf16():
    """As vLLM: a CPU that runs bf16 natively serves bf16 unless told otherwise."""
    config = EngineConfig(model="unused")
    assert config.resolve_dtype(torch.device("cpu"), torch.float32) == torch.bfloat16
    assert (
        EngineConfig(model="unused", dtype="float32").resolve_dtype(torch.device("cpu"), None)
        == torch.float32
    )


def test_engine_takes_the_bf16_path_and_says_so(tiny_models, caplog):
    with caplog.at_level(logging.INFO, logger="pagoda.engine.loader"):
        llm = LLM(str(tiny_models["qwen2"]), max_model_len=256)  # qkv bias: the bias path
    model = llm.engine.runner.model
    assert llm.engine.dtype == torch.bfloat16
    assert llm.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    assert type(model.layers[0].self_attn.qkv_proj) is linear_bf16.Bf16Linear
    assert model.embed_tokens.weight.dtype == torch.float32  # activations stay fp32
    assert "bf16 CPU path" in caplog.text and "linear layers packed" in caplog.text
    out = llm.generate(["Hello there"], SamplingParams(temperature=0, max_tokens=8))[0]
    assert len(out.outputs[0].token_ids) == 8


def anon_huge_kb(address: int) -> int:
    """AnonHugePages of the mapping of this process that holds `address` (kB)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        if re.match(r"^[0-9a-f]+-[0-9a-f]+ ", line):
            start, end = (int(part, 16) for part in line.split()[0].split("-"))
            inside = start <= address < end
        elif inside and line.startswith("AnonHugePages:"):
            return int(line.split()[1])
    return 0


@pytest.mark.skipif(not cpu_native.huge_pages_enabled(), reason="transparent huge pages are off")
def test_huge_pages_are_aligned_and_huge():
    block = cpu_native.huge_pages(6 << 20)
    block.fill_(1)
    assert block.data_ptr() % (2 << 20) == 0 and block.numel() == 6 << 20
    assert anon_huge_kb(block.data_ptr()) >= 2048


@pytest.mark.skipif(not cpu_native.huge_pages_enabled(), reason="transparent huge pages are off")
def test_packed_weights_share_one_arena_and_the_kv_cache_lies_on_huge_pages(tiny_models):
    llm = LLM(str(tiny_models["qwen2"]), max_model_len=256)
    runner = llm.engine.runner
    panels = [m.panels for m in runner.model.modules() if getattr(m, "panels", None) is not None]
    assert len(panels) > 4
    assert len({p.untyped_storage().data_ptr() for p in panels}) == 1
    assert all(p.data_ptr() % 64 == 0 for p in panels)
    k_cache = runner.kv_caches[0][0]
    assert k_cache.data_ptr() % (2 << 20) == 0 and anon_huge_kb(k_cache.data_ptr()) >= 2048
    assert not k_cache.any()  # zeroed
