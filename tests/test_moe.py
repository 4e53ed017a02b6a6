"""The fused MoE layer's torch reference against a per-token loop, and MoE models from dummy
weights (parity with transformers is in test_parity_random.py)."""

import json

import pytest
import torch
import transformers

from pagoda.engine import LLM, SamplingParams
from pagoda.kernels.activation import silu_and_mul
from pagoda.kernels.moe import fused_moe, select_experts


def per_token(x, w13, w2, weights, ids):
    out = torch.zeros_like(x)
    for t in range(x.shape[0]):
        for w, e in zip(weights[t].tolist(), ids[t].tolist()):
            out[t] += w * (silu_and_mul(x[t] @ w13[e].t()) @ w2[e].t())
    return out


@pytest.mark.parametrize(
    ("experts", "top_k", "tokens"), [(4, 1, 1), (4, 2, 7), (8, 8, 5), (16, 4, 3), (64, 8, 9)]
)
@pytest.mark.parametrize("renormalize", [True, False])
def test_fused_moe_matches_per_token_loop(experts, top_k, tokens, renormalize):
    g = torch.Generator().manual_seed(experts * 100 + top_k)
    hidden, inter = 32, 48
    x = torch.randn(tokens, hidden, generator=g)
    w13 = torch.randn(experts, 2 * inter, hidden, generator=g) * 0.2
    w2 = torch.randn(experts, hidden, inter, generator=g) * 0.2
    weights, ids = select_experts(torch.randn(tokens, experts, generator=g), top_k, renormalize)
    assert ids.shape == (tokens, top_k)
    if renormalize:
        torch.testing.assert_close(weights.sum(-1), torch.ones(tokens))
    if experts * 2 > tokens * top_k:
        assert torch.bincount(ids.flatten(), minlength=experts).eq(0).any()  # idle experts
    got = fused_moe(x, w13, w2, weights, ids)
    torch.testing.assert_close(got, per_token(x, w13, w2, weights, ids), rtol=1e-5, atol=1e-5)


def test_no_tokens():
    out = fused_moe(
        torch.empty(0, 8),
        torch.randn(4, 16, 8),
        torch.randn(4, 8, 8),
        torch.empty(0, 2),
        torch.empty(0, 2, dtype=torch.int64),
    )
    assert out.shape == (0, 8)


@pytest.mark.parametrize("arch", ["Qwen3MoeForCausalLM", "MixtralForCausalLM"])
def test_dummy_weights_from_config_alone(tmp_path, arch):
    config = (
        transformers.Qwen3MoeConfig(num_experts=8, moe_intermediate_size=32, head_dim=32)
        if arch.startswith("Qwen")
        else transformers.MixtralConfig(num_local_experts=8)
    )
    config.update(
        dict(
            vocab_size=256,
            hidden_size=64,
            intermediate_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            num_experts_per_tok=2,
            max_position_embeddings=256,
            architectures=[arch],
        )
    )
    config.save_pretrained(tmp_path)
    assert "architectures" in json.loads((tmp_path / "config.json").read_text())
    llm = LLM(str(tmp_path), load_format="dummy", skip_tokenizer_init=True)
    out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=4, min_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4
