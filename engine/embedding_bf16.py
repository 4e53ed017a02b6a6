"""bf16 encoders (BERT and its kin) on CPUs with AMX, as the embedding worker runs them.

Three changes to the loaded transformers model:

- Its linears take oneDNN's packed bf16 weights with the bias, and an exact GELU that follows
  a linear, fused into the matmul (`fuse_linears`): torch's bf16 `addmm` copies the bias into
  every output first, and the GELU was another pass over the widest activation.
- BERT's output blocks, LayerNorm(dense(x) + residual), add and normalize in one pass
  (`fuse_add_norms`, `kernels/elementwise_cpu.add_layer_norm`).
- Its attention reads a batch as one run of tokens with the sequences' bounds
  (`cu_seq_lens_q`, passed through the model's keyword arguments), in
  `kernels/packed_attention` (`use_packed_attention`). A batch called without the bounds (a
  padded batch) takes transformers' SDPA. The worker's probe at load checks that a run gives
  a padded batch's embeddings, and keeps the model's own attention where it does not.

A list of 64 texts of 8-64 words through all-MiniLM-L6-v2 (2 cores): 74-77 ms a pass in rows
of 96 tokens under a block-diagonal mask, 62-64 as one run through the kernel, 54-58 with the
fused linears, 50 with the one-pass add and LayerNorm.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AttentionInterface
from transformers.activations import GELUActivation
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from pagoda.kernels import elementwise_cpu, linear_bf16, packed_attention

ATTENTION = "pagoda_packed"
# blocks whose forward(hidden_states, input_tensor) is LayerNorm(dropout(dense(h)) + input)
ADD_NORM_BLOCKS = frozenset(
    f"{family}{block}"
    for family in ("Bert", "Roberta", "XLMRoberta", "Electra", "Camembert")
    for block in ("SelfOutput", "Output")
)


class OneDnnLinear(nn.Module):
    """A bf16 linear on oneDNN's packed weight, with the bias and optionally an exact GELU
    fused into the matmul."""

    def __init__(self, linear: nn.Linear, gelu: bool = False) -> None:
        super().__init__()
        weight = linear.weight.detach().bfloat16().contiguous()
        self.out_features, self.in_features = weight.shape
        # an opaque oneDNN tensor: an attribute, as module.to() and state_dict cannot take it
        self.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
        self.bias = None if linear.bias is None else linear.bias.detach().bfloat16()
        self.post_op, self.algorithm = ("gelu", "none") if gelu else ("none", "")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.reshape(-1, x.shape[-1]).to(torch.bfloat16)
        y = torch.ops.mkldnn._linear_pointwise(
            flat, self.packed, self.bias, self.post_op, [], self.algorithm
        )
        return y.view(*x.shape[:-1], self.out_features)


def fuse_linears(model: nn.Module) -> int:
    """Swap every `nn.Linear` of a bf16 model for a `OneDnnLinear`, taking in the exact GELU
    of a module that applies one right after its `dense` linear (BERT's intermediate block).
    Returns how many were swapped; 0 where oneDNN has no native bf16 here."""
    if not linear_bf16.available():
        return 0
    swaps = linear_bf16.child_modules(model, lambda child: type(child) is nn.Linear)
    for parent, name, child in swaps:
        gelu = name == "dense" and _exact_gelu(getattr(parent, "intermediate_act_fn", None))
        setattr(parent, name, OneDnnLinear(child, gelu=gelu))
        if gelu:
            parent.intermediate_act_fn = nn.Identity()
    return len(swaps)


@torch.inference_mode()
def compile_row_counts(model: nn.Module, max_rows: int) -> int:
    """Run each distinct `OneDnnLinear` of `model` once at every row count a run of up to
    `max_rows` tokens takes (`linear_bf16.padded_rows`), so that oneDNN compiles its kernels
    at load: it compiles one per new shape, and a batch of 32 texts through MiniLM took 44 ms
    at a new run length against 27 at one seen before. Returns how many row counts."""
    distinct = {}
    for module in model.modules():
        if isinstance(module, OneDnnLinear):
            key = (module.in_features, module.out_features, module.post_op, module.bias is None)
            distinct.setdefault(key, module)
    counts = sorted({linear_bf16.padded_rows(rows) for rows in range(1, max_rows + 1)})
    for rows in counts:
        for linear in distinct.values():
            linear(torch.zeros(rows, linear.in_features, dtype=torch.bfloat16))
    return len(counts)


class DenseAddNorm(nn.Module):
    """A BERT output block at inference (its dropout idle): the add and the norm in one pass."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.dense, self.LayerNorm = block.dense, block.LayerNorm

    def forward(self, hidden_states: torch.Tensor, input_tensor: torch.Tensor) -> torch.Tensor:
        return elementwise_cpu.add_layer_norm(
            self.dense(hidden_states), input_tensor, self.LayerNorm
        )


def fuse_add_norms(model: nn.Module) -> int:
    """Swap BERT-family output blocks (`ADD_NORM_BLOCKS`) for `DenseAddNorm`; returns how
    many."""
    swaps = linear_bf16.child_modules(model, lambda child: type(child).__name__ in ADD_NORM_BLOCKS)
    for parent, name, child in swaps:
        setattr(parent, name, DenseAddNorm(child))
    return len(swaps)


def _exact_gelu(module: object) -> bool:
    if type(module) is GELUActivation:
        return module.act is F.gelu
    return type(module) is nn.GELU and module.approximate == "none"


def use_packed_attention(model: nn.Module) -> Callable[[], None] | None:
    """Give a transformers model the packed-run attention; returns what puts its own back, or
    None where the kernel cannot run or the model does not take a registered attention."""
    if not packed_attention.available():
        return None
    _register()
    previous = model.config._attn_implementation
    try:
        model.set_attn_implementation(ATTENTION)
    except (ValueError, AttributeError):  # a model with a fixed attention
        return None
    return lambda: model.set_attn_implementation(previous)


@functools.cache
def _register() -> None:
    AttentionInterface.register(ATTENTION, _attention)
    # padded batches keep SDPA's masks; a run (no attention_mask) gets none
    AttentionMaskInterface.register(ATTENTION, sdpa_mask)


def _attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    cu_seq_lens_q: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor, None]:
    """transformers' attention interface: (1, heads, tokens, head_dim) in, (1, tokens, heads,
    head_dim) out."""
    if cu_seq_lens_q is None:
        return sdpa_attention_forward(
            module, query, key, value, attention_mask, dropout=dropout, scaling=scaling, **kwargs
        )
    rows = [t[0].transpose(0, 1) for t in (query, key, value)]  # (tokens, heads, head_dim)
    scale = query.shape[-1] ** -0.5 if scaling is None else scaling
    if packed_attention.supports(rows[0], rows[1]):
        return packed_attention.packed_attention(*rows, cu_seq_lens_q, scale)[None], None
    return packed_attention.packed_attention_reference(*rows, cu_seq_lens_q, scale)[None], None
