"""Read a llama.cpp GGUF file as a Hugging Face style config, tokenizer and float32 weights.

Supports the Llama family: llama (and Mistral, which llama.cpp stores as
"llama"), qwen2 and qwen3.
"""

import functools
import hashlib
import json
import math
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
import transformers
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from transformers import AutoConfig, AutoTokenizer, PretrainedConfig

from pagoda.cache import cache_dir
from pagoda.kernels.rotary import default_inv_freq, llama3_inv_freq

_ARCHITECTURES = {
    "llama": "LlamaForCausalLM",
    "mistral": "MistralForCausalLM",
    "qwen2": "Qwen2ForCausalLM",
    "qwen3": "Qwen3ForCausalLM",
}

# Architectures whose converter interleaves q/k rows (HF rotate-half -> GGML
# adjacent-pair rotary); qwen2/qwen3 are written unpermuted.
_PERMUTED_QK = {"llama"}

_TOP_LEVEL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}

_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}

# llama.cpp's per-frequency rope divisors (Llama 3.x), in place of rope_parameters
ROPE_FACTORS = "rope_freqs.weight"

_LAYER_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")


# tensor types stored as plain numpy items; every other type is blocks of bytes
_PLAIN_TYPES = {
    GGMLQuantizationType.F16: np.float16,
    GGMLQuantizationType.F32: np.float32,
    GGMLQuantizationType.F64: np.float64,
}
INDEX_VERSION = 2  # of the cached index's layout, and of the checks made as it is read


@dataclass(frozen=True, slots=True)
class TensorEntry:
    name: str
    ggml_type: int
    dims: list[int]  # innermost first, as GGUF lists them
    offset: int  # of its data, in bytes from the start of the file


@dataclass(frozen=True, slots=True)
class GGUFIndex:
    """What the engine needs from a GGUF file's header: its config and where each tensor is.

    gguf's reader parses the whole header, tokenizer vocabulary included: 2.8 s for SmolLM2's
    49,152 tokens and 48,900 merges on two cores, at every start of an engine. So the index is
    kept in pagoda's cache, and the weights are read from the file at their offsets."""

    model_type: str
    config: dict[str, Any]  # AutoConfig.for_model's keyword arguments
    arch: str
    num_heads: int
    num_kv_heads: int
    tensors: list[TensorEntry]


def gguf_config(path: str) -> PretrainedConfig:
    """Build the transformers config of the model stored in a GGUF file."""
    index = gguf_index(path)
    config = AutoConfig.for_model(index.model_type, **index.config)
    if index.model_type == "mistral":
        # llama.cpp runs "llama" files with full attention, so do the same.
        config.sliding_window = None
    config.dtype = torch.float32
    return config


def gguf_tokenizer(path: str):
    """The file's tokenizer, converted by transformers once and then kept as a tokenizer folder
    in pagoda's cache. Converting it reads the whole vocabulary out of the file's metadata:
    about 5 s for SmolLM2's 49,152 tokens on two cores, which the server and its engine each
    paid at every start."""
    folder = _cache_path("gguf-tokenizers", path, transformers.__version__)
    if folder.is_dir():
        return AutoTokenizer.from_pretrained(folder)
    tokenizer = AutoTokenizer.from_pretrained(Path(path).parent, gguf_file=Path(path).name)
    try:
        folder.parent.mkdir(parents=True, exist_ok=True)
        staging = tempfile.mkdtemp(prefix=f"{folder.name}-", dir=folder.parent)
    except OSError:  # a cache that cannot be written: convert at every start
        return tokenizer
    try:  # written aside, then renamed: the server and its engine may convert it at once
        tokenizer.save_pretrained(staging)
        os.rename(staging, folder)
    except OSError:  # the other one renamed its copy first
        shutil.rmtree(staging, ignore_errors=True)
    return tokenizer


def iter_gguf_weights(path: str) -> Iterator[tuple[str, torch.Tensor]]:
    """Yield (transformers parameter name, float32 tensor) for every tensor."""
    index = gguf_index(path)
    data = np.memmap(path, dtype=np.uint8, mode="r")
    for tensor in index.tensors:
        if tensor.name == ROPE_FACTORS:  # read into the config's rope_parameters
            continue
        name = _hf_name(tensor.name)
        weight = _dequantize(data, tensor)
        if index.arch in _PERMUTED_QK and ".q_proj." in name:
            weight = _unpermute_rows(weight, index.num_heads)
        elif index.arch in _PERMUTED_QK and ".k_proj." in name:
            weight = _unpermute_rows(weight, index.num_kv_heads)
        yield name, torch.from_numpy(weight)


