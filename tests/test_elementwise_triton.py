"""Triton RMSNorm / rotary / SiLU-and-mul kernels against their torch references.

Without a GPU the kernels run under Triton's interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported), and the ahead-of-time test still compiles every kernel
variant to sm_75/sm_80/sm_90 cubins with the ptxas bundled in the triton wheel (the fused MoE
layer's grouped GEMM too; its numerics are in test_moe_triton.py).
"""

import json  # noqa: E402
import os
import subprocess  # noqa: E402
import sys
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

from pagoda.kernels import (  # noqa: E402
    activation,
    activation_triton,
    attention_triton,
    moe_triton,
    norm,
    norm_triton,
    rotary,
    rotary_triton,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# bf16 stores truncate under the interpreter (and the references round several times in bf16)
TOL = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}
HIDDEN = [64, 576, 1536, 4096]
TOKENS = [1, 7, 64]


@pytest.fixture
def seed() -> int:
    """Fresh random inputs each run; the seed is in every failure message to replay it."""
    return torch.seed()


def _close(actual: torch.Tensor, expected: torch.Tensor, seed: int) -> None:
    assert actual.dtype == expected.dtype
    assert actual.shape == expected.shape
    tol = TOL[expected.dtype]
    torch.testing.assert_close(
        actual, expected, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}"
    )


def _randn(*shape: int, dtype: torch.dtype) -> torch.Tensor:
    return torch.randn(*shape, device=DEVICE).to(dtype)


# --- rms_norm -------------------------------------------------------------------------------


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("hidden", HIDDEN)
def test_rms_norm(hidden, tokens, dtype, with_residual, seed):
    x = _randn(tokens, hidden, dtype=dtype)
    weight = (1 + 0.1 * torch.randn(hidden, device=DEVICE)).to(dtype)
    residual = _randn(tokens, hidden, dtype=dtype) if with_residual else None
    eps = 1e-6

    got, got_res = norm_triton.rms_norm(x, weight, eps, residual)
    want, want_res = norm.rms_norm(x, weight, eps, residual)
    _close(got, want, seed)
    if with_residual:
        _close(got_res, want_res, seed)
    else:
        assert got_res is x  # as the reference: the residual stream starts at x


@pytest.mark.parametrize("with_residual", [False, True], ids=["plain", "residual"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("head_dim", [64, 128])
def test_rms_norm_heads_view(head_dim, dtype, with_residual, seed):
    """q/k norm: a [T, heads, D] slice of the fused qkv output, normalized over D."""
    tokens, n_q, n_kv = 7, 6, 2
    qkv = _randn(tokens, (n_q + 2 * n_kv) * head_dim, dtype=dtype).view(tokens, -1, head_dim)
    _, k, _ = qkv.split([n_q, n_kv, n_kv], dim=1)
    assert not k.is_contiguous()
    weight = (1 + 0.1 * torch.randn(head_dim, device=DEVICE)).to(dtype)
    residual = _randn(tokens, n_kv, head_dim, dtype=dtype) if with_residual else None

    got, got_res = norm_triton.rms_norm(k, weight, 1e-5, residual)
    want, want_res = norm.rms_norm(k, weight, 1e-5, residual)
    _close(got, want, seed)
    _close(got_res, want_res, seed)


def test_rms_norm_promotes_like_reference(seed):
    """An fp32 weight on bf16 activations gives an fp32 result, as torch's promotion does."""
    x = _randn(7, 576, dtype=torch.bfloat16)
    residual = _randn(7, 576, dtype=torch.bfloat16)
    weight = 1 + 0.1 * torch.randn(576, device=DEVICE)
    got, got_res = norm_triton.rms_norm(x, weight, 1e-6, residual)
    want, want_res = norm.rms_norm(x, weight, 1e-6, residual)
    assert got.dtype == want.dtype == torch.float32
    torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2, msg=lambda m: f"seed {seed}: {m}")
    _close(got_res, want_res, seed)


# --- apply_rotary ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize(("head_dim", "n_q", "n_kv"), [(64, 9, 3), (128, 32, 8)])
def test_apply_rotary(head_dim, n_q, n_kv, tokens, dtype, seed):
    cos_table, sin_table = rotary.rotary_cos_sin_cache(head_dim, 4096, {"rope_theta": 1e4})
    positions = torch.randint(0, 4096, (tokens,))
    cos = cos_table[positions].to(device=DEVICE, dtype=dtype)
    sin = sin_table[positions].to(device=DEVICE, dtype=dtype)
    qkv = _randn(tokens, (n_q + 2 * n_kv) * head_dim, dtype=dtype).view(tokens, -1, head_dim)
    qk = qkv[:, : n_q + n_kv]  # row stride (n_q + 2 n_kv) * D > H * D
    k = qkv[:, n_q : n_q + n_kv]  # non-zero storage offset too
    for x in (qk, k):
        assert tokens == 1 or not x.is_contiguous()
        got = rotary_triton.apply_rotary(x, cos, sin)
        # The kernel rounds once from fp32; the reference in fp16/bf16 rounds each product and
        # the sum, which can differ by more than the tolerance where the products cancel: the
        # reference is taken on the same (rounded) inputs in fp32, then cast.
        want = rotary.apply_rotary(x.float(), cos.float(), sin.float()).to(dtype)
        _close(got, want, seed)
        if dtype == torch.float32:
            _close(got, rotary.apply_rotary(x, cos, sin), seed)


def test_apply_rotary_promotes_like_reference(seed):
    """fp32 cos/sin tables on bf16 activations give an fp32 result, as the reference does."""
    cos_table, sin_table = rotary.rotary_cos_sin_cache(64, 128, {"rope_theta": 1e4})
    x = _randn(5, 4, 64, dtype=torch.bfloat16)
    cos, sin = cos_table[:5].to(DEVICE), sin_table[:5].to(DEVICE)
    got = rotary_triton.apply_rotary(x, cos, sin)
    _close(got, rotary.apply_rotary(x, cos, sin), seed)


# --- silu_and_mul ---------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("tokens", TOKENS)
@pytest.mark.parametrize("intermediate", HIDDEN)
def test_silu_and_mul(intermediate, tokens, dtype, seed):
    gate_up = _randn(tokens, 2 * intermediate, dtype=dtype)
    got = activation_triton.silu_and_mul(gate_up)
    _close(got, activation.silu_and_mul(gate_up), seed)


def test_empty_batch():
    x = torch.empty(0, 64, device=DEVICE)
    out, res = norm_triton.rms_norm(x, torch.ones(64, device=DEVICE), 1e-6, torch.empty_like(x))
    assert out.shape == res.shape == (0, 64)
    assert activation_triton.silu_and_mul(torch.empty(0, 128, device=DEVICE)).shape == (0, 64)
    cs = torch.empty(0, 64, device=DEVICE)
    rotated = rotary_triton.apply_rotary(torch.empty(0, 4, 64, device=DEVICE), cs, cs)
    assert rotated.shape == (0, 4, 64)


# --- ahead-of-time compile ------------------------------------------------------------------

_TL_DTYPE = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}


