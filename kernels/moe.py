"""Mixture-of-experts: top-k routing and the fused expert layer, the torch reference path.

Expert weights are stacked per layer: w13 [E, 2 * I, H] holds each expert's gate and up
projections (gate rows first), w2 [E, H, I] its down projection. Tokens are sorted by expert so
that each expert runs one GEMM over all the tokens routed to it (a grouped GEMM), the way the
Triton kernel tiles them on a GPU.
"""

from __future__ import annotations

import torch

from pagoda.kernels.activation import silu_and_mul


def select_experts(
    router_logits: torch.Tensor, top_k: int, renormalize: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """Softmax over the experts (fp32), then the top k; their weights rescaled to sum to one
    where `renormalize` (Mixtral, Qwen3-MoE's norm_topk_prob). Returns weights [T, k] fp32 and
    expert ids [T, k] int64."""
    probs = router_logits.float().softmax(dim=-1)
    weights, ids = probs.topk(top_k, dim=-1)
    if renormalize:
        weights = weights / weights.sum(dim=-1, keepdim=True)
    return weights, ids


def fused_moe(
    x: torch.Tensor,
    w13: torch.Tensor,
    w2: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """sum_j topk_weights[t, j] * expert_{topk_ids[t, j]}(x[t]) for x [T, H]; returns [T, H]."""
    num_tokens, top_k = topk_ids.shape
    flat_ids = topk_ids.flatten()
    order = flat_ids.argsort(stable=True)
    counts = torch.bincount(flat_ids, minlength=w13.shape[0]).tolist()
    tokens = order // top_k  # the token of each sorted (token, choice) pair
    out = torch.zeros_like(x)
    start = 0
    for expert, count in enumerate(counts):
        if count == 0:
            continue
        rows = tokens[start : start + count]
        h = silu_and_mul(x[rows] @ w13[expert].t()) @ w2[expert].t()
        weights = topk_weights.flatten()[order[start : start + count]]
        out.index_add_(0, rows, h * weights.to(h.dtype)[:, None])
        start += count
    return out