def gguf_index(path: str) -> GGUFIndex:
    stat = os.stat(path)
    return _index(os.path.realpath(path), stat.st_mtime_ns, stat.st_size)


@functools.lru_cache(maxsize=1)
def _index(path: str, mtime_ns: int, size: int) -> GGUFIndex:
    # gguf_config and iter_gguf_weights are called back to back on the same file; mtime_ns and
    # size are only cache keys, so that a rewritten file is read again
    cached = _cache_path("gguf-index", path, str(INDEX_VERSION)).with_suffix(".json")
    try:
        fields = json.loads(cached.read_text())
        return GGUFIndex(**fields | {"tensors": [TensorEntry(**t) for t in fields["tensors"]]})
    except (OSError, ValueError, TypeError, KeyError):  # not cached yet, or damaged
        pass
    try:
        reader = gguf.GGUFReader(path)
    except (ValueError, OSError) as exc:  # numpy's reshape of a tensor past the file's end
        raise ValueError(f"{path} is not a readable GGUF file (cut short?): {exc}") from None
    index = _read_index(reader)
    try:  # written aside, then renamed: two processes may read the same file at once
        cached.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=cached.parent, delete=False) as staging:
            json.dump(asdict(index), staging)
        os.replace(staging.name, cached)
    except OSError:  # a cache that cannot be written: the header is parsed at every start
        pass
    return index


