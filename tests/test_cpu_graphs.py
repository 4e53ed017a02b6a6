"""CPU graphs (`engine/cpu_graphs.py`): decode steps replayed from their recorded kernel calls,
and prefill steps run as graphs used once, give the same tokens and logprobs as the same steps
run eagerly, bit for bit, through batch sizes that come, go and outgrow the scratch arenas,
guarded or not; a forward pass with torch arithmetic in it stays eager, and so do prefills
whose context is long enough for torch to take part of their attention."""

import ctypes
import functools

import pytest
import torch

from pagoda.engine import LLM, SamplingParams, cpu_graphs
from pagoda.engine.cpu_graphs import CpuGraphs, NotCapturable, _ViewsOnly, packed_calls
from pagoda.kernels import (
    attention_cpu,
    cpu_native,
    elementwise_cpu,
    linear_bf16,
    linear_cpu,
    packed_attention,
)
from tests.test_smollm2 import smollm2_gguf

pytestmark = pytest.mark.skipif(
    not elementwise_cpu.available(),
    reason=f"no CPU kernels: {cpu_native.unavailable_reason(elementwise_cpu.NAME)}",
)

# one sequence, then six (the arenas grow, dropping the first graph), then one again
BATCHES = (1, 6, 1)


def prompts(count: int, seed: int) -> list[dict]:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(5, 60, (count,), generator=g).tolist()
    return [
        {"prompt_token_ids": torch.randint(3, 1000, (n,), generator=g).tolist()} for n in lengths
    ]


def run(llm: LLM, params: SamplingParams) -> list[tuple[list[int], list[float]]]:
    results = []
    for i, count in enumerate(BATCHES):
        for out in llm.generate(prompts(count, seed=i), params):
            completion = out.outputs[0]
            chosen = [
                step[token].logprob
                for step, token in zip(completion.logprobs, completion.token_ids)
            ]
            results.append((completion.token_ids, chosen))
    return results


def graphs_of(llm: LLM) -> CpuGraphs:
    graphs = llm.engine.runner.graphs
    assert isinstance(graphs, CpuGraphs)
    return graphs


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, logprobs=1),
        SamplingParams(temperature=1.0, seed=7, max_tokens=24, ignore_eos=True, logprobs=1),
    ],
    ids=["greedy", "sampled"],
)
def test_replays_equal_eager_steps_tiny_llama_fp32(tiny_models, params):
    folder = str(tiny_models["llama"])
    eager = LLM(folder, dtype="float32", enforce_eager=True)
    replayed = LLM(folder, dtype="float32")
    assert eager.engine.runner.graphs is None
    assert run(replayed, params) == run(eager, params)
    graphs = graphs_of(replayed)
    assert graphs.eager_reason is None
    assert set(graphs.graphs) == {1, 6}
    assert len(graphs.graphs[1].calls) > 4 * replayed.engine.hf_config.num_hidden_layers
    # every prefill ran as a graph used once, checked once per token count
    assert graphs.once_checked and all(not long for _, long in graphs.once_checked)
    assert graphs.once_refused == set()


def test_unguarded_prefills_equal_eager_ones(tiny_models):
    """A token count's second prefill is recorded without the guard: same bits."""
    folder = str(tiny_models["llama"])
    eager = LLM(folder, dtype="float32", enforce_eager=True)
    once = LLM(folder, dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1)
    g = torch.Generator().manual_seed(3)
    batches = [
        [{"prompt_token_ids": torch.randint(3, 1000, (40,), generator=g).tolist()}]
        for _ in range(3)
    ]
    checked = []
    for batch in batches:
        want = eager.generate(batch, params)[0].outputs[0]
        got = once.generate(batch, params)[0].outputs[0]
        assert got.token_ids == want.token_ids
        assert [s[t].logprob for s, t in zip(got.logprobs, got.token_ids)] == [
            s[t].logprob for s, t in zip(want.logprobs, want.token_ids)
        ]
        checked.append(set(graphs_of(once).once_checked))
    assert (40, False) in checked[0] and checked[0] == checked[1] == checked[2]


