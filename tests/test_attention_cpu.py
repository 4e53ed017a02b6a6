"""The CPU paged-attention kernel (decode rows and prefill chunks) against the torch reference
in `kernels.attention`.

Batches come from the Triton tests' builder: caches NaN wherever no token was written and
junk block-table entries past each sequence's end, so any read outside the context shows."""

import pytest
import torch

from pagoda.kernels import attention_cpu, cpu_native
from tests.test_attention_triton import (
    DECODE,
    MIXED,
    _check_skips_negative_slots,
    _check_write_kv_cache,
    _make_batch,
    _qkv_views,
    _reference,
    seed,
)

pytestmark = pytest.mark.skipif(
    cpu_native.unavailable_reason("attention_cpu") is not None,
    reason=f"CPU attention kernel: {cpu_native.unavailable_reason('attention_cpu')}",
)

__all__ = ["seed"]  # the fixture, imported for pytest


# Prefill chunks of several 16-token tiles with ragged ends, fresh and on a cached prefix.
LONG_PREFILL = [(0, 130), (37, 45), (200, 1), (5, 17), (0, 2)]
# One decode sequence: its KV heads are tasks of their own (as with fewer than two decode rows
# a thread), where DECODE's five rows are a task each on up to two threads.
ONE_DECODE = [(130, 1)]


@pytest.mark.parametrize(
    "seqs",
    [DECODE, ONE_DECODE, MIXED, LONG_PREFILL],
    ids=["decode", "one_decode", "mixed", "long_prefill"],
)
@pytest.mark.parametrize(
    "num_heads,num_kv_heads,head_dim", [(4, 4, 64), (8, 2, 128), (8, 1, 32), (9, 3, 64)]
)
@pytest.mark.parametrize("block_size", [16, 32])
def test_matches_reference(seqs, num_heads, num_kv_heads, head_dim, block_size, seed):
    k_cache, v_cache, meta = _make_batch(seqs, num_kv_heads, head_dim, torch.float32, block_size)
    q, _, _ = _qkv_views(sum(n for _, n in seqs), num_heads, num_kv_heads, head_dim, torch.float32)
    scale = head_dim**-0.5
    out = attention_cpu.paged_attention(q, k_cache, v_cache, meta, scale)
    expected = _reference(q, k_cache, v_cache, meta, scale)
    assert out.shape == q.shape
    assert torch.isfinite(out).all(), f"seed {seed}: read outside a sequence's context"
    torch.testing.assert_close(
        out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}"
    )


@pytest.mark.parametrize("limit", [0, 100], ids=["all_prefill_torch", "some_prefill_torch"])
def test_long_prefills_take_the_torch_path(limit, monkeypatch, seed):
    """Prefill chunks with more context than LONG_PREFILL are attended by torch, the rest of the
    batch by the kernel, in one call."""
    monkeypatch.setattr(attention_cpu, "LONG_PREFILL", limit)
    k_cache, v_cache, meta = _make_batch(LONG_PREFILL, 3, 64, torch.float32, 16)
    q, _, _ = _qkv_views(sum(n for _, n in LONG_PREFILL), 9, 3, 64, torch.float32)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    out = attention_cpu.paged_attention(q, k_cache, v_cache, meta, 0.125)
    expected = _reference(q, k_cache, v_cache, meta, 0.125)
    torch.testing.assert_close(
        out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}"
    )


def test_unsupported_shapes_take_the_torch_path(seed):
    assert attention_cpu.supports(torch.float32, 8, 2, 64)
    assert not attention_cpu.supports(torch.float32, 8, 2, 40)  # not whole 16-lane chunks
    assert not attention_cpu.supports(torch.float32, 8, 2, 96)  # no instance for 6 chunks
    assert not attention_cpu.supports(torch.bfloat16, 8, 2, 64)
    seqs = [(20, 1), (5, 1)]
    k_cache, v_cache, meta = _make_batch(seqs, 2, 40, torch.float32, 16)
    q, _, _ = _qkv_views(2, 8, 2, 40, torch.float32)
    k_cache, v_cache = torch.nan_to_num(k_cache), torch.nan_to_num(v_cache)
    out = attention_cpu.paged_attention(q, k_cache, v_cache, meta, 0.2)
    torch.testing.assert_close(out, _reference(q, k_cache, v_cache, meta, 0.2))


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 128), (2, 32)])
def test_write_kv_cache(num_kv_heads, head_dim, seed):
    _check_write_kv_cache(attention_cpu.write_kv_cache, torch.float32, num_kv_heads, head_dim, seed)


def test_write_kv_cache_skips_negative_slots():
    _check_skips_negative_slots(attention_cpu.write_kv_cache)