def _read_index(reader: gguf.GGUFReader) -> GGUFIndex:
    arch = _field(reader, "general.architecture")
    model_type = _model_type(reader, arch)
    tensors = {t.name: t for t in reader.tensors}
    for name in tensors:  # a tensor the engine has no place for fails here, before it loads
        if "_exps." in name:  # llama.cpp writes Mixtral as "llama", with stacked experts
            raise ValueError(
                f"mixture-of-experts GGUF files are not supported ({name}): serve the "
                "model's safetensors checkpoint"
            )
        if name != ROPE_FACTORS:
            _hf_name(name)

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"{arch}.{key}", default)

    hidden_size = meta("embedding_length")
    num_heads = meta("attention.head_count")
    num_kv_heads = meta("attention.head_count_kv", num_heads)
    head_dim = meta("attention.key_length", hidden_size // num_heads)
    config = {
        "architectures": [_ARCHITECTURES[model_type]],
        "hidden_size": hidden_size,
        "intermediate_size": meta("feed_forward_length"),
        "num_hidden_layers": meta("block_count"),
        "num_attention_heads": num_heads,
        "num_key_value_heads": num_kv_heads,
        "head_dim": head_dim,
        "rms_norm_eps": meta("attention.layer_norm_rms_epsilon"),
        "max_position_embeddings": meta("context_length"),
        # The embedding matrix is authoritative; metadata vocab_size is optional.
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "rope_parameters": _rope_parameters(reader, arch, tensors, head_dim),
        "attention_bias": "blk.0.attn_q.bias" in tensors,
        "tie_word_embeddings": "output.weight" not in tensors,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "pad_token_id": _field(reader, "tokenizer.ggml.padding_token_id"),
    }
    entries = [
        TensorEntry(t.name, int(t.tensor_type), [int(d) for d in t.shape], int(t.data_offset))
        for t in reader.tensors
    ]
    return GGUFIndex(model_type, config, arch, num_heads, num_kv_heads, entries)


def _cache_path(kind: str, path: str, version: str) -> Path:
    """Where pagoda's cache keeps what `version` derived from the file at `path` (keyed by the
    file's real path, mtime and size)."""
    stat = os.stat(path)
    key = f"{os.path.realpath(path)}:{stat.st_mtime_ns}:{stat.st_size}:{version}"
    return cache_dir() / kind / hashlib.sha256(key.encode()).hexdigest()[:24]


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    field = reader.get_field(key)
    return default if field is None else field.contents()


def _model_type(reader: gguf.GGUFReader, arch: str) -> str:
    if arch not in _ARCHITECTURES:
        supported = ", ".join(a for a in _ARCHITECTURES if a != "mistral")
        raise ValueError(
            f"unsupported GGUF architecture {arch!r}; supported: {supported} "
            "(llama.cpp writes Mistral as llama)"
        )
    name = str(_field(reader, "general.name", "")).lower()
    return "mistral" if arch == "llama" and "mistral" in name else arch


def _rope_parameters(
    reader: gguf.GGUFReader, arch: str, tensors: dict[str, Any], head_dim: int
) -> dict[str, Any]:
    params: dict[str, Any] = {
        "rope_type": "default",
        "rope_theta": float(_field(reader, f"{arch}.rope.freq_base", 10000.0)),
    }
    if ROPE_FACTORS in tensors:
        return _llama3_rope(params["rope_theta"], tensors[ROPE_FACTORS].data, head_dim)
    scaling = _field(reader, f"{arch}.rope.scaling.type", "none")
    if scaling == "none":
        return params
    if scaling not in ("linear", "yarn"):
        raise NotImplementedError(f"GGUF rope scaling {scaling!r}")
    params["rope_type"] = scaling
    params["factor"] = float(_field(reader, f"{arch}.rope.scaling.factor"))
    if scaling == "yarn":
        original = _field(reader, f"{arch}.rope.scaling.original_context_length")
        params["original_max_position_embeddings"] = int(original)
    return params


def _llama3_rope(theta: float, divisors: np.ndarray, head_dim: int) -> dict[str, Any]:
    """Llama 3.x rope scaling from the per-frequency divisors llama.cpp stores in its place:
    1 for the short wavelengths, `factor` for the long ones, smoothly between. Meta's models
    all keep low_freq_factor 1 and high_freq_factor 4, so the original context length is the
    one unknown left; the parameters found must give back every divisor."""
    inv_freq = default_inv_freq(head_dim, theta)
    divisors = torch.as_tensor(np.array(divisors, dtype=np.float32)).flatten()
    factor = float(divisors.max())
    if divisors.shape != inv_freq.shape or factor <= 1 or divisors.min() < 1 - 1e-6:
        raise ValueError(f"GGUF {ROPE_FACTORS} holds no Llama 3 rope scaling: {divisors.tolist()}")
    wavelength = 2 * math.pi / inv_freq
    between = (divisors > 1 + 1e-6) & (divisors < factor * (1 - 1e-6))
    if (
        between.any()
    ):  # a divisor d there comes from smooth = (1/d - 1/f) / (1 - 1/f) = (L/w - 1) / 3
        smooth = (1 / divisors[between] - 1 / factor) / (1 - 1 / factor)
        original = float((wavelength[between] * (3 * smooth + 1)).median())
    else:  # no smoothed band: the shortest slowed wavelength is as good a bound as any
        original = float(wavelength[divisors >= factor * (1 - 1e-6)].min())
    params = {
        "rope_type": "llama3",
        "rope_theta": theta,
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": round(original),
    }
    for value in (round(original), original):
        params["original_max_position_embeddings"] = value
        if torch.allclose(llama3_inv_freq(inv_freq, params), inv_freq / divisors, rtol=1e-5):
            return params
    raise ValueError(
        f"GGUF {ROPE_FACTORS} is not Llama 3 rope scaling with low_freq_factor 1 and "
        f"high_freq_factor 4: {divisors.tolist()}"
    )


def _hf_name(gguf_name: str) -> str:
    base, _, suffix = gguf_name.rpartition(".")
    if base in _TOP_LEVEL_NAMES:
        return f"{_TOP_LEVEL_NAMES[base]}.{suffix}"
    match = _LAYER_TENSOR.fullmatch(gguf_name)
    if match is None or match[2] not in _LAYER_NAMES:
        raise ValueError(f"unexpected GGUF tensor {gguf_name!r}")
    layer, part, suffix = match.groups()
    return f"model.layers.{layer}.{_LAYER_NAMES[part]}.{suffix}"


def _dequantize(data: np.memmap, tensor: TensorEntry) -> np.ndarray:
    ggml_type = GGMLQuantizationType(tensor.ggml_type)
    shape = tuple(reversed(tensor.dims))  # numpy lists dimensions outermost first
    block_size, type_size = GGML_QUANT_SIZES[ggml_type]
    raw = data[tensor.offset : tensor.offset + math.prod(shape) * type_size // block_size]
    if ggml_type in _PLAIN_TYPES:
        stored = raw.view(_PLAIN_TYPES[ggml_type]).reshape(shape)
    else:
        stored = raw.reshape(quant_shape_to_byte_shape(shape, ggml_type))
    weight = dequantize(stored, ggml_type).reshape(shape)
    # Unquantized tensors come back as read-only views of the memory map.
    if weight.dtype != np.float32 or not weight.flags.writeable:
        weight = weight.astype(np.float32)
    return weight


def _unpermute_rows(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """Invert llama.cpp's per-head row interleaving of q/k projections."""
    head_dim = weight.shape[0] // num_heads
    rest = weight.shape[1:]
    split = weight.reshape(num_heads, head_dim // 2, 2, *rest)
    return split.swapaxes(1, 2).reshape(weight.shape)
