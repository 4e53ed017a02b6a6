"""Weight formats: sharded safetensors, dummy weights; a hub id that cannot be had."""

import json
import re
import shutil
import statistics
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch

from pagoda.engine import LLM, SamplingParams
from pagoda.engine.model_folder import ARCHITECTURES
from pagoda.engine.models import MODEL_REGISTRY
from tests.serving import failed_start
from tests.test_gguf_weights import tiny_hf_weights, write_tiny_gguf
from tests.tiny_models import build_tiny_model

PROMPTS = [{"prompt_token_ids": list(range(10, 10 + n))} for n in (5, 40)]
GREEDY = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)


def test_sharded_safetensors_equal_single_file(tiny_models, tmp_path):
    sharded = build_tiny_model("qwen2", tmp_path / "sharded", shard_size="200KB")
    assert (sharded / "model.safetensors.index.json").exists()
    assert len(list(sharded.glob("*.safetensors"))) > 1
    single = LLM(str(tiny_models["qwen2"]), dtype="float32").generate(PROMPTS, GREEDY)
    split = LLM(str(sharded), dtype="float32").generate(PROMPTS, GREEDY)
    assert [o.outputs[0].token_ids for o in split] == [o.outputs[0].token_ids for o in single]


def test_dummy_weights_from_the_config_alone(tiny_models, tmp_path):
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (folder / name).write_bytes((tiny_models["mistral"] / name).read_bytes())
    llm = LLM(str(folder), dtype="float32", load_format="dummy")
    outs = llm.generate(PROMPTS, GREEDY)
    assert all(len(o.outputs[0].token_ids) == 24 for o in outs)
    state = llm.engine.runner.model.state_dict()
    assert all(torch.isfinite(t).all() for t in state.values())
    assert state["embed_tokens.weight"].abs().max() > 0


def test_bfloat16_runs_close_to_float32(tiny_models):
    """The first token's logprob over 20 prompts: one prompt alone is a lottery on a random
    tiny model, whose logits swing with the last bits of its activations. Which bf16 rounding
    it gets moves single prompts by 0.1 nats: the worst of these 20 is 0.07 off with oneDNN's
    bf16 matmul outputs and 0.125 with the kernel's fp32 ones (medians 0.011 and 0.025), where
    on SmolLM2 the kernel's are 2.5x closer to fp32. A broken path is off by whole nats."""
    prompts = [
        {"prompt_token_ids": list(range(s, s + n))} for n in (5, 40) for s in range(10, 110, 10)
    ]
    llm32 = LLM(str(tiny_models["llama"]), dtype="float32")
    llm16 = LLM(str(tiny_models["llama"]), dtype="bfloat16")
    assert llm16.engine.runner.kv_caches[0][0].dtype == torch.bfloat16
    lp32 = llm32.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=0))
    lp16 = llm16.generate(prompts, SamplingParams(temperature=0, max_tokens=1, logprobs=20))
    gaps = []
    for a, b in zip(lp32, lp16):
        ((token, entry32),) = a.outputs[0].logprobs[0].items()
        entry16 = b.outputs[0].logprobs[0]
        assert token in entry16
        gaps.append(abs(entry16[token].logprob - entry32.logprob))
    assert statistics.median(gaps) < 0.05 and max(gaps) < 0.25, gaps


def test_incomplete_checkpoint_is_refused(tiny_models, tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "incomplete"
    folder.mkdir()
    for path in tiny_models["llama"].iterdir():
        (folder / path.name).write_bytes(path.read_bytes())
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.k_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"lacks weights for: layers\.1\.self_attn\.qkv_proj"):
        LLM(str(folder), dtype="float32")


def test_config_alone_with_skip_tokenizer_init(tiny_models, tmp_path):
    folder = tmp_path / "just-config"
    folder.mkdir()
    (folder / "config.json").write_bytes((tiny_models["qwen3"] / "config.json").read_bytes())
    llm = LLM(str(folder), load_format="dummy", skip_tokenizer_init=True, dtype="float32")
    out = llm.generate(PROMPTS, GREEDY)
    assert [len(o.outputs[0].token_ids) for o in out] == [24, 24]
    assert out[0].outputs[0].text == ""
    with pytest.raises(ValueError, match="tokenizer"):
        llm.generate("text needs a tokenizer")


