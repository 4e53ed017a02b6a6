"""The CUDA path's host-side contract, checked without a GPU (issue: the CUDA path read
closely before its first run): memory of a bf16 load, the device an engine runs on and refuses,
bounded host-device copies per step, prompt logprobs in slices, flash-attn's limits.

What needs a GPU to show (KV blocks after profiling, decode at 4k under a 32k graph, a mixed
step of 256 decodes and an 8k chunk) is in benchmarks/gpu_check.py."""

import json
import logging
import subprocess
import sys
import textwrap

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from pagoda.engine import LLM, SamplingParams, profiling
from pagoda.engine import model_runner as model_runner_module
from pagoda.engine.config import EngineConfig
from pagoda.engine.llm_engine import LLMEngine
from pagoda.kernels import attention_flash

PEAK_SCRIPT = textwrap.dedent(
    """
    import json, resource
    from pathlib import Path
    import torch
    from transformers import LlamaConfig
    from pagoda.engine import loader
    from pagoda.engine.config import EngineConfig

    config = LlamaConfig(
        architectures=["LlamaForCausalLM"], hidden_size=1024, intermediate_size=4096,
        num_hidden_layers=8, num_attention_heads=16, num_key_value_heads=4, vocab_size=32000,
        tie_word_embeddings=False,
    )
    engine_config = EngineConfig(model="unused", load_format="dummy", kernel_backend="torch")
    # Empty tensors get filled (NaN), so that what is allocated is resident, as on a GPU,
    # where memory that is reserved is used whether it was written or not.
    torch.use_deterministic_algorithms(True)
    base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    model = loader.build_model(
        config, loader.ModelSource(Path(".")), engine_config, torch.device("cpu"),
        torch.bfloat16, 64,
    )
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    size = sum(p.numel() * p.element_size() for p in model.parameters())
    print(json.dumps({"growth": peak - base, "model_bytes": size}))
    """
)


