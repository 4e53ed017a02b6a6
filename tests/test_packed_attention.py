"""The packed-run attention kernel (`kernels/csrc/packed_attention_bf16.cpp`) against its torch
reference (one SDPA per sequence, in fp32). It needs AMX tiles: elsewhere only the reference
runs, in the tests of the embedding worker."""

from __future__ import annotations

import itertools

import pytest
import torch
import torch.nn.functional as F

from pagoda.kernels import packed_attention

needs_kernel = pytest.mark.skipif(
    not packed_attention.available(), reason="the packed-run kernel needs AMX tiles"
)
# bf16 keeps 8 bits of mantissa: outputs of magnitude up to ~4 round by up to 2^-9 x 4, and the
# probabilities are rounded to bf16 before P V (measured: at most 0.0083)
ATOL, RTOL = 2e-2, 1e-2


def qkv(lengths: list[int], heads: int, kv_heads: int, dim: int) -> tuple:
    """q, k and v as column slices of one fused projection: a token stride of their own."""
    tokens = sum(lengths)
    fused = torch.randn(tokens, (heads + 2 * kv_heads) * dim).bfloat16()
    q = fused[:, : heads * dim].view(tokens, heads, dim)
    k = fused[:, heads * dim : (heads + kv_heads) * dim].view(tokens, kv_heads, dim)
    v = fused[:, (heads + kv_heads) * dim :].view(tokens, kv_heads, dim)
    return q, k, v, torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


@needs_kernel
@pytest.mark.parametrize(
    ("heads", "kv_heads", "dim"), [(12, 12, 32), (16, 16, 64), (8, 2, 128), (4, 1, 96)]
)
def test_kernel_matches_the_reference(heads: int, kv_heads: int, dim: int):
    torch.manual_seed(heads * dim)
    # partial blocks of 16 queries and 32 keys, a single token, one long sequence
    lengths = [1, 15, 16, 17, 31, 32, 33, 5, 300, 64]
    q, k, v, cu = qkv(lengths, heads, kv_heads, dim)
    out = packed_attention.packed_attention(q, k, v, cu, dim**-0.5)
    expected = packed_attention.packed_attention_reference(
        q.float(), k.float(), v.float(), cu, dim**-0.5
    )
    torch.testing.assert_close(out.float(), expected, atol=ATOL, rtol=RTOL)


@needs_kernel
def test_each_sequence_attends_to_itself_alone():
    # the same sequence alone and between two others gives the same rows
    q, k, v, cu = qkv([40, 23, 70], 4, 4, 32)
    together = packed_attention.packed_attention(q, k, v, cu, 0.2)
    middle = slice(40, 63)
    alone = packed_attention.packed_attention(
        q[middle], k[middle], v[middle], torch.tensor([0, 23], dtype=torch.int32), 0.2
    )
    assert torch.equal(together[middle], alone)
    # one run as a single sequence differs: the bounds are what keeps them apart
    whole = packed_attention.packed_attention(q, k, v, torch.tensor([0, 133]), 0.2)
    assert (whole[middle].float() - alone.float()).abs().max() > 0.1


def test_reference_is_attention_under_a_block_diagonal_mask():
    torch.manual_seed(0)
    q, k, v, cu = (t.float() if t.dtype == torch.bfloat16 else t for t in qkv([3, 9, 4], 4, 2, 32))
    segment = torch.repeat_interleave(torch.arange(3), torch.tensor([3, 9, 4]))
    mask = segment[:, None] == segment[None, :]
    k2, v2 = (t.repeat_interleave(2, 1).transpose(0, 1) for t in (k, v))
    expected = F.scaled_dot_product_attention(q.transpose(0, 1), k2, v2, attn_mask=mask)
    got = packed_attention.packed_attention_reference(q, k, v, cu, 32**-0.5)
    torch.testing.assert_close(got, expected.transpose(0, 1))
