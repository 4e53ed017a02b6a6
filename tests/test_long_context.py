"""Long context through rope scaling, as the model cards say to serve it: a config.json whose
`rope_scaling` stretches the context (Qwen2.5's YaRN factor 4 over 32k makes 128k). The engine
derives max_model_len as vLLM does, and its output past the original max_position_embeddings
matches transformers (fp32) on random tiny checkpoints whose original context is 64 tokens.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import httpx
import pytest
import torch
import transformers

from pagoda.engine import LLM, SamplingParams
from pagoda.kernels.rotary import context_length, rotary_cos_sin_cache
from tests.random_models import Draw, build
from tests.serving import Server
from tests.test_parity_random import _check

ORIGINAL = 64  # max_position_embeddings of the tiny checkpoints
FACTOR = 4.0
STRETCHED = int(ORIGINAL * FACTOR)

# rope_scaling as the model cards write it ("type", beside a top-level rope_theta)
ROPE_SCALING = {
    "yarn": {"type": "yarn", "factor": FACTOR, "original_max_position_embeddings": ORIGINAL},
    "linear": {"type": "linear", "factor": FACTOR},
    "dynamic": {"type": "dynamic", "factor": FACTOR},
}
FAMILY = {"yarn": "qwen2", "linear": "llama", "dynamic": "qwen2"}


def _as_model_card_says(folder: Path, rope_scaling: dict) -> None:
    """Rewrite config.json as a user does from the model card: `rope_scaling` added beside the
    checkpoint's max_position_embeddings and rope_theta."""
    path = folder / "config.json"
    config = json.loads(path.read_text())
    config["rope_theta"] = config.pop("rope_parameters")["rope_theta"]
    config["rope_scaling"] = rope_scaling
    path.write_text(json.dumps(config))


def _draw(rope: str, prompt_lengths: list[int]) -> Draw:
    g = torch.Generator().manual_seed(len(rope))
    return Draw(
        id=f"long-{rope}",
        family=FAMILY[rope],
        config=dict(
            vocab_size=512,
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=2,
            max_position_embeddings=ORIGINAL,
            rms_norm_eps=1e-6,
            initializer_range=0.2,
            tie_word_embeddings=False,
            rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
            bos_token_id=1,
            eos_token_id=2,
        ),
        seed=7,
        prompts=[torch.randint(3, 512, (n,), generator=g).tolist() for n in prompt_lengths],
    )


def _checkpoint(rope: str, prompt_lengths: list[int], folder: Path):
    """The draw, its folder with the model card's rope_scaling, and transformers' model of it."""
    d = _draw(rope, prompt_lengths)
    build(d, folder)
    _as_model_card_says(folder, ROPE_SCALING[rope])
    reference = transformers.AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    assert reference.config.rope_parameters["rope_type"] == rope  # transformers reads it so
    return d, reference.eval()


def test_the_context_length_follows_vllms_derivation(tmp_path):
    """Qwen2.5-7B-Instruct's config.json with its model card's YaRN block: 131072 positions,
    and the other rope types as vLLM derives them."""
    config = {
        "architectures": ["Qwen2ForCausalLM"],
        "model_type": "qwen2",
        "max_position_embeddings": 32768,
        "rope_theta": 1000000.0,
        "rope_scaling": {
            "factor": 4.0,
            "original_max_position_embeddings": 32768,
            "type": "yarn",
        },
    }
    (tmp_path / "config.json").write_text(json.dumps(config))
    qwen = transformers.AutoConfig.from_pretrained(tmp_path)
    assert context_length(qwen.rope_parameters, qwen.max_position_embeddings) == 131072

    cases = [
        ({"rope_type": "default"}, 4096, 4096),
        ({"rope_type": "linear", "factor": 2.0}, 4096, 8192),
        ({"rope_type": "dynamic", "factor": 2.0}, 4096, 8192),
        # YaRN stretches its original length, whatever max_position_embeddings says
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8192},
            32768,
            32768,
        ),
        (
            {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 4096},
            4096,
            16384,
        ),
        # Llama 3.1 states its stretched length as max_position_embeddings already
        (
            {
                "rope_type": "llama3",
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 8192,
            },
            131072,
            131072,
        ),
    ]
    for rope, positions, want in cases:
        assert context_length(rope, positions) == want, rope


@pytest.mark.parametrize("rope", ["yarn", "linear"])
def test_greedy_output_past_the_original_context_matches_transformers(rope, tmp_path):
    """Prompts that start inside the original 64 positions and cross them while generating,
    and prompts far past them, up to the stretched context (256): the same greedy tokens as
    transformers, in one batch, and again from the prefix cache."""
    d, reference = _checkpoint(rope, [40, 150, 200, 5], tmp_path)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=96)
    try:
        assert llm.engine.max_model_len == STRETCHED
        _check(llm, reference, d)
    finally:
        llm.close()


@pytest.mark.parametrize("chunk", [None, 48])
def test_dynamic_ntk_matches_transformers_at_the_stretched_length(chunk, tmp_path):
    """Dynamic NTK's base is fixed at max_model_len (docs/engine-models.md): a prompt of
    exactly that many tokens, which transformers runs in one forward at that same base, gets
    the same logprobs at every position, in one prefill or in chunks."""
    (d, reference) = _checkpoint("dynamic", [STRETCHED], tmp_path)
    prompt = d.prompts[0]
    llm = LLM(
        str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_num_batched_tokens=chunk
    )
    try:
        assert llm.engine.max_model_len == STRETCHED
        out = llm.generate(
            {"prompt_token_ids": prompt}, SamplingParams(max_tokens=0, prompt_logprobs=0)
        )[0]
    finally:
        llm.close()
    with torch.no_grad():
        want = reference(torch.tensor([prompt])).logits[0].log_softmax(-1)
    got = [entry[token].logprob for entry, token in zip(out.prompt_logprobs[1:], prompt[1:])]
    expected = [want[pos, token].item() for pos, token in enumerate(prompt[1:])]
    assert got == pytest.approx(expected, abs=1e-4)


