"""Mixture-of-experts members of the Llama family: Qwen3-MoE and Mixtral.

Their attention is Qwen3's and Mistral's; the MLP of a sparse layer is a router plus a set of
experts run by the kernel set's fused MoE layer. The checkpoint stores each expert's
projections apart (Hugging Face names); the loader stacks them into one [E, ...] tensor per
layer and projection, the layout the fused layer reads.
"""

from __future__ import annotations

import re

import torch
from torch import nn
from transformers import PretrainedConfig

from pagoda.engine.models.llama import MLP, MistralForCausalLM, Qwen3ForCausalLM
from pagoda.kernels.backends import Kernels
from pagoda.kernels.moe import select_experts

# checkpoint projection name -> (stacked parameter, shard: 0 gate, 1 up, None down)
EXPERT_PROJECTIONS = {
    "gate_proj": ("w13", 0),
    "up_proj": ("w13", 1),
    "down_proj": ("w2", None),
    "w1": ("w13", 0),  # Mixtral's names
    "w3": ("w13", 1),
    "w2": ("w2", None),
}
EXPERT_TENSOR = re.compile(
    r"^layers\.(\d+)\.(?:mlp|block_sparse_moe)\.experts\.(\d+)\.(\w+)\.weight$"
)


class SparseMoE(nn.Module):
    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int,
        renormalize: bool,
        ops: Kernels,
    ) -> None:
        super().__init__()
        self.ops = ops
        self.top_k = top_k
        self.renormalize = renormalize
        self.intermediate_size = intermediate_size
        self.gate = nn.Linear(hidden_size, num_experts, bias=False)  # the router
        self.w13 = nn.Parameter(torch.empty(num_experts, 2 * intermediate_size, hidden_size))
        self.w2 = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = select_experts(self.gate(x), self.top_k, self.renormalize)
        return self.ops.fused_moe(x, self.w13, self.w2, weights, ids)


class MoEWeights:
    """Loading of stacked expert weights, mixed into a Llama-family model class."""

    def _destination(self, name: str, params: dict[str, nn.Parameter]):
        name = name.replace(".block_sparse_moe.gate.", ".mlp.gate.")
        match = EXPERT_TENSOR.match(name)
        if match is None:
            return super()._destination(name, params)
        layer, expert, projection = int(match[1]), int(match[2]), match[3]
        if projection not in EXPERT_PROJECTIONS:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        stacked, shard = EXPERT_PROJECTIONS[projection]
        target = f"layers.{layer}.mlp.{stacked}"
        if target not in params or expert >= params[target].shape[0]:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        destination = params[target][expert]
        if shard is not None:
            size = destination.shape[0] // 2
            destination = destination[shard * size : (shard + 1) * size]
        return (target, expert, shard), destination

    def _expected_keys(self, params: dict[str, nn.Parameter]) -> set[tuple]:
        keys = set()
        for name, param in params.items():
            if name.endswith(".mlp.w13"):
                keys |= {(name, e, s) for e in range(param.shape[0]) for s in (0, 1)}
            elif name.endswith(".mlp.w2"):
                keys |= {(name, e, None) for e in range(param.shape[0])}
            else:
                keys |= {(name, shard) for shard in self._shards_of(name)}
        return keys


class Qwen3MoeForCausalLM(MoEWeights, Qwen3ForCausalLM):
    def make_mlp(self, config: PretrainedConfig, layer: int, ops: Kernels) -> nn.Module:
        sparse = (
            layer not in (config.mlp_only_layers or [])
            and config.num_experts > 0
            and (layer + 1) % config.decoder_sparse_step == 0
        )
        if not sparse:
            return MLP(config.hidden_size, config.intermediate_size, ops)
        return SparseMoE(
            config.hidden_size,
            config.moe_intermediate_size,
            config.num_experts,
            config.num_experts_per_tok,
            bool(config.norm_topk_prob),
            ops,
        )


class MixtralForCausalLM(MoEWeights, MistralForCausalLM):
    def make_mlp(self, config: PretrainedConfig, layer: int, ops: Kernels) -> nn.Module:
        return SparseMoE(
            config.hidden_size,
            config.intermediate_size,
            config.num_local_experts,
            config.num_experts_per_tok,
            True,
            ops,
        )
