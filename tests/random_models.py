"""Random model configurations and engine settings for the parity test over random draws.

A draw is a pure function of (seed, index): the same pair gives the same config, weights,
prompts and engine settings, so a failing draw is replayed by its id alone.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from pathlib import Path

import torch
import transformers

BLOCK_SIZE = 16
NEW_TOKENS = 32
# a KV cache of this many blocks holds one sequence of PRESSURE_MODEL_LEN tokens, not the batch
PRESSURE_BLOCKS = 16
PRESSURE_MODEL_LEN = PRESSURE_BLOCKS * BLOCK_SIZE


@dataclass(frozen=True)
class Family:
    config: type
    model: type
    ropes: tuple[str, ...]  # the rope types its checkpoints use that transformers runs
    explicit_head_dim: bool  # the config may set head_dim apart from hidden / heads
    derived_head_dim: bool  # the config may leave it to hidden / heads
    attention_bias: bool  # the config has an attention_bias switch
    mlp_bias: bool = False


FAMILIES = {
    "llama": Family(
        transformers.LlamaConfig,
        transformers.LlamaForCausalLM,
        ("default", "linear", "llama3", "dynamic", "yarn"),
        explicit_head_dim=True,
        derived_head_dim=True,
        attention_bias=True,
        mlp_bias=True,
    ),
    "mistral": Family(
        transformers.MistralConfig,
        transformers.MistralForCausalLM,
        ("default", "yarn"),
        explicit_head_dim=True,
        derived_head_dim=True,
        attention_bias=False,
    ),
    "qwen2": Family(
        transformers.Qwen2Config,
        transformers.Qwen2ForCausalLM,
        ("default", "linear", "dynamic", "yarn"),
        explicit_head_dim=False,
        derived_head_dim=True,
        attention_bias=False,
    ),
    # Qwen3 configs always carry head_dim (transformers' default is 128, not hidden / heads)
    "qwen3": Family(
        transformers.Qwen3Config,
        transformers.Qwen3ForCausalLM,
        ("default", "yarn"),
        explicit_head_dim=True,
        derived_head_dim=False,
        attention_bias=True,
    ),
    "qwen3_moe": Family(
        transformers.Qwen3MoeConfig,
        transformers.Qwen3MoeForCausalLM,
        ("default", "yarn"),
        explicit_head_dim=True,
        derived_head_dim=False,
        attention_bias=True,
    ),
    "mixtral": Family(
        transformers.MixtralConfig,
        transformers.MixtralForCausalLM,
        ("default",),
        explicit_head_dim=True,
        derived_head_dim=True,
        attention_bias=False,
    ),
}


@dataclass
class Draw:
    id: str
    family: str
    config: dict
    seed: int
    prompts: list[list[int]]
    engine: dict = field(default_factory=dict)  # LLM keyword arguments
    expect_preemption: bool = False

    def describe(self) -> str:
        return f"draw {self.id}: {self.family} {self.config} engine {self.engine}"


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def _rope(rng: random.Random, family: Family, max_positions: int) -> dict:
    rope_type = rng.choice(family.ropes)
    params: dict = {"rope_type": rope_type, "rope_theta": rng.choice([1e4, 1e5, 1e6])}
    if rope_type in ("linear", "dynamic"):
        params["factor"] = rng.choice([2.0, 4.0, 8.0])
    elif rope_type == "llama3":
        params.update(
            factor=rng.choice([4.0, 8.0]),
            low_freq_factor=1.0,
            high_freq_factor=4.0,
            original_max_position_embeddings=rng.choice([32, 64, 128]),
        )
    elif rope_type == "yarn":
        original = rng.choice([64, 128, 256])
        params.update(factor=max_positions / original, original_max_position_embeddings=original)
        if rng.random() < 0.5:
            params.update(beta_fast=rng.choice([16.0, 32.0]), beta_slow=rng.choice([1.0, 2.0]))
    return params


def _config(rng: random.Random, name: str) -> dict:
    family = FAMILIES[name]
    heads = rng.choice([1, 2, 3, 4, 6, 8])
    head_dim = rng.choice([32, 64, 128])
    explicit = family.explicit_head_dim and (not family.derived_head_dim or rng.random() < 0.5)
    # transformers wants hidden a multiple of heads even where head_dim is explicit
    hidden = heads * (rng.choice([8, 16, 32, 64]) if explicit else head_dim)
    max_positions = 512
    config = dict(
        vocab_size=rng.choice([256, 512, 1000]),
        hidden_size=hidden,
        intermediate_size=rng.choice([32, 64, 128, 256, 512]),
        num_hidden_layers=rng.choice([1, 2, 3]),
        num_attention_heads=heads,
        num_key_value_heads=rng.choice(_divisors(heads)),
        max_position_embeddings=max_positions,
        rms_norm_eps=rng.choice([1e-6, 1e-5]),
        # large enough that greedy output varies and errors in the engine show in its choices
        initializer_range=round(rng.uniform(0.1, 0.3), 3),
        tie_word_embeddings=rng.random() < 0.5,
        rope_parameters=_rope(rng, family, max_positions),
        bos_token_id=1,
        eos_token_id=2,
    )
    if explicit:
        config["head_dim"] = head_dim
    if family.attention_bias:
        config["attention_bias"] = rng.random() < 0.5
    if family.mlp_bias:
        config["mlp_bias"] = rng.random() < 0.3
    if name in ("mistral", "mixtral"):
        config["sliding_window"] = rng.choice([None, 4096])
    if name in ("qwen3_moe", "mixtral"):
        experts = rng.choice([4, 8, 16, 64])
        config["num_experts_per_tok"] = rng.randint(1, min(8, experts))
    if name == "qwen3_moe":
        layers = config["num_hidden_layers"]
        config.update(
            num_experts=experts,
            moe_intermediate_size=rng.choice([16, 32, 64]),
            norm_topk_prob=rng.random() < 0.5,
            decoder_sparse_step=rng.choice([1, 1, 2]),
            mlp_only_layers=[i for i in range(layers) if rng.random() < 0.2],
        )
    elif name == "mixtral":
        config["num_local_experts"] = experts
    return config


def _prompt_lengths(rng: random.Random, pressure: bool) -> list[int]:
    if not pressure:
        # short ones, one inside a block, and some that span several blocks
        return [rng.randint(1, 15), rng.randint(17, 64), rng.randint(65, 200), rng.randint(1, 100)]
    # together they fit the cache as prompts but not with their completions
    while True:
        lengths = [rng.randint(20, 90) for _ in range(3)]
        blocks = sum(-(-n // BLOCK_SIZE) for n in lengths)
        # the last token sampled is never written to the cache
        grown = sum(-(-(n + NEW_TOKENS - 1) // BLOCK_SIZE) for n in lengths)
        if blocks <= PRESSURE_BLOCKS < grown:
            return lengths


def draw(seed: int, index: int, families: tuple[str, ...] | None = None) -> Draw:
    families = families or tuple(FAMILIES)
    rng = random.Random(f"{seed}-{index}")
    name = families[index % len(families)]
    config = _config(rng, name)
    pressure = rng.random() < 0.3
    chunked = rng.random() < 0.4
    engine: dict = {"kernel_backend": rng.choice(["auto", "torch"])}
    if chunked:
        engine["max_num_batched_tokens"] = rng.randint(4, 48)
    if pressure:
        engine.update(kv_cache_blocks=PRESSURE_BLOCKS, max_model_len=PRESSURE_MODEL_LEN)
    elif config["rope_parameters"]["rope_type"] == "dynamic":
        # served at its original length, where dynamic NTK is the model's own rope for the
        # engine and transformers alike (past it, tests/test_long_context.py compares)
        engine["max_model_len"] = config["max_position_embeddings"]
    lengths = _prompt_lengths(rng, pressure)
    vocab = config["vocab_size"]
    prompts = [[rng.randrange(3, vocab) for _ in range(n)] for n in lengths]
    return Draw(
        id=f"{seed}-{index}",
        family=name,
        config=config,
        seed=rng.randrange(1 << 30),
        prompts=prompts,
        engine=engine,
        expect_preemption=pressure and not chunked,
    )


def build(d: Draw, folder: Path) -> torch.nn.Module:
    """Save the draw's random fp32 model to `folder`; return it (eval mode) for the reference."""
    family = FAMILIES[d.family]
    torch.manual_seed(d.seed)
    model = family.model(family.config(**d.config)).eval()
    model.save_pretrained(folder)
    return model
