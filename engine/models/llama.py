"""The Llama family: Llama (2, 3, 3.1 rope scaling), Mistral, Qwen2 (qkv bias), Qwen3 (q/k norm).

They share one decoder; the differences are flags read from the Hugging Face config. Q, K, V
projections are fused into one matmul, as are the MLP's gate and up projections; the weight
loader stacks the checkpoint's separate tensors into them.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import nn
from transformers import PretrainedConfig

from pagoda.kernels.attention import AttentionMetadata
from pagoda.kernels.backends import TORCH, Kernels
from pagoda.kernels.rotary import rotary_cos_sin_cache

# checkpoint name fragment -> (fused parameter fragment, shard index)
STACKED_PARAMS = {
    ".q_proj.": (".qkv_proj.", 0),
    ".k_proj.": (".qkv_proj.", 1),
    ".v_proj.": (".qkv_proj.", 2),
    ".gate_proj.": (".gate_up_proj.", 0),
    ".up_proj.": (".gate_up_proj.", 1),
}


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float, ops: Kernels) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.ops = ops

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        return self.ops.rms_norm(x, self.weight, self.eps, residual)


class Attention(nn.Module):
    def __init__(
        self, config: PretrainedConfig, qkv_bias: bool, o_bias: bool, qk_norm: bool, ops: Kernels
    ) -> None:
        super().__init__()
        self.ops = ops
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = config.num_key_value_heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        self.q_size = self.num_heads * self.head_dim
        self.kv_size = self.num_kv_heads * self.head_dim
        self.scale = self.head_dim**-0.5
        self.qkv_proj = nn.Linear(config.hidden_size, self.q_size + 2 * self.kv_size, qkv_bias)
        self.qkv_proj.shard_sizes = (self.q_size, self.kv_size, self.kv_size)
        self.o_proj = nn.Linear(self.q_size, config.hidden_size, bias=o_bias)
        self.q_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim, config.rms_norm_eps, ops) if qk_norm else None

    def forward(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x).view(num_tokens, -1, self.head_dim)
        q, k, v = qkv.split([self.num_heads, self.num_kv_heads, self.num_kv_heads], dim=1)
        if self.q_norm is None:
            # q and k heads are adjacent in the fused output: rotate them in one go
            qk = self.ops.apply_rotary(qkv[:, : self.num_heads + self.num_kv_heads], *rotary)
            q, k = qk.split([self.num_heads, self.num_kv_heads], dim=1)
        else:
            q = self.ops.apply_rotary(self.q_norm(q)[0], *rotary)
            k = self.ops.apply_rotary(self.k_norm(k)[0], *rotary)
        k_cache, v_cache = kv_cache
        self.ops.write_kv_cache(k, v, k_cache, v_cache, meta.slot_mapping)
        o = self.ops.paged_attention(q, k_cache, v_cache, meta, self.scale)
        return self.o_proj(o.reshape(num_tokens, self.q_size))


class MLP(nn.Module):
    def __init__(
        self, hidden_size: int, intermediate_size: int, ops: Kernels, bias: bool = False
    ) -> None:
        super().__init__()
        self.ops = ops
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=bias)
        self.gate_up_proj.shard_sizes = (intermediate_size, intermediate_size)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.gate_up_proj(x)
        if not getattr(self.gate_up_proj, "applies_silu_and_mul", False):  # bf16 on AMX does
            h = self.ops.silu_and_mul(h)
        return self.down_proj(h)


class DecoderLayer(nn.Module):
    def __init__(
        self, config: PretrainedConfig, qkv_bias: bool, qk_norm: bool, ops: Kernels, mlp: nn.Module
    ) -> None:
        super().__init__()
        eps = config.rms_norm_eps
        # Llama and Qwen3's attention_bias covers o_proj too; Qwen2's own q/k/v bias does not
        o_bias = bool(getattr(config, "attention_bias", False))
        self.input_layernorm = RMSNorm(config.hidden_size, eps, ops)
        self.self_attn = Attention(config, qkv_bias, o_bias, qk_norm, ops)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, eps, ops)
        self.mlp = mlp

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_cache: tuple[torch.Tensor, torch.Tensor],
        meta: AttentionMetadata,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        h, residual = self.input_layernorm(x, residual)
        h = self.self_attn(h, rotary, kv_cache, meta)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class LlamaForCausalLM(nn.Module):
    qkv_bias = False
    qk_norm = False

    def __init__(self, config: PretrainedConfig, ops: Kernels = TORCH) -> None:
        super().__init__()
        self.config = config
        qkv_bias = self.qkv_bias or getattr(config, "attention_bias", False)
        # given a weight, no random init: the load overwrites it, and normal_ on the meta device
        # imports torch._dynamo, sympy and triton (2-3 s of CPU in every engine process)
        shape = (config.vocab_size, config.hidden_size)
        self.embed_tokens = nn.Embedding(*shape, _weight=torch.empty(shape))
        self.layers = nn.ModuleList(
            DecoderLayer(config, qkv_bias, self.qk_norm, ops, self.make_mlp(config, i, ops))
            for i in range(config.num_hidden_layers)
        )
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, ops)
        self.tie_word_embeddings = bool(getattr(config, "tie_word_embeddings", False))
        if self.tie_word_embeddings:
            self.lm_head = None
        else:
            self.lm_head = nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        self.rotary_cos: torch.Tensor | None = None
        self.rotary_sin: torch.Tensor | None = None

    def make_mlp(self, config: PretrainedConfig, layer: int, ops: Kernels) -> nn.Module:
        bias = bool(getattr(config, "mlp_bias", False))
        return MLP(config.hidden_size, config.intermediate_size, ops, bias)

    def init_rotary(self, device: torch.device, max_positions: int) -> None:
        """Build the rotary tables (after construction on the meta device)."""
        head_dim = self.layers[0].self_attn.head_dim
        cos, sin = rotary_cos_sin_cache(
            head_dim,
            max_positions,
            self.config.rope_parameters,
            self.config.max_position_embeddings,
        )
        self.rotary_cos, self.rotary_sin = cos.to(device), sin.to(device)

    def forward(
        self,
        input_ids: torch.Tensor,
        positions: torch.Tensor,
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """Hidden states [T, hidden] of a flat batch of T tokens (after the final norm)."""
        return self.decode(*self.embed(input_ids, positions), kv_caches, meta)

    def embed(
        self, input_ids: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, tuple[torch.Tensor, torch.Tensor]]:
        """The tokens' embeddings and their positions' rotary (cos, sin) rows."""
        x = self.embed_tokens(input_ids)
        return x, (self.rotary_cos[positions].to(x.dtype), self.rotary_sin[positions].to(x.dtype))

    def decode(
        self,
        x: torch.Tensor,
        rotary: tuple[torch.Tensor, torch.Tensor],
        kv_caches: list[tuple[torch.Tensor, torch.Tensor]],
        meta: AttentionMetadata,
    ) -> torch.Tensor:
        """The decoder layers and final norm over `embed`'s output."""
        residual = None
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(x, residual, rotary, kv_cache, meta)
        return self.norm(x, residual)[0]

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        # a tied model gets an lm_head of its own only where its kernel needs another layout
        if self.lm_head is None:
            return hidden @ self.embed_tokens.weight.t()
        return self.lm_head(hidden)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Copy checkpoint tensors (Hugging Face names) into the fused parameters."""
        params = dict(self.named_parameters())
        expected = self._expected_keys(params)
        loaded: set[tuple] = set()
        for name, tensor in weights:
            name = name.removeprefix("model.")
            if "rotary_emb" in name or (name == "lm_head.weight" and self.lm_head is None):
                continue
            key, destination = self._destination(name, params)
            if destination.shape != tensor.shape:
                raise ValueError(
                    f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                    f"the model expects {tuple(destination.shape)}"
                )
            with torch.no_grad():
                destination.copy_(tensor)
            loaded.add(key)
        # keys are (parameter, index...): printed as parameter[index]...
        missing = sorted(
            key[0] + "".join(f"[{i}]" for i in key[1:] if i is not None)
            for key in expected - loaded
        )
        if missing:
            raise ValueError(f"checkpoint lacks weights for: {', '.join(missing[:8])}")

    def _destination(
        self, name: str, params: dict[str, nn.Parameter]
    ) -> tuple[tuple, torch.Tensor]:
        """(key, the slice of a parameter) that checkpoint tensor `name` fills."""
        target, shard = _fused_target(name)
        if target not in params:
            raise ValueError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        destination = params[target]
        if shard is not None:
            sizes = self._shard_sizes(target)
            offset = sum(sizes[:shard])
            destination = destination[offset : offset + sizes[shard]]
        return (target, shard), destination

    def _expected_keys(self, params: dict[str, nn.Parameter]) -> set[tuple]:
        return {(name, shard) for name in params for shard in self._shards_of(name)}

    def _shard_sizes(self, param_name: str) -> tuple[int, ...] | None:
        return getattr(self.get_submodule(param_name.rsplit(".", 1)[0]), "shard_sizes", None)

    def _shards_of(self, param_name: str) -> list[int | None]:
        sizes = self._shard_sizes(param_name)
        return [None] if sizes is None else list(range(len(sizes)))


def _fused_target(name: str) -> tuple[str, int | None]:
    for fragment, (fused, shard) in STACKED_PARAMS.items():
        if fragment in name:
            return name.replace(fragment, fused), shard
    return name, None


class MistralForCausalLM(LlamaForCausalLM):
    pass


class Qwen2ForCausalLM(LlamaForCausalLM):
    qkv_bias = True


class Qwen3ForCausalLM(LlamaForCausalLM):
    qk_norm = True
