"""Tensor parallelism on the CPU (gloo): TP=2 against TP=1 and transformers.

The models are tiny and chosen to cover each way of splitting: KV heads split (4 heads, 2 KV
heads) and replicated (1 KV head), a vocabulary that does not divide by 2 (padded shard), biases
on the row-parallel o_proj and down_proj (added once), tied and untied LM heads, and the MoE
families (each expert's intermediate size split).
"""

from __future__ import annotations

import gc
import multiprocessing
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from pagoda.engine import LLM, SamplingParams, distributed
from pagoda.engine.config import EngineConfig
from pagoda.engine.core import EngineCore
from pagoda.engine.distributed import RankDiedError
from tests.random_models import Draw, build
from tests.serving import failed_start, free_port, gone

NEW_TOKENS = 12
GREEDY = SamplingParams(temperature=0, max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS)
COMMON = dict(
    hidden_size=64,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    max_position_embeddings=256,
    rms_norm_eps=1e-6,
    initializer_range=0.2,
    rope_parameters={"rope_type": "default", "rope_theta": 1e4},
    bos_token_id=1,
    eos_token_id=2,
)
CASES = {
    "llama": dict(
        COMMON,
        num_key_value_heads=2,
        vocab_size=1001,
        tie_word_embeddings=False,
        attention_bias=True,
        mlp_bias=True,
    ),
    "qwen3": dict(
        COMMON, num_key_value_heads=1, vocab_size=512, tie_word_embeddings=True, head_dim=32
    ),
    "qwen3_moe": dict(
        COMMON,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=False,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        moe_intermediate_size=32,
        norm_topk_prob=True,
        decoder_sparse_step=1,
        mlp_only_layers=[1],
    ),
    "mixtral": dict(
        COMMON,
        num_key_value_heads=2,
        vocab_size=512,
        tie_word_embeddings=True,
        num_local_experts=4,
        num_experts_per_tok=2,
    ),
}
PROMPTS = [[5, 9, 200, 31, 7], list(range(3, 40)), [11] * 20]


def _run(folder, tp: int, **parallel) -> tuple[list[list[int]], list[torch.Tensor]]:
    """Greedy tokens of each prompt, and the logits of every step (recorded on rank 0)."""
    kv_heads = CASES[folder.name]["num_key_value_heads"]
    llm = LLM(
        str(folder),
        dtype="float32",
        device="cpu",
        skip_tokenizer_init=True,
        kernel_backend="torch",
        tensor_parallel_size=tp,
        kv_cache_blocks=64,
        **parallel,
    )
    try:
        model = llm.engine.runner.model
        # rank 0's cache holds its KV heads only (the one KV head replicated on both ranks)
        assert llm.engine.runner.kv_caches[0][0].shape[2] == max(1, kv_heads // tp)
        local_ranks = tp // parallel.get("nnodes", 1)
        assert len(llm.engine.leader.processes if tp > 1 else []) == local_ranks - 1
        logits: list[torch.Tensor] = []
        inner = model.compute_logits

        def recorded(hidden: torch.Tensor) -> torch.Tensor:
            logits.append(inner(hidden).clone())
            return logits[-1]

        model.compute_logits = recorded
        outs = llm.generate([{"prompt_token_ids": p} for p in PROMPTS], GREEDY)
        return [o.outputs[0].token_ids for o in outs], logits
    finally:
        llm.close()


@pytest.mark.parametrize("family", list(CASES))
def test_tp2_matches_tp1_and_transformers(family, tmp_path):
    folder = tmp_path / family
    reference = build(Draw(family, family, CASES[family], seed=0, prompts=[]), folder)
    tokens1, logits1 = _run(folder, 1)
    tokens2, logits2 = _run(folder, 2)
    assert tokens2 == tokens1
    assert len(logits2) == len(logits1)
    for a, b in zip(logits1, logits2):
        assert a.shape == b.shape
        torch.testing.assert_close(b, a, atol=1e-5, rtol=0)
    for prompt, got in zip(PROMPTS, tokens2):
        want = reference.generate(
            torch.tensor([prompt]),
            max_new_tokens=NEW_TOKENS,
            min_new_tokens=NEW_TOKENS,
            do_sample=False,
        )[0, len(prompt) :].tolist()
        assert got == want


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tp") / "llama"
    build(Draw("llama", "llama", CASES["llama"], seed=0, prompts=[]), folder)
    return folder


def test_prompt_logprobs_under_tp2_equal_those_of_one_rank(llama):
    """prompt_logprobs (and the completions API's echo with logprobs, as lm-eval-harness asks
    a prompt's likelihood) were refused with tensor parallelism. In 8-token steps, a prompt's
    logprobs span several steps, beside a request that asks none."""
    kwargs = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_blocks=64)
    asked = SamplingParams(temperature=0, max_tokens=3, prompt_logprobs=2)
    prompts = [{"prompt_token_ids": p} for p in PROMPTS]
    params = [asked, GREEDY, asked]
    got = {}
    for tp in (1, 2):
        with LLM(str(llama), tensor_parallel_size=tp, max_num_batched_tokens=8, **kwargs) as llm:
            got[tp] = llm.generate(prompts, params)
    for one, two in zip(got[1], got[2]):
        assert two.outputs[0].token_ids == one.outputs[0].token_ids
        assert (one.prompt_logprobs is None) == (two.prompt_logprobs is None)
        for a, b in zip(one.prompt_logprobs or [], two.prompt_logprobs or []):
            assert (a is None) == (b is None)
            if a is not None:
                assert a.keys() == b.keys()
                for token in a:
                    assert b[token].rank == a[token].rank
                    assert abs(b[token].logprob - a[token].logprob) < 1e-5
    assert [len(o.prompt_logprobs or []) for o in got[2]] == [len(PROMPTS[0]), 0, 20]