def test_prefills_past_the_long_context_stay_eager(tiny_models):
    """Past attention_cpu.LONG_PREFILL tokens of context torch takes part of a prefill's
    attention: those steps run eagerly, the shorter ones of the same prompt as graphs."""
    folder = str(tiny_models["llama"])
    budget = {"max_num_batched_tokens": 256, "max_model_len": 2048}
    eager = LLM(folder, dtype="float32", enforce_eager=True, **budget)
    once = LLM(folder, dtype="float32", **budget)
    g = torch.Generator().manual_seed(4)
    prompt = [{"prompt_token_ids": torch.randint(3, 1000, (1700,), generator=g).tolist()}]
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    want = eager.generate(prompt, params)[0].outputs[0]
    got = once.generate(prompt, params)[0].outputs[0]
    assert got.token_ids == want.token_ids
    assert [s[t].logprob for s, t in zip(got.logprobs, got.token_ids)] == [
        s[t].logprob for s, t in zip(want.logprobs, want.token_ids)
    ]
    graphs = graphs_of(once)
    assert graphs.once_refused == {True} and (256, False) in graphs.once_checked


def test_a_new_thread_count_drops_the_graphs(tiny_models):
    """The thread governor changes torch's thread count, which the recorded calls carry."""
    llm = LLM(str(tiny_models["llama"]), dtype="float32")
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    llm.generate(prompts(1, seed=0), params)
    graphs = graphs_of(llm)
    first = graphs.graphs[1]
    threads = torch.get_num_threads()
    other = 2 if threads == 1 else 1  # one thread already where other work shares the cores
    torch.set_num_threads(other)
    try:
        llm.generate(prompts(1, seed=1), params)
    finally:
        torch.set_num_threads(threads)
    assert graphs.threads == other and graphs.graphs[1] is not first
    # the norms' last argument is their thread count
    norms = [args for function, args in graphs.graphs[1].calls if "rms_norm" in function.__name__]
    assert norms and all(args[-1] == other for args in norms)
    assert all(
        args[-1] == threads for function, args in first.calls if "rms_norm" in function.__name__
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_replay_cpp_writes_the_bits_of_the_python_loop(tiny_models, dtype):
    """replay.cpp reaches every kernel through one function type (floats among the ints, as
    RMSNorm's eps and attention's scale): a decode step replayed through it and through the
    Python loop over the same calls writes the same bits, from arenas zeroed before each."""
    llm = LLM(str(tiny_models["llama"]), dtype=dtype)
    llm.generate(prompts(1, seed=0), SamplingParams(temperature=0, max_tokens=8, ignore_eos=True))
    graphs = graphs_of(llm)
    graph = graphs.graphs[1]
    assert graph.packed is not None and len(graph.packed) == len(graph.calls)
    names = {function.__name__ for function, _ in graph.calls}
    assert {"pagoda_rms_norm", "pagoda_rotary"} <= names
    assert any(name.startswith("pagoda_paged_attention") for name in names)

    def replayed(packed) -> torch.Tensor:
        with torch.inference_mode():  # the arenas are inference tensors
            for arena in graphs.arenas:
                arena.zero_()
            graph.packed = packed
            return graph.replay().clone()

    packed = graph.packed
    through_c, through_python = replayed(packed), replayed(None)
    graph.packed = packed
    assert through_c.abs().sum() > 0
    assert torch.equal(through_c, through_python)
    # the timed replay (benchmarks/profile_decode.py) runs the same calls, each timed
    seconds = (ctypes.c_double * len(packed))()
    with torch.inference_mode():
        for arena in graphs.arenas:
            arena.zero_()
        lib = cpu_native.load(cpu_graphs.REPLAY, cpu_graphs.REPLAY_SIGNATURES)
        lib.pagoda_replay_timed(packed, len(packed), seconds)
        assert torch.equal(graph.hidden, through_python)
    assert all(0 < t < 1 for t in seconds)
    # a call that is not a kernel's own ctypes function cannot be packed: the loop runs it
    function, args = graph.calls[0]
    assert packed_calls([(functools.partial(function), args)]) is None


def test_packed_calls_take_only_the_argument_types_replay_cpp_passes():
    """Every CPU kernel's signature fits replay.cpp's call type (its ints and floats), and a
    function with a double (passed in a float register as 8 bytes), or more ints than it
    passes, is left to the Python loop."""
    lib = cpu_native.load(cpu_graphs.REPLAY, cpu_graphs.REPLAY_SIGNATURES)
    most_ints, most_floats = lib.pagoda_replay_ints(), lib.pagoda_replay_floats()
    signatures = {
        **attention_cpu.SIGNATURES,
        **attention_cpu.AMX_SIGNATURES,
        **elementwise_cpu.SIGNATURES,
        **linear_bf16.SIGNATURES,
        **linear_cpu.SIGNATURES,
        **packed_attention.SIGNATURES,
    }
    for name, (_, kinds) in signatures.items():
        assert all(k in cpu_graphs.INTEGER_KINDS or k is cpu_native.F32 for k in kinds), name
        assert sum(k is cpu_native.F32 for k in kinds) <= most_floats, name
        assert sum(k in cpu_graphs.INTEGER_KINDS for k in kinds) <= most_ints, name

    def function(argtypes: list) -> ctypes._CFuncPtr:
        f = ctypes.CDLL(lib._name).pagoda_replay_ints  # a handle of its own to declare
        f.argtypes = argtypes
        return f

    assert packed_calls([(function([cpu_native.I64, cpu_native.F32]), (1, 0.5))]) is not None
    assert packed_calls([(function([ctypes.c_double]), (0.5,))]) is None
    too_many = [cpu_native.I64] * (most_ints + 1)
    assert packed_calls([(function(too_many), (0,) * len(too_many))]) is None


@pytest.mark.skipif(not linear_bf16.available(), reason="the CPU runs no native bf16")
def test_replays_equal_eager_steps_smollm2_bf16():
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True, logprobs=1)
    eager = LLM(str(smollm2_gguf()), max_model_len=1024, dtype="bfloat16", enforce_eager=True)
    replayed = LLM(str(smollm2_gguf()), max_model_len=1024, dtype="bfloat16")
    assert run(replayed, params) == run(eager, params)
    graphs = graphs_of(replayed)
    assert graphs.eager_reason is None and 1 in graphs.graphs
    if linear_bf16.kernel_amx():  # the tiles take every batch
        assert graphs.refused == {} and 6 in graphs.graphs
    else:  # AVX512-BF16 alone: past 4 rows oneDNN, through torch; those batch sizes alone eager
        assert 6 in graphs.refused and all(b > linear_bf16.AVX512_ROWS for b in graphs.refused)
        assert "runs in torch" in graphs.refused[6]


def test_a_forward_with_torch_arithmetic_stays_eager(tiny_models):
    """Qwen3's per-head q/k norms take the torch reference (3-D rows): nothing to replay."""
    folder = str(tiny_models["qwen3"])
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True, logprobs=1)
    eager = LLM(folder, dtype="float32", enforce_eager=True)
    replayed = LLM(folder, dtype="float32")
    assert run(replayed, params) == run(eager, params)
    graphs = graphs_of(replayed)
    assert "runs in torch" in graphs.eager_reason
    assert graphs.graphs == {} and graphs.once_checked == set()


def test_capture_refuses_arithmetic_and_copies_but_takes_views():
    x = torch.randn(4, 6)
    with torch.inference_mode(), _ViewsOnly():  # as the engine runs: reshape stays one op
        assert x.view(2, 12).reshape(24)[3:].numel() == 21
        q, k = x.split([4, 2], dim=1)
        with pytest.raises(NotCapturable, match="runs in torch"):
            x + 1
        with pytest.raises(NotCapturable, match="copies its input"):
            q.reshape(-1)  # not contiguous: a copy