def test_kernel_selection():
    from pagoda.kernels import attention_cpu, backends, elementwise_cpu

    cpu_kernels = attention_cpu.available() and elementwise_cpu.available()
    auto_cpu = backends.select("auto", torch.device("cpu"))
    assert auto_cpu is (backends.CPU if cpu_kernels else backends.TORCH)
    assert backends.select("torch", torch.device("cpu")) is backends.TORCH
    assert backends.select("triton", torch.device("cpu")).name == "triton"
    # flash-attn needs pages of 256 tokens: with the default 16 the Triton kernels serve
    assert backends.select("auto", torch.device("cuda"), block_size=16).name == "triton"
    with pytest.raises(ValueError, match="kernel backend"):
        backends.select("cudnn", torch.device("cpu"))


def test_a_model_with_its_own_code_is_refused_in_one_line(tiny_models, tmp_path):
    """Before: transformers asked `Do you wish to run the custom code? [y/N]` on the engine's
    terminal (a `y` ran the repository's code), then failed with three lines advising
    `trust_remote_code=True`, an option pagoda does not have."""
    folder = tmp_path / "own-code"
    shutil.copytree(tiny_models["llama"], folder)
    config = json.loads((folder / "config.json").read_text())
    config |= {
        "model_type": "mymodel",
        "architectures": ["MyModelForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_mymodel.MyModelConfig"},
    }
    (folder / "config.json").write_text(json.dumps(config))
    stderr = failed_start("--model", str(folder), "--port", "1")
    (line,) = [line for line in stderr.splitlines() if "MyModelForCausalLM" in line]
    assert "unsupported model architecture ['MyModelForCausalLM']" in line
    assert "supported: LlamaForCausalLM" in line and "never runs" in line
    assert "trust_remote_code" not in stderr and "Do you wish" not in stderr


def _bin_checkpoint(source: Path, folder: Path, shards: int) -> Path:
    """`source` with its weights as pytorch_model.bin, or `shards` files and their index."""
    from safetensors.torch import load_file

    shutil.copytree(source, folder, ignore=shutil.ignore_patterns("*.safetensors"))
    tensors = load_file(source / "model.safetensors")
    if shards == 1:
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    names = sorted(tensors)
    weight_map = {}
    for shard in range(shards):
        file = f"pytorch_model-{shard + 1:05d}-of-{shards:05d}.bin"
        part = {name: tensors[name] for name in names[shard::shards]}
        torch.save(part, folder / file)
        weight_map |= dict.fromkeys(part, file)
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "pytorch_model.bin.index.json").write_text(json.dumps(index))
    return folder


def test_pytorch_bin_checkpoints_equal_safetensors(tiny_models, tmp_path):
    """Before: `no .safetensors weights in FOLDER` for a checkpoint saved as pytorch_model.bin
    (older models and many fine-tunes), which vLLM serves."""
    single = [o.outputs[0].token_ids for o in tiny_llm(tiny_models["llama"])]
    for shards in (1, 3):
        folder = _bin_checkpoint(tiny_models["llama"], tmp_path / f"bin-{shards}", shards)
        (folder / "training_args.bin").write_bytes(b"not weights")  # beside them, as trainers leave
        assert [o.outputs[0].token_ids for o in tiny_llm(folder)] == single


def test_safetensors_win_over_pytorch_bin(tiny_models, tmp_path):
    folder = tmp_path / "both"
    shutil.copytree(tiny_models["llama"], folder)
    (folder / "pytorch_model.bin").write_bytes(b"a broken download")  # never read
    assert tiny_llm(folder)[0].outputs[0].token_ids


def tiny_llm(folder: Path | str):
    return LLM(str(folder), dtype="float32").generate(PROMPTS, GREEDY)


def test_an_index_naming_a_missing_shard_is_refused_naming_it(tiny_models, tmp_path):
    """Before: `FileNotFoundError: No such file or directory: .../model-00003-of-00005...`."""
    folder = build_tiny_model("llama", tmp_path / "sharded", shard_size="200KB")
    shard = sorted(folder.glob("model-*.safetensors"))[2]
    shard.unlink()
    with pytest.raises(
        ValueError, match=rf"index.json names 1 weight file\(s\) missing .*{shard.name}"
    ):
        LLM(str(folder), dtype="float32")


