"""The Triton paged-attention kernels against the torch reference in `kernels.attention`.

Without a GPU the kernels run under the Triton interpreter (TRITON_INTERPRET=1, set by
conftest.py before triton is imported) on CPU tensors; on a CUDA machine they run on the GPU. The
ahead-of-time test builds real sm_75/sm_80/sm_90 cubins either way (ptxas ships in the wheel).

Inputs are random and fresh each run; a failing case prints its seed. Caches are poisoned with
NaN everywhere no token was written (unused blocks, the tail of each last block) and unused
block-table entries point at such blocks, so any unmasked read shows up as NaN.
"""

import json  # noqa: E402
import math
import os
import random  # noqa: E402
import subprocess  # noqa: E402
import sys
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402
import torch
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from pagoda.kernels import attention as ref  # noqa: E402
from pagoda.kernels import attention_triton as tri  # noqa: E402
from pagoda.kernels.attention import AttentionMetadata  # noqa: E402

# The 3.6 interpreter turns loop bounds into ints through a numpy deprecation, once per step.
pytestmark = pytest.mark.filterwarnings("ignore:Conversion of an array with ndim > 0")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TOL = {torch.float32: 1e-4, torch.float16: 2e-3, torch.bfloat16: 2e-2}


@pytest.fixture
def seed():
    """A fresh seed per test, shown in the failure report."""
    value = random.SystemRandom().randrange(2**31)
    torch.manual_seed(value)
    random.seed(value)
    return value


def _qkv_views(num_tokens, num_heads, num_kv_heads, head_dim, dtype):
    """q, k, v as the strided slices of one fused projection output, as a model makes them."""
    width = (num_heads + 2 * num_kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, device=DEVICE).to(dtype)
    q, k, v = qkv.split(
        [num_heads * head_dim, num_kv_heads * head_dim, num_kv_heads * head_dim], dim=-1
    )
    return (
        q.view(num_tokens, num_heads, head_dim),
        k.view(num_tokens, num_kv_heads, head_dim),
        v.view(num_tokens, num_kv_heads, head_dim),
    )