def test_dynamic_ntk_within_the_original_context_is_plain_rope(tmp_path):
    """Served at its original length (max_model_len 64), a dynamic-NTK model rotates with its
    own base, as transformers does for every sequence that fits: greedy output matches."""
    d, reference = _checkpoint("dynamic", [10, 30, 50], tmp_path)
    params = SamplingParams(temperature=0, max_tokens=ORIGINAL - 50, min_tokens=ORIGINAL - 50)
    llm = LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=ORIGINAL)
    try:
        outs = llm.generate([{"prompt_token_ids": p} for p in d.prompts], params)
    finally:
        llm.close()
    for prompt, out in zip(d.prompts, outs):
        want = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=params.max_tokens,
            min_new_tokens=params.max_tokens,
            do_sample=False,
        )[0, len(prompt) :].tolist()
        assert out.outputs[0].token_ids == want


def test_a_max_model_len_above_the_stretched_context_is_refused(tmp_path):
    _checkpoint("yarn", [1], tmp_path)
    with pytest.raises(ValueError, match=f"exceeds what the model supports \\({STRETCHED}"):
        LLM(str(tmp_path), dtype="float32", skip_tokenizer_init=True, max_model_len=STRETCHED + 1)


def test_rotary_tables_at_128k_cost():
    """Qwen2.5-7B's head_dim 128 over 131072 positions: two fp32 tables of 64 MiB each."""
    yarn = {
        "rope_type": "yarn",
        "rope_theta": 1e6,
        "factor": 4.0,
        "original_max_position_embeddings": 32768,
    }
    cos, sin = rotary_cos_sin_cache(128, 131072, yarn, 32768)
    assert cos.shape == sin.shape == (131072, 128)
    assert cos.nbytes + sin.nbytes == 128 << 20
    assert torch.isfinite(cos).all() and torch.isfinite(sin).all()


def _yarn_tiny_model(tiny_models, tmp_path) -> Path:
    """The tiny qwen2 (with its tokenizer) at 64 original positions and YaRN factor 4."""
    folder = tmp_path / "yarn"
    shutil.copytree(tiny_models["qwen2"], folder)
    config = json.loads((folder / "config.json").read_text())
    config["max_position_embeddings"] = ORIGINAL
    (folder / "config.json").write_text(json.dumps(config))
    _as_model_card_says(folder, ROPE_SCALING["yarn"])
    return folder


def test_tokenizer_export_writes_the_stretched_length(tiny_models, tmp_path):
    folder = _yarn_tiny_model(tiny_models, tmp_path)
    out = tmp_path / "tokenizer"
    run = [sys.executable, "-m", "pagoda", "tokenizer", "export", str(folder), str(out)]
    subprocess.run(run, check=True, capture_output=True, timeout=300)
    config = json.loads((out / "tokenizer_config.json").read_text())
    assert config["model_max_length"] == STRETCHED


CATALOG = """\
models:
  - id: stretched
    kind: chat
    source: {folder}
    engine:
      dtype: float32
  - id: capped
    kind: chat
    source: {folder}
    max_model_len: 100
    engine:
      dtype: float32
"""


def test_the_server_reports_and_enforces_the_stretched_length(tiny_models, tmp_path):
    """/v1/models, /tokenize, /tokenizer_info and the 400 for a long prompt all say 256 for a
    YaRN model of 64 original positions; a prompt past 64 tokens is served; the catalog's
    max_model_len caps it."""
    folder = _yarn_tiny_model(tiny_models, tmp_path)
    catalog = tmp_path / "models.yaml"
    catalog.write_text(CATALOG.format(folder=folder))
    server = Server(["--catalog", str(catalog)]).wait_ready()
    try:
        with httpx.Client(base_url=server.url, timeout=120) as http:
            lengths = {m["id"]: m["max_model_len"] for m in http.get("/v1/models").json()["data"]}
            assert lengths == {"stretched": STRETCHED, "capped": 100}
            tokenized = http.post("/tokenize", json={"model": "stretched", "prompt": "a"}).json()
            assert tokenized["max_model_len"] == STRETCHED
            info = http.get("/tokenizer_info", params={"model": "stretched"}).json()
            assert info["model_max_length"] == STRETCHED

            def complete(model: str, n: int) -> httpx.Response:
                body = {"model": model, "prompt": [5] * n, "max_tokens": 8, "ignore_eos": True}
                return http.post("/v1/completions", json=body)

            served = complete("stretched", 200)
            assert served.status_code == 200, served.text
            usage = served.json()["usage"]
            assert (usage["prompt_tokens"], usage["completion_tokens"]) == (200, 8)
            too_long = complete("stretched", STRETCHED)
            assert too_long.status_code == 400
            assert f"maximum context length is {STRETCHED} tokens" in too_long.text
            capped = complete("capped", 150)
            assert capped.status_code == 400
            assert "maximum context length is 100 tokens" in capped.text
    finally:
        assert server.stop() == 0, server.log()