def test_a_hub_id_in_the_offline_cache_with_pytorch_bin_weights(tiny_models, tmp_path, monkeypatch):
    """A repository of .bin weights, in the hub cache of a machine without a network."""
    from huggingface_hub import constants

    snapshot = tmp_path / "hub" / "models--acme--tiny-bin" / "snapshots" / ("0" * 40)
    _bin_checkpoint(tiny_models["llama"], snapshot, shards=1)
    (tmp_path / "hub" / "models--acme--tiny-bin" / "refs").mkdir()
    (tmp_path / "hub" / "models--acme--tiny-bin" / "refs" / "main").write_text("0" * 40)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    single = [o.outputs[0].token_ids for o in tiny_llm(tiny_models["llama"])]
    assert [o.outputs[0].token_ids for o in tiny_llm("acme/tiny-bin")] == single
    with pytest.raises(ValueError, match="'acme/other' is neither a local path nor"):
        LLM("acme/other")


def test_a_model_that_fails_to_load_stops_the_start_in_one_line(tiny_models, tmp_path):
    """One entry whose weights cannot be read beside a good one. Before: the good engine,
    still loading when the other failed, went on to "ready" after the server had stopped it;
    its supervisor took that for a crash (`first: the engine process exited with code 0`),
    scheduled a restart, or died with `InvalidStateError` in a "Task exception was never
    retrieved" traceback."""
    damaged = tmp_path / "damaged"
    shutil.copytree(tiny_models["llama"], damaged)
    (damaged / "model.safetensors").write_bytes(b"not a safetensors header")
    catalog = tmp_path / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: first\n    kind: chat\n    source: {tiny_models['llama']}\n"
        f"  - id: damaged\n    kind: chat\n    source: {damaged}\n"
    )
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1, stderr
    assert "model 'damaged' failed to load: SafetensorError: " in errors[0]
    assert "Traceback" not in stderr and "restarting" not in stderr


def test_the_folder_check_runs_what_the_engine_runs():
    assert set(MODEL_REGISTRY) == set(ARCHITECTURES)


def _damaged(kind: str, tiny_models, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    if kind == "config-not-json":
        shutil.copytree(tiny_models["llama"], folder)
        (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"],')
    elif kind == "no-tokenizer":
        shutil.copytree(tiny_models["llama"], folder, ignore=shutil.ignore_patterns("tok*"))
    elif kind == "gguf-cut-short":
        whole = tmp_path / "whole.gguf"
        write_tiny_gguf(str(whole), "qwen2", tiny_hf_weights(False, False, True))
        folder = tmp_path / "cut.gguf"
        folder.write_bytes(whole.read_bytes()[: whole.stat().st_size // 2])
    elif kind == "gguf-gemma2":
        folder = tmp_path / "gemma2.gguf"
        writer = gguf.GGUFWriter(str(folder), "gemma2")
        writer.add_tensor("token_embd.weight", np.ones((32, 64), np.float32))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
    return folder


@pytest.mark.parametrize(
    ("kind", "expected"),
    [
        ("config-not-json", r"\(id 'x'\): source: /.*/config.json is not JSON: Expecting"),
        # the server's tokenizer and the engine's process load side by side: whichever fails
        # first is the one line (the server's tokenizer nearly always; under load the engine)
        ("no-tokenizer", r"model 'x' failed to load( its tokenizer)?: ValueError: Couldn't"),
        ("gguf-cut-short", r"\(id 'x'\): source: /"),
        ("gguf-gemma2", r"\(id 'x'\): source: unsupported GGUF architecture 'gemma2'; supported: "),
    ],
)
def test_damaged_or_unsupported_weights_fail_the_start_in_one_line(
    tiny_models, tmp_path, kind: str, expected: str
):
    """Before: a config.json that is not JSON ended `pagoda serve` with five tracebacks (the
    server's tokenizer load raised OSError); a folder without tokenizer files logged five lines
    naming no model; a GGUF cut short logged `cannot reshape array of size 3214336 into shape
    (49152,612)` alone, and a gemma2 GGUF a tokenizer error naming no model."""
    catalog = tmp_path / "models.yaml"
    source = _damaged(kind, tiny_models, tmp_path)
    catalog.write_text(f"models:\n  - id: x\n    kind: chat\n    source: {source}\n")
    stderr = failed_start("--catalog", str(catalog), "--port", "1")
    errors = [line for line in stderr.splitlines() if " ERROR " in line]
    assert len(errors) == 1 and re.search(expected, errors[0]), stderr
    assert "Traceback" not in stderr
    if kind == "gguf-cut-short":
        assert "is not a readable GGUF file (cut short?)" in errors[0]