def test_two_nodes_on_one_machine_give_the_tokens_of_one_rank(llama):
    """Node 1 is `pagoda serve --node-rank 1` in its own process (no HTTP), node 0 the LLM."""
    port = free_port()
    node1 = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--model", str(llama), "--dtype", "float32"]
        + ["--device", "cpu", "--tensor-parallel-size", "2", "--nnodes", "2"]
        + ["--node-rank", "1", "--master-port", str(port)],
    )
    try:
        tokens2, _ = _run(llama, 2, nnodes=2, master_port=port)
        assert node1.wait(60) == 0  # node 0's close stops the ranks of every node
    finally:
        node1.kill()
    tokens1, _ = _run(llama, 1)
    assert tokens2 == tokens1


def test_a_rank_that_cannot_join_fails_the_start_after_the_timeout(tiny_models):
    """Node 1 never starts: node 0's server exits 1 with a message that says what to check."""
    start = time.monotonic()
    stderr = failed_start(
        *["--model", str(tiny_models["llama"]), "--device", "cpu", "--tensor-parallel-size", "2"],
        *["--nnodes", "2", "--master-port", str(free_port()), "--distributed-timeout", "3"],
        timeout=120,
    )
    assert "rank 0 of 2 could not form the process group" in stderr
    assert "within 3 s" in stderr and "on 2 node(s)" in stderr
    assert time.monotonic() - start < 60


def test_a_rank_that_dies_before_joining_fails_the_start_at_once(llama, tmp_path):
    """A script without the `if __name__ == "__main__":` guard (vLLM's users' usual slip): its
    rank dies importing it. Rank 0 waited for it through the whole distributed timeout (120 s
    by default), then blamed the network ("every rank must ... reach that address")."""
    script = tmp_path / "unguarded.py"
    script.write_text(
        "from pagoda.engine import LLM\n"
        f"LLM({str(llama)!r}, device='cpu', skip_tokenizer_init=True, tensor_parallel_size=2,\n"
        "    kv_cache_blocks=64, distributed_timeout_s=100)\n"
    )
    start = time.monotonic()
    run = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=200,
        env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])},  # this checkout
    )  # fmt: skip
    assert run.returncode == 1
    assert "pagoda-tp-rank1 exited (code 1) before it joined the process group" in run.stderr
    assert 'if __name__ == "__main__":' in run.stderr.splitlines()[-1]
    assert time.monotonic() - start < 60


def test_a_node_whose_ranks_cannot_meet_exits_1_with_one_line(llama):
    """Node 1 started without node 0: its rank says why in one log line (it printed
    multiprocessing's raw traceback), and `pagoda serve --node-rank 1` exits 1."""
    stderr = failed_start(
        *["--model", str(llama), "--device", "cpu", "--tensor-parallel-size", "2"],
        *["--nnodes", "2", "--node-rank", "1"],
        *["--master-port", str(free_port()), "--distributed-timeout", "2"],
        timeout=120,
    )
    assert "rank 1 failed to start: RuntimeError: tensor parallelism: rank 1 of 2" in stderr
    assert "within 2 s" in stderr
    assert "Traceback" not in stderr, stderr


def test_an_engine_that_fails_to_load_stops_its_ranks(llama, tmp_path):
    """Rank 0 fails after its ranks started (here: no tokenizer, which rank 0 alone loads): the
    ranks and the group went on, so the process could never start another TP engine ("already
    runs a tensor-parallel engine: close() it first", with nothing to close)."""
    with pytest.raises(ValueError, match="cannot be loaded"):
        LLM(str(llama), dtype="float32", device="cpu", tokenizer=str(tmp_path / "none"),
            tensor_parallel_size=2, kv_cache_blocks=64)  # fmt: skip
    assert distributed.world_size() == 1
    ranks = [p for p in multiprocessing.active_children() if p.name.startswith("pagoda-tp")]
    assert ranks == []