def test_bf16_load_peaks_near_its_own_size():
    """A 187M-parameter model loaded in bf16 (374 MB): built in fp32 and cast, the peak was
    820 MB; built in bf16 on the meta device, it is the model's size."""
    run = subprocess.run(
        [sys.executable, "-c", PEAK_SCRIPT], capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    measured = json.loads(run.stdout.strip().splitlines()[-1])
    assert measured["model_bytes"] > 350e6
    assert measured["growth"] < 1.25 * measured["model_bytes"], measured


needs_no_gpu = pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine without GPU")

T4, A100, H100 = "Tesla T4", "NVIDIA A100-SXM4-80GB", "NVIDIA H100 80GB HBM3"


def _pretend_gpu(monkeypatch, name: str, capability: tuple[int, int]) -> torch.device:
    """No GPU here: the device's name and compute capability are patched, for the unit tests
    of the dtype rule only (nothing runs on the device)."""
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    return torch.device("cuda", 0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_a_process_forked_from_the_ranks_forkserver_initialises_cuda():
    """Tensor-parallel ranks fork from a forkserver that has imported the engine: had an
    import reached the CUDA runtime there (xgrammar asks torch whether CUDA is there), every
    rank would fail with "Cannot re-initialize CUDA in forked subprocess". A fresh
    interpreter, as an engine core is."""
    code = (
        "import torch\n"
        "from pagoda.engine import distributed\n"
        "if __name__ == '__main__':\n"
        "    rank = distributed.rank_context().Process(target=torch.cuda.init)\n"
        "    rank.start()\n"
        "    rank.join(120)\n"
        "    print(rank.exitcode)\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=180
    )
    assert result.stdout.split() == ["0"], result.stderr


@pytest.mark.parametrize(
    "name,capability,checkpoint,served",
    [
        # Turing has no bf16 arithmetic: auto serves fp16, as vLLM does
        (T4, (7, 5), torch.bfloat16, torch.float16),
        (T4, (7, 5), torch.float32, torch.float16),
        (T4, (7, 5), None, torch.float16),
        (T4, (7, 5), torch.float16, torch.float16),
        (A100, (8, 0), torch.bfloat16, torch.bfloat16),
        (A100, (8, 0), torch.float16, torch.float16),
        (A100, (8, 0), torch.float32, torch.bfloat16),
        (H100, (9, 0), torch.bfloat16, torch.bfloat16),
        (H100, (9, 0), torch.float16, torch.float16),
        (H100, (9, 0), None, torch.bfloat16),
    ],
)
def test_auto_dtype_on_a_gpu(monkeypatch, caplog, name, capability, checkpoint, served):
    """dtype auto on a GPU: the checkpoint's half type, float16 where the GPU has no bf16
    (compute capability below 8.0), and the start-up log says so when it differs. The GPU's
    properties are patched (see _pretend_gpu)."""
    device = _pretend_gpu(monkeypatch, name, capability)
    with caplog.at_level(logging.WARNING, logger="pagoda.engine.config"):
        assert EngineConfig(model="unused").resolve_dtype(device, checkpoint) == served
    warned = [r.getMessage() for r in caplog.records if "bfloat16 arithmetic" in r.getMessage()]
    if capability < (8, 0) and checkpoint != torch.float16:
        assert len(warned) == 1 and "Tesla T4 (cuda:0, compute capability 7.5)" in warned[0]
        assert "serves float16 instead of bfloat16" in warned[0]
    else:
        assert warned == []


@pytest.mark.parametrize("dtype", ["bfloat16", "bf16", torch.bfloat16])
def test_explicit_bf16_on_a_gpu_without_it_is_a_start_up_error(monkeypatch, dtype):
    """As vLLM: an explicit bf16 on a T4 fails at start-up, naming the GPU and the way out,
    instead of running bf16 that the GPU cannot compute natively. The GPU's properties are
    patched (see _pretend_gpu)."""
    device = _pretend_gpu(monkeypatch, T4, (7, 5))
    config = EngineConfig(model="unused", dtype=dtype)
    with pytest.raises(ValueError) as error:
        config.resolve_dtype(device, torch.bfloat16)
    message = str(error.value)
    assert "Tesla T4 (cuda:0, compute capability 7.5) has no bfloat16 arithmetic" in message
    assert "set dtype to 'float16' (--dtype float16, or dtype: float16 in the catalog)" in message
    for other, expected in (("float16", torch.float16), ("float32", torch.float32)):
        assert EngineConfig(model="unused", dtype=other).resolve_dtype(device, None) == expected


@pytest.mark.parametrize("name,capability", [(A100, (8, 0)), (H100, (9, 0))])
def test_explicit_bf16_runs_from_ampere_on(monkeypatch, name, capability):
    """The GPU's properties are patched (see _pretend_gpu)."""
    device = _pretend_gpu(monkeypatch, name, capability)
    config = EngineConfig(model="unused", dtype="bfloat16")
    assert config.resolve_dtype(device, torch.float16) == torch.bfloat16


@needs_no_gpu
@pytest.mark.parametrize("device", ["cuda", "cuda:1"])
def test_an_explicit_gpu_that_cannot_run_is_an_error(device):
    with pytest.raises(ValueError, match=f"device '{device}'"):
        EngineConfig(model="unused", device=device).resolve_device()
    assert EngineConfig(model="unused", device="auto").resolve_device() == torch.device("cpu")


@needs_no_gpu
def test_serve_refuses_a_cuda_model_without_gpu(tiny_models):
    """`pagoda serve` with a GPU model on a machine without one exits with the reason, instead
    of serving on the CPU."""
    cmd = [sys.executable, "-m", "pagoda", "serve", "--model", str(tiny_models["llama"])]
    run = subprocess.run(
        [*cmd, "--device", "cuda", "--port", "1"], capture_output=True, text=True, timeout=300
    )
    assert run.returncode != 0
    assert "device 'cuda'" in run.stderr and "CPU-only build" in run.stderr, run.stderr[-3000:]


class _SetDevice(Exception):
    pass


def test_each_engine_makes_its_gpu_current(monkeypatch, tiny_models):
    """Triton launches on the current device: an engine on cuda:1 must make cuda:1 current
    before anything runs. No GPU here: torch.cuda answers as a 2-GPU machine would, and
    set_device stops the engine once called."""
    calls = []

    def set_device(device):
        calls.append(torch.device(device))
        raise _SetDevice

    monkeypatch.setattr(torch.version, "cuda", torch.version.cuda or "13.0")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.setattr(torch.cuda, "set_device", set_device)
    with pytest.raises(_SetDevice):
        LLMEngine(EngineConfig(model=str(tiny_models["llama"]), device="cuda:1"))
    assert calls == [torch.device("cuda", 1)]
    with pytest.raises(ValueError, match="only 2 GPU"):
        EngineConfig(model="unused", device="cuda:2").resolve_device()


class _CountHostTensors(TorchDispatchMode):
    """Counts tensors made from host data (torch.tensor, from_numpy, indexing by a list):
    on a GPU each is a host-to-device copy once it reaches the device, and
    `.item()` reads, each a device sync."""

    def __init__(self):
        super().__init__()
        self.host_tensors = 0
        self.item_reads = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in (torch.ops.aten.lift_fresh.default, torch.ops.aten.lift_fresh_copy.default):
            self.host_tensors += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.item_reads += 1
        return func(*args, **(kwargs or {}))


def test_a_step_sends_its_host_data_in_two_copies(tiny_models):
    """Model inputs in one copy, sampling parameters in another, however many sequences and
    whatever they ask for (penalties, logit_bias, min_tokens, logprobs, top-k/p, min-p, seeds):
    never one copy per tensor, per sequence or per bias entry. Triton kernels (interpreted):
    the CUDA path's code."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32", kernel_backend="triton")
    engine = llm.engine
    params = [
        SamplingParams(temperature=0, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=0.8, top_k=20, top_p=0.9, max_tokens=6, ignore_eos=True),
        SamplingParams(temperature=1.0, min_p=0.1, seed=7, max_tokens=6, ignore_eos=True),
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.3, max_tokens=6, logprobs=3),
        SamplingParams(temperature=0, repetition_penalty=1.3, min_tokens=4, max_tokens=6),
        SamplingParams(temperature=0.5, logit_bias={5: 2.0, 9: -3.0, 11: 1.0}, max_tokens=6),
    ]
    # six sequences, each on its own sampling path: a copy per sequence would be six
    for i, p in enumerate(params):  # short prompts: each Triton program is interpreted
        engine.add_request(f"r{i}", list(range(10 + i, 14 + 2 * i)), p)
    runner = engine.runner
    steps = 0
    while engine.has_unfinished_requests():
        sends = runner.staging.sends + runner.sampling_staging.sends
        with _CountHostTensors() as counter:
            engine.step()
        steps += 1
        assert runner.staging.sends + runner.sampling_staging.sends - sends <= 2
        assert counter.host_tensors <= 4, f"step {steps}: {counter.host_tensors} host tensors"
        assert counter.item_reads == 0
    assert steps >= 6
    # the finished sequences give their count rows back at the next step that samples
    engine.add_request("last", [5, 6, 7], SamplingParams(presence_penalty=1.0, max_tokens=2))
    while engine.has_unfinished_requests():
        engine.step()
    assert [s.request_id for s in runner.token_counts.rows] == ["last"]


def test_prompt_logprobs_are_computed_in_bounded_slices(monkeypatch, tiny_models):
    """The [tokens x vocab] logits of a prompt chunk are never built at once: slices of at
    most PROMPT_LOGPROBS_ELEMENTS values, with the same logprobs as in one piece."""
    prompt = {"prompt_token_ids": list(range(20, 120))}
    params = SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)
    whole = LLM(str(tiny_models["qwen2"]), dtype="float32").generate(prompt, params)[0]
    llm = LLM(str(tiny_models["qwen2"]), dtype="float32")
    vocab = llm.engine.vocab_size
    monkeypatch.setattr(model_runner_module, "PROMPT_LOGPROBS_ELEMENTS", 7 * vocab)
    model = llm.engine.runner.model
    rows_seen = []
    compute_logits = model.compute_logits

    def counting(hidden):
        rows_seen.append(hidden.shape[0])
        return compute_logits(hidden)

    monkeypatch.setattr(model, "compute_logits", counting)
    sliced = llm.generate(prompt, params)[0]
    assert max(rows_seen) == 7 and len(rows_seen) >= 99 // 7
    assert len(sliced.prompt_logprobs) == len(whole.prompt_logprobs) == 100
    for a, b in zip(sliced.prompt_logprobs[1:], whole.prompt_logprobs[1:]):
        assert a.keys() == b.keys()
        for token in a:
            assert a[token].rank == b[token].rank
            assert a[token].logprob == pytest.approx(b[token].logprob, abs=1e-5)


@pytest.mark.parametrize(
    "block_size,dtype,head_dim,capability,usable",
    [
        (256, torch.bfloat16, 128, (9, 0), True),
        (512, torch.float16, 64, (8, 0), True),
        (256, torch.float32, 128, (9, 0), False),  # fp32: flash-attn has no kernel for it
        (256, torch.bfloat16, 320, (9, 0), False),  # head sizes past 256
        (256, torch.float16, 100, (9, 0), False),  # not a multiple of 8
        (16, torch.bfloat16, 128, (9, 0), False),  # pages under 256 tokens
        (256, torch.float16, 128, (7, 5), False),  # before Ampere
    ],
)
def test_flash_attn_only_where_it_can_run(
    monkeypatch, block_size, dtype, head_dim, capability, usable
):
    """flash-attn is not installed here: the check runs as on a GPU node that has it."""
    monkeypatch.setattr(attention_flash.importlib.util, "find_spec", lambda name: object())
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device: capability)
    device = torch.device("cuda")
    assert attention_flash.usable(block_size, dtype, head_dim, device) is usable


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_the_profiled_step_runs_on_a_one_block_cache(tiny_models, backend):
    """The KV cache is sized after one step of the largest batch (a long prefill beside
    single-token rows, every sampling path, prompt logprobs), run on a one-block cache before
    the real one exists; here it runs on the CPU (Triton interpreted) with both kernel sets."""
    llm = LLM(str(tiny_models["qwen3"]), dtype="float32", kernel_backend=backend)
    engine = llm.engine
    # a prefill of 37 tokens over three blocks beside three single-token rows (a small batch:
    # each Triton program is interpreted)
    batch = profiling.dummy_batch(40, 4, 16)
    assert sum(batch.num_new_tokens) == 40 and len(batch.seqs) == 4
    assert len(batch.seqs[0].block_table) == 3
    assert all(set(s.block_table) == {0} for s in batch.seqs)
    model = engine.runner.model
    profiling.run_dummy_step(model, 40, 4, 16, engine.device, engine.dtype)
    # the engine's own cache is untouched, and it still answers as before
    out = llm.generate({"prompt_token_ids": [3, 4, 5]}, SamplingParams(temperature=0, max_tokens=4))
    assert len(out[0].outputs[0].token_ids) == 4


def test_kv_cache_budget_leaves_room_for_the_measured_step():
    gib = 1 << 30
    # 80 GiB card, 16 GiB in use after loading (weights, context), a step of 3 GiB: at 0.9
    # utilisation the cache gets 72 - 16 - 3 = 53 GiB
    assert profiling.kv_cache_budget(80 * gib, 64 * gib, 0.9, 3 * gib) == 53 * gib
    assert profiling.kv_cache_budget(80 * gib, 4 * gib, 0.9, 3 * gib) == 0