def _variant(name: str, dtype: torch.dtype):
    """(kernel, signature, constexprs, attrs, options) as the wrappers launch the kernel for a
    realistic shape (hidden 4096; 32 q + 8 kv heads of 128 in a fused qkv; intermediate
    14336), specialized as the JIT does: pointers and ints divisible by 16 are marked so (torch
    allocations are 16-byte aligned), ints equal to 1 become constants."""
    if name.startswith("rms_norm"):
        block, num_warps = norm_triton.rms_norm_launch_config(4096)
        kernel = norm_triton._rms_norm_kernel
        pointers = ["x_ptr", "res_ptr", "w_ptr", "out_ptr", "new_res_ptr"]
        scalars = {"n_heads": 1, "x_stride_t": 4096, "x_stride_h": 0, "res_stride_t": 4096}
        scalars |= {"res_stride_h": 0, "n_cols": 4096, "eps": 1e-6}
        constexprs = {"HAS_RESIDUAL": name == "rms_norm_residual", "BLOCK": block}
    elif name == "rotary":
        block_h, block_d, num_warps = rotary_triton.rotary_launch_config(40, 128)
        kernel = rotary_triton._rotary_kernel
        pointers = ["x_ptr", "cos_ptr", "sin_ptr", "out_ptr"]
        scalars = {"n_heads": 40, "x_stride_t": 48 * 128, "x_stride_h": 128}
        scalars |= {"cos_stride_t": 128, "sin_stride_t": 128, "half_dim": 64}
        constexprs = {"BLOCK_H": block_h, "BLOCK_D": block_d}
    elif name.startswith("moe"):
        return _moe_variant(name, dtype)
    else:
        block, num_warps = activation_triton.silu_and_mul_launch_config(14336)
        kernel = activation_triton._silu_and_mul_kernel
        pointers = ["gate_up_ptr", "out_ptr"]
        scalars = {"n_cols": 14336, "in_stride_t": 2 * 14336}
        constexprs = {"BLOCK": block}
    fn = kernel
    assert isinstance(fn, JITFunction), "compile with TRITON_INTERPRET unset"
    assert {*pointers, *scalars, *constexprs} == set(fn.arg_names)
    signature = dict.fromkeys(pointers, f"*{_TL_DTYPE[dtype]}")
    aligned = list(pointers)
    for arg, value in scalars.items():
        if isinstance(value, float):
            signature[arg] = "fp32"
        elif value == 1:
            constexprs[arg] = 1
        else:
            signature[arg] = "i32"
            if value % 16 == 0:
                aligned.append(arg)
    signature |= dict.fromkeys(constexprs, "constexpr")
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    return fn, signature, constexprs, attrs, {"num_warps": num_warps}


