"""Megatron-style sharding of a Llama-family model over the ranks of engine/distributed.py.

Done at load time: `shard_model` shrinks the layers of the model built on the meta device to
this rank's part, `shard_weights` slices each checkpoint tensor to match, so the model's own
loader fills them as it would a whole model. Per layer:
  - q/k/v and gate/up are column-parallel: each rank holds its attention heads (and the KV
    heads they read: split where there are at least as many KV heads as ranks, else
    replicated) and its slice of the MLP's (or each expert's) intermediate size;
  - o_proj and down_proj are row-parallel: their partial outputs are summed by one all-reduce
    after the attention block and one after the MLP; rank 0 alone adds their bias;
  - the embedding and the LM head are vocab-parallel (ceil(vocab / ranks) rows a rank, the
    last zero-padded): an embedding row comes from the rank that holds it (all-reduce), the
    logits are gathered from all ranks.
Norms, q/k norms and MoE routers are replicated, so every rank routes tokens alike.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagoda.engine import distributed
from pagoda.engine.models.llama import MLP
from pagoda.engine.models.moe import SparseMoE

COLUMN = re.compile(r"\.(gate_proj|up_proj|w1|w3)\.")  # MLP and expert input projections
ROW = re.compile(r"\.(o_proj|down_proj|w2)\.")


@dataclass(frozen=True, slots=True)
class Layout:
    """This rank's part of a model's heads and vocabulary."""

    rank: int
    size: int
    head_dim: int
    num_heads: int  # per rank
    num_kv_heads: int  # per rank
    first_kv_head: int
    vocab_size: int  # the whole vocabulary
    vocab_per_rank: int

    @classmethod
    def of(cls, config, rank: int, size: int) -> Layout:
        heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
        if heads % size:
            raise ValueError(f"tensor_parallel_size {size} must divide the {heads} attention heads")
        if kv_heads % size and size % kv_heads:
            raise ValueError(
                f"tensor_parallel_size {size} and the {kv_heads} KV heads must divide one another"
            )
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
        local_kv = max(1, kv_heads // size)
        # with fewer KV heads than ranks, each KV head serves size / kv_heads ranks
        first_kv = rank * local_kv if kv_heads >= size else rank * kv_heads // size
        vocab = config.vocab_size
        return cls(
            rank, size, head_dim, heads // size, local_kv, first_kv, vocab, -(-vocab // size)
        )


class VocabParallelEmbedding(nn.Module):
    def __init__(self, layout: Layout, hidden_size: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(layout.vocab_per_rank, hidden_size))
        self.first = layout.rank * layout.vocab_per_rank

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        local = input_ids - self.first
        inside = (local >= 0) & (local < self.weight.shape[0])
        x = F.embedding(local.clamp(0, self.weight.shape[0] - 1), self.weight)
        return distributed.all_reduce(x * inside.unsqueeze(-1).to(x.dtype))


def _all_reduce_output(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    return distributed.all_reduce(output)


def _divide(size: int, parts: int, what: str) -> int:
    if size % parts:
        raise ValueError(f"tensor_parallel_size {parts} must divide the {what} ({size})")
    return size // parts


def shard_model(model: nn.Module, layout: Layout) -> None:
    """Shrink a model built on the meta device to this rank's part (before its weights)."""
    config = model.config
    for layer in model.layers:
        _shard_attention(layer.self_attn, layout, config.hidden_size)
        _shard_mlp(layer.mlp, layout)
        layer.self_attn.register_forward_hook(_all_reduce_output)
        layer.mlp.register_forward_hook(_all_reduce_output)
    model.embed_tokens = VocabParallelEmbedding(layout, config.hidden_size)
    if model.lm_head is not None:
        model.lm_head = nn.Linear(config.hidden_size, layout.vocab_per_rank, bias=False)
    whole = model.compute_logits  # the instance's own: rank 0 samples from the whole vocabulary

    def compute_logits(hidden: torch.Tensor) -> torch.Tensor:
        return distributed.all_gather_last(whole(hidden))[..., : layout.vocab_size]

    model.compute_logits = compute_logits


def _shard_attention(attn: nn.Module, layout: Layout, hidden_size: int) -> None:
    attn.num_heads, attn.num_kv_heads = layout.num_heads, layout.num_kv_heads
    attn.q_size = layout.num_heads * layout.head_dim
    attn.kv_size = layout.num_kv_heads * layout.head_dim
    qkv_bias = attn.qkv_proj.bias is not None
    attn.qkv_proj = nn.Linear(hidden_size, attn.q_size + 2 * attn.kv_size, qkv_bias)
    attn.qkv_proj.shard_sizes = (attn.q_size, attn.kv_size, attn.kv_size)
    attn.o_proj = nn.Linear(attn.q_size, hidden_size, bias=attn.o_proj.bias is not None)


def _shard_mlp(mlp: nn.Module, layout: Layout) -> None:
    if isinstance(mlp, SparseMoE):
        experts, size, hidden = mlp.w13.shape
        local = _divide(size // 2, layout.size, "expert intermediate size")
        mlp.intermediate_size = local
        mlp.w13 = nn.Parameter(torch.empty(experts, 2 * local, hidden))
        mlp.w2 = nn.Parameter(torch.empty(experts, hidden, local))
    elif isinstance(mlp, MLP):
        hidden = mlp.down_proj.out_features
        local = _divide(mlp.down_proj.in_features, layout.size, "intermediate size")
        bias = mlp.down_proj.bias is not None
        mlp.gate_up_proj = nn.Linear(hidden, 2 * local, bias=bias)
        mlp.gate_up_proj.shard_sizes = (local, local)
        mlp.down_proj = nn.Linear(local, hidden, bias=bias)
    else:
        raise ValueError(f"tensor parallelism does not know how to split {type(mlp).__name__}")


def shard_weights(
    weights: Iterable[tuple[str, torch.Tensor]], layout: Layout
) -> Iterator[tuple[str, torch.Tensor]]:
    """Each checkpoint tensor (Hugging Face names) cut to this rank's part."""
    for name, tensor in weights:
        yield name, shard_tensor(name, tensor, layout)


def _rows(tensor: torch.Tensor, first: int, count: int) -> torch.Tensor:
    return tensor[first : first + count]


def shard_tensor(name: str, tensor: torch.Tensor, layout: Layout) -> torch.Tensor:
    """This rank's part of checkpoint tensor `name` (a LoRA matrix: as the weight it updates)."""
    r, d = layout.rank, layout.head_dim
    if ".q_proj." in name:
        return _rows(tensor, r * layout.num_heads * d, layout.num_heads * d)
    if ".k_proj." in name or ".v_proj." in name:
        return _rows(tensor, layout.first_kv_head * d, layout.num_kv_heads * d)
    if COLUMN.search(name):
        part = tensor.shape[0] // layout.size
        return _rows(tensor, r * part, part)
    if ROW.search(name):
        if name.endswith(".bias"):  # added once, after the sum
            return tensor if r == 0 else torch.zeros_like(tensor)
        part = tensor.shape[1] // layout.size
        return tensor[:, r * part : (r + 1) * part]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):
        part = layout.vocab_per_rank
        rows = _rows(tensor, r * part, part)
        return F.pad(rows, (0, 0, 0, part - rows.shape[0]))
    return tensor