def _make_batch(seqs, num_kv_heads, head_dim, dtype, block_size, spare_blocks=4):
    """seqs: (cached tokens, new tokens) per sequence. Returns K and V caches holding every
    token of every sequence (the new ones too) at scattered blocks, NaN elsewhere, and the
    step's metadata."""
    blocks_per_seq = [-(-(c + n) // block_size) for c, n in seqs]
    num_blocks = sum(blocks_per_seq) + spare_blocks
    pool = torch.randperm(num_blocks).tolist()
    spare = pool[sum(blocks_per_seq) :]
    width = max(blocks_per_seq) + 2
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)
    v_cache = torch.full(shape, float("nan"), device=DEVICE, dtype=dtype)
    tables, slots = [], []
    for (cached, new), used in zip(seqs, blocks_per_seq):
        own, pool = pool[:used], pool[used:]
        tables.append(own + random.choices(spare, k=width - used))  # junk past the end
        total = cached + new
        seq_slots = [own[p // block_size] * block_size + p % block_size for p in range(total)]
        shape = (total, num_kv_heads, head_dim)
        k_cache.view(-1, num_kv_heads, head_dim)[seq_slots] = torch.randn(shape).to(DEVICE, dtype)
        v_cache.view(-1, num_kv_heads, head_dim)[seq_slots] = torch.randn(shape).to(DEVICE, dtype)
        slots += seq_slots[cached:]
    query_lens = [n for _, n in seqs]
    seq_lens = [c + n for c, n in seqs]
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)

    def ints(values, dtype=torch.int32):
        return torch.tensor(values, dtype=dtype, device=DEVICE)

    meta = AttentionMetadata(
        query_start_loc=ints(starts),
        seq_lens=ints(seq_lens),
        block_tables=ints(tables),
        slot_mapping=ints(slots, torch.int64),
        max_query_len=max(query_lens),
        max_seq_len=max(seq_lens),
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
    )
    return k_cache, v_cache, meta


def _reference(q, k_cache, v_cache, meta, scale):
    """The torch path in fp32 on NaN-free caches (its decode path reads junk slots of short
    sequences under a mask, which is fine for finite junk only)."""
    meta = AttentionMetadata(**{f: getattr(meta, f) for f in meta.__slots__})
    meta.decode_plan = None
    clean_k = torch.nan_to_num(k_cache.float(), nan=0.0)
    clean_v = torch.nan_to_num(v_cache.float(), nan=0.0)
    return ref.paged_attention(q.float(), clean_k, clean_v, meta, scale)


def _check_attention(seqs, num_heads, num_kv_heads, head_dim, dtype, block_size, seed):
    k_cache, v_cache, meta = _make_batch(seqs, num_kv_heads, head_dim, dtype, block_size)
    q, _, _ = _qkv_views(sum(n for _, n in seqs), num_heads, num_kv_heads, head_dim, dtype)
    scale = head_dim**-0.5
    out = tri.paged_attention(q, k_cache, v_cache, meta, scale)
    expected = _reference(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert torch.isfinite(out).all(), f"seed {seed}: NaN/inf leaked from junk cache"
    tol = TOL[dtype]
    torch.testing.assert_close(
        out.float(), expected, atol=tol, rtol=tol, msg=lambda m: f"seed {seed}: {m}"
    )


# (cached, new) per sequence. Decode: context 1, exactly one block, several blocks, long.
DECODE = [(0, 1), (15, 1), (77, 1), (300, 1), (31, 1)]
# Mixed: decode rows, fresh prefills (one of exactly one block), prefills on a cached prefix.
MIXED = [(40, 1), (0, 37), (0, 16), (50, 21), (0, 1), (17, 3), (100, 1)]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 32), (16, 2, 64)]
)
def test_decode(dtype, num_heads, num_kv_heads, head_dim, seed):
    _check_attention(DECODE, num_heads, num_kv_heads, head_dim, dtype, 16, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 32), (16, 2, 64)]
)
def test_mixed_batch(dtype, num_heads, num_kv_heads, head_dim, seed):
    _check_attention(MIXED, num_heads, num_kv_heads, head_dim, dtype, 16, seed)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(8, 2, 80), (6, 2, 96), (7, 1, 112), (4, 2, 8)]
)
def test_head_size_not_a_power_of_two(dtype, num_heads, num_kv_heads, head_dim, seed):
    """Head sizes of real models (80: h2o-danube, 96, 112) and a tiny one run in a padded,
    masked tile: decode and mixed steps, contexts ending on and one past a block boundary."""
    decode = [(0, 1), (15, 1), (16, 1), (70, 1)]
    mixed = [(0, 17), (16, 1), (31, 3), (5, 1)]
    for seqs in (decode, mixed):
        _check_attention(seqs, num_heads, num_kv_heads, head_dim, dtype, 16, seed)


@pytest.mark.parametrize("head_dim", [64, 128, 256])  # 256: half-height tiles
def test_prefill_many_query_tiles(head_dim, seed):
    """A long fresh prompt and a long chunk on a prefix: several query tiles per sequence."""
    seqs = [(0, 150), (70, 90), (5, 1)]
    _check_attention(seqs, 4, 4, head_dim, torch.float16, 16, seed)


@pytest.mark.parametrize("head_dim", [64, 256])
def test_fp16_in_the_sm75_tiles(monkeypatch, head_dim, seed):
    """fp16 in the tiles that a Turing GPU gets (32 KV positions, 32- and 16-row query tiles):
    decode, mixed and multi-tile prefill steps, run here by the interpreter."""
    monkeypatch.setattr(tri, "_device_capability", lambda device: 75)
    config = tri._extend_config(4, head_dim, 16, torch.float16, 75, 150)
    assert tri._decode_config(4, head_dim, 16, torch.float16, 75)["TILE_N"] == 32
    assert config["BLOCK_Q"] * config["GROUP_PAD"] == (32 if head_dim <= 128 else 16)
    for seqs in (DECODE, MIXED, [(0, 150), (70, 90), (5, 1)]):
        _check_attention(seqs, 8, 2, head_dim, torch.float16, 16, seed)


@pytest.mark.parametrize("mode", ["decode", "mixed"])
def test_block_size_32(mode, seed):
    seqs = DECODE if mode == "decode" else MIXED
    _check_attention(seqs, 8, 2, 64, torch.bfloat16, 32, seed)