@pytest.mark.parametrize(
    "seqs", [DECODE, ONE_DECODE, MIXED, LONG_PREFILL], ids=["decode", "one", "mixed", "long"]
)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128)])
def test_bf16_cache_matches_reference(seqs, num_heads, num_kv_heads, head_dim, seed, monkeypatch):
    """fp32 queries over a bf16 cache, prefill chunks kept off the AMX tiles: the kernel widens
    each bf16 value exactly and computes in fp32, so it matches the fp32 reference on the
    widened cache to fp32 rounding."""
    monkeypatch.setattr(attention_cpu, "prefill_on_amx", lambda *_: False)
    assert attention_cpu.supports(torch.float32, num_heads, num_kv_heads, head_dim, torch.bfloat16)
    k_cache, v_cache, meta = _make_batch(seqs, num_kv_heads, head_dim, torch.bfloat16, 16)
    q, _, _ = _qkv_views(sum(n for _, n in seqs), num_heads, num_kv_heads, head_dim, torch.float32)
    out = attention_cpu.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    expected = _reference(q, k_cache, v_cache, meta, head_dim**-0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all(), f"seed {seed}"
    torch.testing.assert_close(
        out, expected, atol=1e-5, rtol=1e-5, msg=lambda m: f"seed {seed}: {m}"
    )


@pytest.mark.skipif(not attention_cpu.prefill_on_amx(torch.bfloat16, 64), reason="no AMX")
@pytest.mark.parametrize("seqs", [MIXED, LONG_PREFILL], ids=["mixed", "long"])
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(9, 3, 64), (8, 2, 128), (8, 1, 32)])
@pytest.mark.parametrize("block_size", [16, 32])
def test_prefill_on_amx_matches_reference(
    seqs, num_heads, num_kv_heads, head_dim, block_size, seed
):
    """Prefill chunks on AMX tiles round the queries and the softmax's probabilities to bf16,
    with fp32 sums. Against the fp32 reference on the same bf16-rounded queries, what is left is
    the rounding of each probability, at most 2^-9 of it: an output moves by at most about
    2^-9 of the largest |v| for the numerator's rounding, and as much again for the fp32 sum it
    is divided by, so 2^-7 of max |v| bounds it with a margin (the worst seen: about 2^-10).
    Decode rows in the same batch stay exact."""
    k_cache, v_cache, meta = _make_batch(seqs, num_kv_heads, head_dim, torch.bfloat16, block_size)
    q, _, _ = _qkv_views(sum(n for _, n in seqs), num_heads, num_kv_heads, head_dim, torch.float32)
    out = attention_cpu.paged_attention(q, k_cache, v_cache, meta, head_dim**-0.5)
    assert out.dtype == torch.float32 and torch.isfinite(out).all(), f"seed {seed}"
    expected = _reference(q.bfloat16().float(), k_cache, v_cache, meta, head_dim**-0.5)
    v_max = torch.nan_to_num(v_cache.float()).abs().max().item()
    torch.testing.assert_close(
        out, expected, atol=2**-7 * v_max, rtol=0, msg=lambda m: f"seed {seed}: {m}"
    )
    decode = [i for i, n in enumerate(meta.query_lens_host) if n == 1]
    rows = meta.query_start_loc[decode].long()
    exact = _reference(q, k_cache, v_cache, meta, head_dim**-0.5)
    torch.testing.assert_close(out[rows], exact[rows], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("num_kv_heads,head_dim", [(1, 64), (3, 64), (2, 32)])
def test_write_kv_cache_rounds_into_a_bf16_cache_as_torch_does(num_kv_heads, head_dim, seed):
    """fp32 rows into a bf16 cache, rounded to nearest even: bit for bit torch's `.bfloat16()`
    (the rows include values halfway between two bf16 numbers)."""
    _, k, v = _qkv_views(40, 2 * num_kv_heads, num_kv_heads, head_dim, torch.float32)
    halfway = torch.tensor([1.0 + 2**-8, 1.0 + 3 * 2**-8, -(1.0 + 2**-8)])  # ties to even
    k[0, 0, :3] = halfway
    slots = torch.randperm(6 * 16)[:40]
    shape = (6, 16, num_kv_heads, head_dim)
    k_cache, v_cache = (
        torch.zeros(shape, dtype=torch.bfloat16),
        torch.zeros(shape, dtype=torch.bfloat16),
    )
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    attention_cpu.write_kv_cache(k, v, k_cache, v_cache, slots)
    k_ref.view(-1, num_kv_heads, head_dim)[slots] = k.bfloat16()
    v_ref.view(-1, num_kv_heads, head_dim)[slots] = v.bfloat16()
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref), f"seed {seed}"