def _moe_variant(name: str, dtype: torch.dtype):
    """The grouped GEMM as `moe_triton.fused_moe` launches it at Qwen3-30B-A3B's shape (hidden
    2048, expert intermediate 768, 128 experts, top-8): gate/up or down, for a decode batch
    (16-row tiles) or a prefill chunk (64-row tiles)."""
    gemm = "gate_up" if "gate_up" in name else "down"
    step = name.rsplit("_", 1)[1]
    pairs = 8 if step == "decode" else 8 * 2048
    config = moe_triton.moe_launch_config(pairs, 128)
    num_warps, num_stages = config.pop("num_warps"), config.pop("num_stages")
    n, k = (2 * 768, 2048) if gemm == "gate_up" else (2048, 768)
    fn = moe_triton._grouped_gemm_kernel
    assert isinstance(fn, JITFunction), "compile with TRITON_INTERPRET unset"
    types = {"a_ptr": f"*{_TL_DTYPE[dtype]}", "b_ptr": f"*{_TL_DTYPE[dtype]}"}
    types |= {"c_ptr": f"*{_TL_DTYPE[dtype]}", "weights_ptr": "*fp32"}
    types |= {"sorted_pairs_ptr": "*i32", "tile_experts_ptr": "*i32"}
    scalars = {"N": n, "K": k, "num_pairs": pairs, "stride_am": k, "stride_be": n * k}
    scalars |= {"stride_bn": k, "stride_cm": n}
    constexprs = config | {
        "A_ROWS_PER_PAIR": 8 if gemm == "gate_up" else 1,
        "MUL_WEIGHT": gemm == "down",
        "COMPUTE_DTYPE": attention_triton._compute_dtype(dtype, True),
    }
    assert {*types, *scalars, *constexprs} == set(fn.arg_names)
    signature = types | dict.fromkeys(scalars, "i32") | dict.fromkeys(constexprs, "constexpr")
    aligned = [*types, *(a for a, v in scalars.items() if v % 16 == 0)]
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in aligned}
    return fn, signature, constexprs, attrs, {"num_warps": num_warps, "num_stages": num_stages}


CAPS = [75, 80, 90]
MOE_KERNELS = ["moe_gate_up_decode", "moe_down_decode", "moe_gate_up_prefill", "moe_down_prefill"]
AOT_KERNELS = ["rms_norm", "rms_norm_residual", "rotary", "silu_and_mul", *MOE_KERNELS]
# Shared memory per block: 64 KiB on sm_75, 99 KiB on the sm_86/sm_89 cards an sm_80 build
# also runs on, 227 KiB on sm_90.
SHARED_LIMIT = {75: 64 << 10, 80: 99 << 10, 90: 227 << 10}


def _targets(dtype: torch.dtype) -> list[int]:
    """sm_75 (Turing) serves fp32 and fp16 only: it has no bf16 arithmetic, so dtype "auto"
    picks fp16 there and an explicit bf16 fails at start-up (engine/config.py)."""
    return [cap for cap in CAPS if cap >= 80 or dtype != torch.bfloat16]


def compile_all() -> dict[str, str]:
    """Compile every variant for every target; variant id -> "ok" or the error. Runs in a
    process without the interpreter (under it, triton's library is not compilable)."""
    results = {}
    for name in AOT_KERNELS:
        for dtype in DTYPES:
            fn, signature, constexprs, attrs, options = _variant(name, dtype)
            for cap in _targets(dtype):
                key = f"{name}-{_TL_DTYPE[dtype]}-sm_{cap}"
                try:
                    compiled = triton.compile(
                        ASTSource(fn, signature, constexprs, attrs),
                        target=GPUTarget("cuda", cap, 32),
                        options=options,
                    )
                    ptx = compiled.asm["ptx"]
                    assert compiled.asm["cubin"], "empty cubin"
                    assert f".target sm_{cap}" in ptx, "wrong ptx target"
                    if name.startswith("moe") and cap < 80:
                        # Triton lowers tl.dot to FMA loops before sm_80 (docs/cuda.md says so)
                        assert "mma" not in ptx, "tensor-core MMA on sm_75: update docs/cuda.md"
                    elif name.startswith("moe") and dtype != torch.float32:
                        # 16-bit operands must reach the tensor cores, not FMA loops
                        assert "mma" in ptx, "no tensor-core MMA in the PTX"
                    assert compiled.metadata.shared <= SHARED_LIMIT[cap], "too much shared memory"
                    results[key] = "ok"
                except Exception as e:  # reported per variant by the test below
                    results[key] = f"{type(e).__name__}: {e}"
    return results


@pytest.fixture(scope="module")
def aot_results() -> dict[str, str]:
    code = "import json; from tests.test_elementwise_triton import compile_all as c; "
    code += "print(json.dumps(c()))"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "dtype,cap",
    [(dtype, cap) for dtype in DTYPES for cap in _targets(dtype)],
    ids=lambda v: f"sm_{v}" if isinstance(v, int) else str(v),
)
@pytest.mark.parametrize("name", AOT_KERNELS)
def test_compiles_ahead_of_time(aot_results, name, dtype, cap):
    assert aot_results[f"{name}-{_TL_DTYPE[dtype]}-sm_{cap}"] == "ok"