@pytest.mark.parametrize("num_splits", [1, 3, 16])
def test_decode_splits(monkeypatch, num_splits, seed):
    """The split reduce, with splits left empty by short sequences and a non-power-of-two count."""
    monkeypatch.setattr(tri, "_num_splits", lambda *_: num_splits)
    seqs = [(0, 1), (63, 1), (64, 1), (700, 1)]
    _check_attention(seqs, 8, 2, 64, torch.float32, 16, seed)


def test_decode_long_context_splits_by_itself(seed):
    assert tri._num_splits(700, 2, 2, 64) > 1
    _check_attention([(699, 1), (10, 1)], 4, 2, 64, torch.float16, 16, seed)


def test_decode_rows_beside_a_long_chunk(seed):
    """Query tiles are handed out over the flat batch: decode rows before and after a chunk of
    many tiles, and chunks that start mid-tile, each find their own sequence."""
    seqs = [(30, 1), (3, 1), (0, 150), (12, 1), (40, 37), (7, 1), (0, 5), (90, 1)]
    _check_attention(seqs, 8, 2, 64, torch.float16, 16, seed)


class _LaunchRecorder:
    """Stands in for a kernel: records each launch's grid, runs nothing."""

    def __init__(self):
        self.grids = []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return lambda *args, **kwargs: None


def test_mixed_step_launches_only_real_query_tiles(monkeypatch):
    """256 decodes beside an 8k prefill chunk (Llama-3.1-8B attention, bf16): the extend grid
    covers the batch's query tiles, not sequences x the longest query's tiles (1,048,576
    programs per layer before). Meta tensors: only the launch is looked at."""
    recorder = _LaunchRecorder()
    monkeypatch.setattr(tri, "_extend_kernel", recorder)
    num_heads, num_kv_heads, head_dim, chunk, decodes = 32, 8, 128, 8192, 256
    query_lens = [1] * decodes + [chunk]
    seq_lens = [1000] * decodes + [chunk]
    num_tokens = sum(query_lens)
    starts = [0]
    for n in query_lens:
        starts.append(starts[-1] + n)
    meta_device = torch.device("meta")
    meta = AttentionMetadata(
        query_start_loc=torch.empty(len(starts), dtype=torch.int32, device=meta_device),
        seq_lens=torch.empty(len(seq_lens), dtype=torch.int32, device=meta_device),
        block_tables=torch.empty(len(seq_lens), 512, dtype=torch.int32, device=meta_device),
        slot_mapping=torch.empty(num_tokens, dtype=torch.int64, device=meta_device),
        max_query_len=chunk,
        max_seq_len=chunk,
        query_lens_host=query_lens,
        seq_lens_host=seq_lens,
    )
    cache = torch.empty(4096, 16, num_kv_heads, head_dim, dtype=torch.bfloat16, device="meta")
    q = torch.empty(num_tokens, num_heads, head_dim, dtype=torch.bfloat16, device="meta")
    tri.paged_attention(q, cache, cache, meta, head_dim**-0.5)
    (grid,) = recorder.grids
    programs = math.prod(grid)
    block_q = tri._extend_config(4, head_dim, 16, torch.bfloat16, 90, chunk)["BLOCK_Q"]
    real_tiles = sum(-(-n // block_q) for n in query_lens)
    assert real_tiles * num_kv_heads <= programs <= (real_tiles + len(query_lens)) * num_kv_heads
    assert programs < 7000  # 6,280: (8448 // 16 + 257) x 8


def test_captured_decode_spreads_a_short_context_over_every_split(monkeypatch, seed):
    """A CUDA graph launches decode with max_seq_len = max_model_len (32k here): a 4k context
    must still keep every split busy (before, 2 of 16 splits per head had work)."""
    captured = []
    partials = tri._partials

    def keep(*args):
        captured.append(partials(*args))
        return captured[-1]

    monkeypatch.setattr(tri, "_partials", keep)
    num_heads, num_kv_heads, head_dim, context = 8, 2, 32, 4096
    k_cache, v_cache, meta = _make_batch(
        [(context - 1, 1)], num_kv_heads, head_dim, torch.float16, 16
    )
    meta.max_seq_len = 32768  # what DecodeGraphs captures with
    q, _, _ = _qkv_views(1, num_heads, num_kv_heads, head_dim, torch.float16)
    out = tri.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    expected = _reference(q, k_cache, v_cache, meta, head_dim**-0.5)
    torch.testing.assert_close(out.float(), expected, atol=2e-3, rtol=2e-3)
    ((_, _, part_sum),) = captured
    num_splits = part_sum.shape[2]
    assert num_splits == tri._num_splits(32768, 1, num_kv_heads, 64) == 16
    busy = int((part_sum > 0).sum())  # a split with context has a positive softmax sum
    assert busy == num_heads * num_splits, f"seed {seed}: {busy} busy (head, split) pairs"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128), (2, 32), (2, 80)])
