"""The Triton fused MoE layer against the torch reference (kernels/moe.py), under the
interpreter on CPU (TRITON_INTERPRET=1, set by conftest.py); its ahead-of-time compile for
sm_80/sm_90 is in test_elementwise_triton.py.

Tolerances: fp32 1e-5 (the kernel's fp32 dots are exact `ieee` ones); fp16 5e-3 and bf16 3e-2
relative to the output's scale, since both paths round the gate/up output and the expert
outputs to the activation dtype at different points (the reference sums a token's experts in
bf16 via index_add, the kernel sums k rounded rows), and the interpreter truncates bf16 stores.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagoda.engine import LLM, SamplingParams
from pagoda.kernels import moe, moe_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}
# (experts, top_k, tokens): idle experts wherever experts > tokens * top_k; 70 x 2 pairs over 4
# experts take the 64-row tiles, the others the 16-row ones
CASES = [(4, 1, 1), (4, 2, 70), (8, 8, 5), (16, 4, 3), (64, 8, 9), (64, 1, 2)]


def _inputs(experts, top_k, tokens, dtype, seed, hidden=32, inter=48):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    weights, ids = moe.select_experts(torch.randn(tokens, experts, generator=g), top_k, True)
    return [t.to(DEVICE) for t in (x.to(dtype), w13.to(dtype), w2.to(dtype), weights, ids)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(("experts", "top_k", "tokens"), CASES)
def test_fused_moe_matches_reference(experts, top_k, tokens, dtype):
    seed = experts * 1000 + top_k * 100 + tokens
    x, w13, w2, weights, ids = _inputs(experts, top_k, tokens, dtype, seed)
    if experts > tokens * top_k:
        assert torch.bincount(ids.flatten(), minlength=experts).eq(0).any()
    got = moe_triton.fused_moe(x, w13, w2, weights, ids)
    want = moe.fused_moe(x, w13, w2, weights, ids)
    assert got.dtype == want.dtype == dtype
    assert got.shape == want.shape == x.shape
    tol = TOL[dtype] * max(want.float().abs().max().item(), 1.0)
    torch.testing.assert_close(
        got.float(), want.float(), atol=tol, rtol=0, msg=lambda m: f"seed {seed}: {m}"
    )


def test_no_tokens():
    x, w13, w2, weights, ids = _inputs(8, 2, 0, torch.float32, 0)
    out = moe_triton.fused_moe(x, w13, w2, weights, ids)
    assert out.shape == (0, 32)


@pytest.mark.parametrize("block_m", [16, 64])
def test_align_groups_pairs_by_expert(block_m):
    experts, top_k, tokens = 16, 4, 37
    _, _, _, _, ids = _inputs(experts, top_k, tokens, torch.float32, block_m)
    flat = ids.flatten().cpu()
    a = moe_triton.align(ids, experts, block_m)
    pairs = a.sorted_pairs.cpu().view(-1, block_m)
    tile_experts = a.tile_experts.cpu()
    assert len(pairs) == len(tile_experts)
    real = pairs[pairs < flat.numel()]
    assert sorted(real.tolist()) == list(range(flat.numel()))  # each pair exactly once
    counts = torch.bincount(flat, minlength=experts)
    for e in range(experts):
        tiles = pairs[tile_experts == e]
        assert len(tiles) == -(-counts[e].item() // block_m)  # padded to whole tiles
        members = tiles[tiles < flat.numel()]
        assert flat[members].eq(e).all() and len(members) == counts[e]
    assert pairs[tile_experts == -1].eq(flat.numel()).all()  # unused tiles: padding only
    # experts in ascending order, unused tiles at the end
    used = tile_experts[tile_experts >= 0]
    assert used.tolist() == sorted(used.tolist())
    assert tile_experts[len(used) :].eq(-1).all()


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_model_on_triton_matches_torch(tmp_path, arch):
    """A MoE model from dummy weights: the Triton kernel set (the one CUDA gets) generates what
    the torch reference set does."""
    import transformers

    sizes = dict(
        vocab_size=256,
        hidden_size=64,
        intermediate_size=32,
        num_experts_per_tok=2,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        max_position_embeddings=256,
        architectures=[arch],
    )
    if arch == "MixtralForCausalLM":
        config = transformers.MixtralConfig(num_local_experts=8, **sizes)
    else:
        config = transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, **sizes)
    config.save_pretrained(tmp_path)
    prompts = [{"prompt_token_ids": [5, 6, 7, 8, 9]}, {"prompt_token_ids": [40, 41]}]
    params = SamplingParams(temperature=0, max_tokens=6, min_tokens=6, logprobs=1)
    outs = {}
    for backend in ("torch", "triton"):
        llm = LLM(
            str(tmp_path),
            dtype="float32",
            load_format="dummy",
            skip_tokenizer_init=True,
            kernel_backend=backend,
        )
        fused = llm.engine.runner.model.layers[0].mlp.ops.fused_moe
        assert fused is (moe_triton.fused_moe if backend == "triton" else moe.fused_moe)
        outs[backend] = [o.outputs[0] for o in llm.generate(prompts, params)]
    for ref, got in zip(outs["torch"], outs["triton"]):
        assert got.token_ids == ref.token_ids


@pytest.mark.skipif(torch.cuda.is_available(), reason="gpu_check.sh runs the real shapes there")
def test_gpu_check_moe_parts_smoke(tmp_path):
    """benchmarks/gpu_check.py's MoE parts at tiny shapes on CPU: they run, and the layer's
    error check sees the Triton layer agree with the reference."""
    root = Path(__file__).resolve().parents[1]
    script = root / "benchmarks" / "gpu_check.py"
    args = ["--smoke", "--parts", "moe_layer,moe_decode", "--out", str(tmp_path)]
    run = subprocess.run(
        [sys.executable, str(script), *args], cwd=root, capture_output=True, text=True, timeout=600
    )
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    report = json.loads((tmp_path / "gpu_check.json").read_text())
    assert report["errors"] == {}
    rows = report["results"]["moe_layer"]["rows"]
    assert [r["tokens"] for r in rows] == [1, 5, 40]
    assert all(r["max_err_over_max_ref"] < 1e-5 for r in rows)  # fp32 in the smoke plan
    assert report["results"]["moe_decode"]["decode_steps_timed"] > 0


class _SyncingOps(TorchDispatchMode):
    """Records the torch ops that read device data back to the host on CUDA (to size an
    output or to answer Python), which a CUDA graph cannot capture."""

    SYNCING = {"_local_scalar_dense", "nonzero", "bincount", "unique", "_unique2", "equal"}
    SYNCING |= {"unique_consecutive", "masked_select", "repeat_interleave", "is_nonzero"}

    def __init__(self) -> None:
        super().__init__()
        self.seen: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name in self.SYNCING:
            self.seen.add(name)
        return func(*args, **(kwargs or {}))


def test_align_reads_nothing_back_to_the_host():
    """The sort/align step of the decode CUDA graphs: no op whose output size or result
    depends on the device's data (the reference, which loops over experts on the host, has)."""
    x, w13, w2, weights, ids = _inputs(16, 4, 9, torch.float32, 3)
    with _SyncingOps() as spy:
        moe_triton.align(ids, 16, 16)
    assert spy.seen == set()
    with _SyncingOps() as spy:
        moe.fused_moe(x, w13, w2, weights, ids)
    assert spy.seen  # the spy sees a host read where there is one
