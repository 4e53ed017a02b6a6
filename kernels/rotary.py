"""Rotary position embedding, NeoX layout (the halves of each head are rotated together)."""

import math

import torch


def default_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim
    return 1.0 / (theta**exponents)


def llama3_inv_freq(inv_freq: torch.Tensor, params: dict) -> torch.Tensor:
    # Llama 3.1: long wavelengths are slowed by `factor`, short ones kept, and the band in
    # between interpolated smoothly.
    factor = params["factor"]
    low, high = params["low_freq_factor"], params["high_freq_factor"]
    old_len = params["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > old_len / low, inv_freq / factor, inv_freq)
    smooth = (old_len / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = (wavelen >= old_len / high) & (wavelen <= old_len / low)
    return torch.where(medium, smoothed, scaled)


def _yarn_inv_freq(
    head_dim: int, params: dict, max_position_embeddings: int
) -> tuple[torch.Tensor, float]:
    """YaRN: frequencies that turn fewer than `beta_slow` times over the original context are
    interpolated (divided by `factor`), those turning more than `beta_fast` times kept, with a
    linear ramp between; cos and sin are scaled by an attention factor."""
    theta = params.get("rope_theta", 10000.0)
    original = params["original_max_position_embeddings"]
    factor = params.get("factor") or max_position_embeddings / original
    attention_factor = params.get("attention_factor")
    if attention_factor is None:
        mscale, mscale_all_dim = params.get("mscale"), params.get("mscale_all_dim")
        if mscale and mscale_all_dim:
            attention_factor = _yarn_mscale(factor, mscale) / _yarn_mscale(factor, mscale_all_dim)
        else:
            attention_factor = _yarn_mscale(factor)

    def dim_of(rotations: float) -> float:  # the dimension that turns `rotations` times
        return head_dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(theta))

    low, high = dim_of(params.get("beta_fast") or 32), dim_of(params.get("beta_slow") or 1)
    if params.get("truncate", True):
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, head_dim - 1)
    if low == high:
        high += 0.001
    ramp = ((torch.arange(head_dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
    keep = 1 - ramp  # the share of each frequency left unscaled
    wavelengths = theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    inv_freq = 1.0 / (factor * wavelengths) * (1 - keep) + 1.0 / wavelengths * keep
    return inv_freq, attention_factor


def _yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def _dynamic_ntk_inv_freq(
    head_dim: int, params: dict, max_positions: int, max_position_embeddings: int
) -> torch.Tensor:
    """Dynamic NTK, fixed at the table's length: the base that transformers computes for a
    sequence of `max_positions` tokens, used at every position. Transformers recomputes it from
    each forward's own length, which a paged cache cannot follow: keys are rotated once, when
    written, and shared by every request with the same prefix. At or below the original length
    the base is the model's own, as in transformers."""
    factor = params["factor"]
    theta = params.get("rope_theta", 10000.0)
    if max_positions > max_position_embeddings:
        stretch = factor * max_positions / max_position_embeddings - (factor - 1)
        theta = theta * stretch ** (head_dim / (head_dim - 2))
    return default_inv_freq(head_dim, theta)


SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn", "dynamic")


def context_length(rope_parameters: dict, max_position_embeddings: int) -> int:
    """How many positions the model's rope scaling is made for, derived as vLLM does: linear
    and dynamic stretch max_position_embeddings by their factor, YaRN stretches its
    original_max_position_embeddings; llama3 checkpoints state the stretched length as
    max_position_embeddings already."""
    rope_type = rope_parameters.get("rope_type", "default")
    factor = rope_parameters.get("factor")
    if not factor:
        return max_position_embeddings
    if rope_type in ("linear", "dynamic"):
        return int(max_position_embeddings * factor)
    if rope_type == "yarn":
        return int(rope_parameters["original_max_position_embeddings"] * factor)
    return max_position_embeddings


def rotary_cos_sin_cache(
    head_dim: int,
    max_positions: int,
    rope_parameters: dict,
    max_position_embeddings: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 tables of shape [max_positions, head_dim] for cos and sin; max_positions is at most
    `context_length` (max_position_embeddings, the default for it, with no rope scaling)."""
    rope_type = rope_parameters.get("rope_type", "default")
    if rope_type not in SUPPORTED_ROPE_TYPES:
        supported = ", ".join(SUPPORTED_ROPE_TYPES)
        raise ValueError(f"rope_type {rope_type!r} is not supported; supported: {supported}")
    if rope_parameters.get("partial_rotary_factor", 1.0) != 1.0:
        raise ValueError("partial_rotary_factor other than 1 is not supported")
    max_position_embeddings = max_position_embeddings or max_positions
    inv_freq = default_inv_freq(head_dim, rope_parameters.get("rope_theta", 10000.0))
    scale = 1.0
    if rope_type == "linear":
        inv_freq = inv_freq / rope_parameters["factor"]
    elif rope_type == "llama3":
        inv_freq = llama3_inv_freq(inv_freq, rope_parameters)
    elif rope_type == "yarn":
        inv_freq, scale = _yarn_inv_freq(head_dim, rope_parameters, max_position_embeddings)
    elif rope_type == "dynamic":
        inv_freq = _dynamic_ntk_inv_freq(
            head_dim, rope_parameters, max_positions, max_position_embeddings
        )
    positions = torch.arange(max_positions, dtype=torch.float32)
    freqs = positions[:, None] * inv_freq[None, :]
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos() * scale, emb.sin() * scale


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [T, H, D] (query and key heads alike) by its tokens' angles, cos/sin [T, D]:
    rows of the tables above, gathered once per step for all layers."""
    cos, sin = cos.unsqueeze(1), sin.unsqueeze(1)
    half = x.shape[-1] // 2
    rotated_half = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated_half * sin