def test_write_kv_cache(dtype, num_kv_heads, head_dim, seed):
    _check_write_kv_cache(tri.write_kv_cache, dtype, num_kv_heads, head_dim, seed)


def test_write_kv_cache_skips_negative_slots():
    _check_skips_negative_slots(tri.write_kv_cache)


def _check_write_kv_cache(write, dtype, num_kv_heads, head_dim, seed):
    """`write` stores the strided k, v views of a fused projection as the reference does."""
    num_blocks, block_size, num_tokens = 6, 16, 40
    _, k, v = _qkv_views(num_tokens, 2 * num_kv_heads, num_kv_heads, head_dim, dtype)
    assert not k.is_contiguous()
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(shape, device=DEVICE).to(dtype)
    v_cache = torch.randn(shape, device=DEVICE).to(dtype)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    write(k, v, k_cache, v_cache, slots)
    ref.write_kv_cache(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref), f"seed {seed}"
    assert torch.equal(v_cache, v_ref), f"seed {seed}"


def _check_skips_negative_slots(write):
    """A negative slot (a padding row) is not written."""
    k = torch.randn(3, 2, 64, device=DEVICE)
    v = torch.randn(3, 2, 64, device=DEVICE)
    k_cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    v_cache = torch.zeros(2, 16, 2, 64, device=DEVICE)
    slots = torch.tensor([5, -1, 20], device=DEVICE)
    write(k, v, k_cache, v_cache, slots)
    flat_k, flat_v = k_cache.view(-1, 2, 64), v_cache.view(-1, 2, 64)
    assert torch.equal(flat_k[5], k[0]) and torch.equal(flat_k[20], k[2])
    assert torch.equal(flat_v[5], v[0]) and torch.equal(flat_v[20], v[2])
    assert int((flat_k != 0).any(-1).any(-1).sum()) == 2


# Ahead-of-time compilation: what the interpreter cannot check (shape rules, layouts, ptxas).

_TORCH_DTYPE = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
_INT_POINTERS = {
    "block_tables_ptr": "*i32",
    "seq_lens_ptr": "*i32",
    "query_start_loc_ptr": "*i32",
    "slot_ptr": "*i64",
    "part_acc_ptr": "*fp32",
    "part_max_ptr": "*fp32",
    "part_sum_ptr": "*fp32",
}


def _jit_function(kernel):
    """The compilable JITFunction, also when the module was imported under the interpreter."""
    if isinstance(kernel, triton.runtime.JITFunction):
        return kernel
    return triton.runtime.JITFunction(kernel.fn)


def _variants(dtype, head_dim, capability):
    """(kernel, launch config) as `paged_attention` makes them on that GPU, at a GQA ratio
    of 4."""
    torch_dtype = _TORCH_DTYPE[dtype]
    decode = tri._decode_config(4, head_dim, 16, torch_dtype, capability)
    return [
        (tri._write_kv_kernel, tri._write_kv_config(4, head_dim, 16)),
        (tri._decode_split_kernel, decode),
        (tri._decode_reduce_kernel, tri._reduce_config(tri._MAX_SPLITS, head_dim)),
        # a long prefill chunk, and a batch of short queries (16-row tiles)
        (tri._extend_kernel, tri._extend_config(4, head_dim, 16, torch_dtype, capability, 512)),
        (tri._extend_kernel, tri._extend_config(4, head_dim, 16, torch_dtype, capability, 2)),
    ]