def test_a_stopped_engine_core_stops_its_ranks(llama):
    """A server's engine core, told to shut down, stops its ranks: they take the stop and exit 0
    (those of another node too: `pagoda serve --node-rank 1` then exits 0, where it exited 1
    on the closed connection). The core's watch does not take their end for a fault."""
    config = EngineConfig(
        str(llama), dtype="float32", device="cpu", skip_tokenizer_init=True,
        tensor_parallel_size=2, kv_cache_blocks=64, serving=True,
    )  # fmt: skip
    core = EngineCore(config)
    (rank,) = core.engine.leader.processes
    core.close()
    assert rank.exitcode == 0
    time.sleep(2 * distributed.WATCH_INTERVAL_S)  # the watch would have ended this process
    assert distributed.world_size() == 1


def test_a_rank_whose_engine_core_died_while_it_started_exits(llama):
    """The engine core ended while its rank was still starting (a server stopped or killed
    while its model loads, a failed start): the rank took the parent it found once started,
    init's process, for its own, and waited for rank 0 through the whole distributed timeout
    and torch's retries after it, an orphan for minutes."""
    script = (
        "import os\n"
        "from pagoda.engine import distributed\n"
        "from pagoda.engine.config import EngineConfig\n"
        f"config = EngineConfig({str(llama)!r}, device='cpu', tensor_parallel_size=2,\n"
        "                      distributed_timeout_s=600)\n"
        f"(rank,) = distributed._start_ranks(config, range(1, 2), {free_port()})\n"
        "print(rank.pid, flush=True)\n"
        "os._exit(0)\n"
    )
    spawner = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=True
    )
    rank = psutil.Process(int(spawner.stdout))
    try:
        assert gone(rank, timeout=60)
    finally:
        if rank.is_running():
            rank.kill()


def test_a_dead_rank_fails_the_next_step(llama):
    llm = LLM(
        str(llama), dtype="float32", device="cpu", skip_tokenizer_init=True,
        tensor_parallel_size=2, kv_cache_blocks=64,
    )  # fmt: skip
    try:
        rank1 = llm.engine.leader.processes[0]
        os.kill(rank1.pid, signal.SIGKILL)
        rank1.join(10)
        with pytest.raises(RankDiedError, match="pagoda-tp-rank1 exited"):
            llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY)
    finally:
        llm.close()


def test_catalog_sets_tensor_parallel_size_and_refuses_zero():
    from pagoda.server.catalog import CatalogEntry

    entry = {"id": "a", "kind": "chat", "source": "org/a", "engine": {"tensor_parallel_size": 2}}
    assert CatalogEntry.model_validate(entry).engine_kwargs() == {"tensor_parallel_size": 2}
    entry["engine"]["tensor_parallel_size"] = 0
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        CatalogEntry.model_validate(entry)


def test_sizes_that_do_not_split_are_refused_before_anything_starts(tmp_path):
    folder = tmp_path / "llama"
    build(Draw("llama", "llama", dict(CASES["llama"], num_attention_heads=4), 0, []), folder)
    with pytest.raises(ValueError, match="tensor_parallel_size 3 must divide the 4 attention"):
        LLM(str(folder), device="cpu", skip_tokenizer_init=True, tensor_parallel_size=3)
    with pytest.raises(ValueError, match="does not split evenly over 2 nodes"):
        LLM(str(folder), tensor_parallel_size=3, nnodes=2, master_port=1)


def test_the_ranks_of_each_engine_fork_from_one_forkserver_that_imported_the_engine(llama):
    """Each spawned rank imported torch, transformers and the engine itself: 5-6 s of CPU, most
    of a tensor-parallel engine's start here. The forkserver imports them once; it asks NVML,
    not the CUDA runtime, whether CUDA is there (a runtime initialised as it imports would fail
    every rank forked from it on a GPU)."""
    kwargs = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_blocks=64)
    parents = []
    for _ in range(2):
        with LLM(str(llama), tensor_parallel_size=2, **kwargs) as llm:
            parents.append(psutil.Process(llm.engine.leader.processes[0].pid).parent())
    forkserver = parents[0]
    assert parents[1] == forkserver and forkserver.pid != os.getpid()
    assert "pagoda.engine.llm_engine" in " ".join(forkserver.cmdline())
    assert forkserver.environ()["PYTORCH_NVML_BASED_CUDA_CHECK"] == "1"


def test_an_llm_dropped_without_close_stops_its_ranks(llama):
    """vLLM's users rarely call close(): `del llm` must not leave the rank running, nor the
    process group held (the next tensor-parallel LLM would be refused)."""
    kwargs = dict(dtype="float32", device="cpu", skip_tokenizer_init=True, kv_cache_blocks=64)
    llm = LLM(str(llama), tensor_parallel_size=2, **kwargs)
    rank1 = llm.engine.leader.processes[0]
    del llm
    gc.collect()
    rank1.join(10)
    assert not rank1.is_alive()
    with LLM(str(llama), tensor_parallel_size=2, **kwargs) as llm:
        rank1 = llm.engine.leader.processes[0]
        assert llm.generate({"prompt_token_ids": PROMPTS[0]}, GREEDY)[0].outputs[0].token_ids
    rank1.join(10)
    assert not rank1.is_alive()