def _source(fn, dtype, constexprs):
    """ASTSource with the types and the 16-divisibility hints a typical launch specializes on
    (aligned pointers, strides that are multiples of 16)."""
    signature, attrs = {}, {}
    for index, name in enumerate(fn.arg_names):
        if name in constexprs:
            signature[name] = "constexpr"
            continue
        if name in _INT_POINTERS:
            signature[name] = _INT_POINTERS[name]
        elif name.endswith("_ptr"):
            signature[name] = f"*{dtype}"
        elif name == "scale_log2":
            signature[name] = "fp32"
        else:
            signature[name] = "i32"
        if name.endswith("_ptr") or name.startswith("stride_"):
            attrs[(index,)] = [["tt.divisibility", 16]]
    return ASTSource(fn, signature, constexprs, attrs)


# sm_75 (Turing: T4, RTX 20xx) gets fp32 and fp16 only: dtype "auto" serves fp16 there and an
# explicit bf16 is a start-up error (engine/config.py), as the GPU has no bf16 arithmetic.
TARGETS = [(75, "fp32"), (75, "fp16")] + [
    (c, d) for c in (80, 90) for d in ("fp32", "fp16", "bf16")
]
HEAD_DIMS = [32, 64, 80, 128, 256]  # 80: a padded, masked head tile
# Shared memory per block: 64 KiB on sm_75; an sm_80 build runs on sm_86/sm_89 cards too,
# which have 99 KiB.
SHARED_LIMIT = {75: 64 << 10, 80: 99 << 10, 90: 227 << 10}


def _check_dot_path(capability: int, dtype: str, ptx: str) -> str:
    """16-bit operands must reach the tensor cores from sm_80 on, not fall back to FMA loops.
    Triton emits no tensor-core MMA for sm_75 at all (its tl.dot falls back to FMA there, as
    docs/cuda.md says): should a Triton version start to, that page needs updating."""
    if capability >= 80 and dtype != "fp32" and "mma" not in ptx:
        return "no tensor-core MMA in the PTX"
    if capability < 80 and "mma" in ptx:
        return "tensor-core MMA on sm_75: docs/cuda.md says there is none"
    return ""


def _compile_all() -> dict[str, str]:
    """Compile every variant; "cap-dtype-head_dim" -> "" or what failed. Needs a triton
    imported in compiler mode (TRITON_INTERPRET unset), hence its own process."""
    results = {}
    for capability, dtype in TARGETS:
        target = GPUTarget("cuda", capability, 32)
        for head_dim in HEAD_DIMS:
            problems = []
            for kernel, config in _variants(dtype, head_dim, capability):
                fn = _jit_function(kernel)
                constexprs = {k: v for k, v in config.items() if k != "num_warps"}
                options = {"num_warps": config["num_warps"]}
                try:
                    compiled = triton.compile(
                        _source(fn, dtype, constexprs), target=target, options=options
                    )
                except Exception as e:  # reported per variant
                    problems.append(f"{fn.__name__}: {type(e).__name__}: {e}")
                    continue
                if not compiled.asm.get("cubin"):
                    problems.append(f"{fn.__name__}: no cubin")
                if compiled.metadata.shared > SHARED_LIMIT[capability]:
                    problems.append(f"{fn.__name__}: {compiled.metadata.shared} B of shared memory")
                if "COMPUTE_DTYPE" not in constexprs:  # a kernel without tl.dot
                    continue
                if problem := _check_dot_path(capability, dtype, compiled.asm["ptx"]):
                    problems.append(f"{fn.__name__}: {problem}")
            results[f"{capability}-{dtype}-{head_dim}"] = "\n".join(problems)
    return results


@pytest.fixture(scope="module")
def compiled_variants(tmp_path_factory) -> dict[str, str]:
    out = tmp_path_factory.mktemp("aot") / "results.json"
    env = {**os.environ, "TRITON_INTERPRET": "0"}
    code = (
        "import json, sys; from tests.test_attention_triton import _compile_all; "
        "json.dump(_compile_all(), open(sys.argv[1], 'w'))"
    )
    root = Path(__file__).resolve().parents[1]
    run = subprocess.run(
        [sys.executable, "-c", code, str(out)], cwd=root, env=env, capture_output=True, text=True
    )
    assert run.returncode == 0, run.stderr[-4000:]
    return json.loads(out.read_text())


@pytest.mark.parametrize("capability,dtype", TARGETS)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_compiles_ahead_of_time(compiled_variants, capability, dtype, head_dim):
    assert compiled_variants[f"{capability}-{dtype}-{head_dim}"] == ""
