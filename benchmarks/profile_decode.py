"""Where a decode step's milliseconds go: torch.profiler over decode steps of SmolLM2-135M at
batch 1 and 32, for several engine settings loaded side by side (alternated, same run).

Each setting gets `--batch` sequences of `--prompt-len` random tokens, prefilled, then
`--steps` decode steps timed (median ms per step, spread) and one more profiled; the tables
(top ops by self CPU time) and the step times go to stdout and to `--out` (markdown).

    python benchmarks/profile_decode.py --out decode_profile.md
    (settings: bf16 = the bf16 CPU path, bf16-eager = the same without CPU graphs (every
    step through the Python wrappers, as before them), bf16-onednn = the eager path with every
    batch on oneDNN (before pagoda's bf16 kernel), bf16-torch = bf16 through torch ops, the
    path before that; fp32 = the fp32 C++ kernels, fp32-eager without CPU graphs)

A replayed step calls its kernels from C (`kernels/csrc/replay.cpp`), which the profiler does
not see: the tables of `bf16` and `fp32` show what is left around the replay, and a second
table times the replayed step's kernels one by one, in C (ms per kernel, summed over the
layers). `--prefill N` adds a step that prefills N fresh prompts of `--prompt-len` tokens at
once, every C++ kernel call timed the same way (the rest of the step is Python and torch).
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import dataclasses
import functools
import statistics
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, str(Path(__file__).parent))

from offline_throughput import default_model  # noqa: E402

from pagoda import LLM, SamplingParams  # noqa: E402
from pagoda.engine import cpu_graphs  # noqa: E402
from pagoda.kernels import cpu_native, linear_bf16, linear_cpu  # noqa: E402
from pagoda.kernels.backends import Kernels  # noqa: E402

SETTINGS = {
    "bf16": {"dtype": "bfloat16"},
    "bf16-eager": {"dtype": "bfloat16", "enforce_eager": True},
    "bf16-onednn": {"dtype": "bfloat16", "enforce_eager": True},  # and `onednn_only`
    "bf16-torch": {"dtype": "bfloat16", "kernel_backend": "torch"},
    "fp32": {"dtype": "float32"},
    "fp32-eager": {"dtype": "float32", "enforce_eager": True},
    "fp32-torch": {"dtype": "float32", "kernel_backend": "torch"},
}


@contextlib.contextmanager
def labelled_kernels(llm: LLM) -> Iterator[None]:
    """Name each kernel call in the profile: the C++ ones run through ctypes, which the
    profiler does not see otherwise. Only while profiling: a label enters and leaves a torch op
    (about 10 us a call), 4 ms of a 15 ms batch-1 step."""

    def labelled(name: str, fn):
        def call(*args, **kwargs):
            with record_function(f"pagoda::{name}"):
                return fn(*args, **kwargs)

        return call

    saved = []
    for module in llm.engine.runner.model.modules():
        if isinstance(module, linear_cpu.PackedLinear):  # the CPU GEMM, also through ctypes
            saved.append((module, "forward"))
            module.forward = labelled("linear_cpu", module.forward)
        if isinstance(module, linear_bf16.Bf16Linear):  # pagoda's kernel or oneDNN inside
            saved.append((module, "forward"))
            module.forward = labelled("linear_bf16", module.forward)
        ops = getattr(module, "ops", None)
        if isinstance(ops, Kernels):
            saved.append((module, "ops", ops))
            fields = [f.name for f in dataclasses.fields(ops) if f.name != "name"]
            module.ops = dataclasses.replace(
                ops, **{f: labelled(f, getattr(ops, f)) for f in fields}
            )
    try:
        yield
    finally:
        for module, name, *original in saved:
            if original:
                setattr(module, name, original[0])
            else:
                del module.__dict__[name]  # the class's forward again


def replay_split(llm: LLM, batch: int, repeats: int = 10) -> dict[str, float]:
    """ms per replayed `batch` step in each C++ kernel (by function; the median over `repeats`
    replays of its calls' sum), each call timed in C as csrc/replay.cpp runs it (in Python
    where the graph is not packed for it: each call then carries about 1.5 us of ctypes);
    empty where the step is not replayed. The replay rewrites the last step's K/V rows with the
    same values, from the same inputs."""
    graphs = llm.engine.runner.graphs
    graph = getattr(graphs, "graphs", {}).get(batch)
    if graph is None:
        return {}
    seconds = (ctypes.c_double * len(graph.calls))()
    sums: dict[str, list[float]] = collections.defaultdict(list)
    lib = cpu_native.load(cpu_graphs.REPLAY, cpu_graphs.REPLAY_SIGNATURES)
    for _ in range(repeats):
        if graph.packed is not None:
            lib.pagoda_replay_timed(graph.packed, len(graph.packed), seconds)
        else:
            for i, (function, args) in enumerate(graph.calls):
                t0 = time.perf_counter()
                function(*args)
                seconds[i] = time.perf_counter() - t0
        totals: dict[str, float] = collections.Counter()
        for (function, _), t in zip(graph.calls, seconds):
            totals[function.__name__] += t
        for name, t in totals.items():
            sums[name].append(t)
    return {name: statistics.median(ts) * 1e3 for name, ts in sums.items()}


@contextlib.contextmanager
def timed_kernels(totals: dict[str, float]) -> Iterator[None]:
    """Add each C++ kernel call's seconds to `totals` (by function) while it lasts: the eager
    calls, and those of a step recorded as a graph used once, which run after its recording
    (the recorder keeps the timed call)."""
    call = cpu_native.call

    def timed(function, *args) -> None:
        t0 = time.perf_counter()
        function(*args)
        totals[function.__name__] += time.perf_counter() - t0

    cpu_native.call = lambda function, *args: call(functools.partial(timed, function), *args)
    try:
        yield
    finally:
        cpu_native.call = call


def prefill_step(llm: LLM, prompts: int, prompt_len: int, seed: int, totals) -> float:
    """ms of one engine step that prefills `prompts` fresh prompts at once (the step budget
    must hold them), its kernels timed into `totals`."""
    g = torch.Generator().manual_seed(seed)
    params = SamplingParams(temperature=0, max_tokens=1)
    for i in range(prompts):
        ids = torch.randint(100, llm.engine.vocab_size - 100, (prompt_len,), generator=g)
        llm.engine.add_request(f"p{seed}-{i}", ids.tolist(), params)
    with timed_kernels(totals):
        t0 = time.perf_counter()
        llm.engine.step()
        ms = (time.perf_counter() - t0) * 1e3
    stop(llm)
    return ms


def kernel_table(
    splits: dict[str, dict[str, float]], step_ms: dict[str, float] | None = None
) -> list[str]:
    """Markdown: ms per kernel (rows) for each setting (columns), their sum, and the whole
    step's ms where given."""
    names = sorted({k for split in splits.values() for k in split})
    lines = ["| kernel | " + " | ".join(splits) + " |", "|---" * (len(splits) + 1) + "|"]
    for kernel in names:
        cells = [f"{split.get(kernel, 0.0):.2f}" for split in splits.values()]
        lines.append(f"| {kernel} | " + " | ".join(cells) + " |")
    sums = [f"{sum(split.values()):.2f}" for split in splits.values()]
    lines.append("| all kernels | " + " | ".join(sums) + " |")
    if step_ms:
        lines.append("| whole step | " + " | ".join(f"{step_ms[n]:.2f}" for n in splits) + " |")
    return lines + [""]


def onednn_only(llm: LLM) -> None:
    """Send every batch of the bf16 linears to oneDNN, as before pagoda's bf16 kernel (an
    MLP's gate_up unfused again, its activation a pass of its own)."""
    for module in llm.engine.runner.model.modules():
        fused = getattr(module, "gate_up_proj", None)
        if isinstance(fused, linear_bf16.Bf16GateUpSiluMul):
            module.gate_up_proj = linear_bf16.Bf16Linear(fused.weight())
    for module in llm.engine.runner.model.modules():
        if isinstance(module, linear_bf16.Bf16Linear):
            if module.packed is None:  # AMX: the kernel's weights only
                weight = linear_bf16.unpack_panels(
                    module.panels, module.out_features, module.in_features
                )
                module.packed = torch.ops.mkldnn._reorder_linear_weight(weight)
            module.kernel_rows = 0


def start(llm: LLM, batch: int, prompt_len: int, seed: int) -> None:
    """Add `batch` requests and run until every one is past its prefill."""
    g = torch.Generator().manual_seed(seed)
    vocab = llm.engine.vocab_size
    params = SamplingParams(temperature=0, max_tokens=10_000, ignore_eos=True)
    for i in range(batch):
        ids = torch.randint(100, vocab - 100, (prompt_len,), generator=g).tolist()
        llm.engine.add_request(f"r{seed}-{i}", ids, params)
    while any(s.num_computed_tokens < s.num_prompt_tokens for s in _seqs(llm)):
        llm.engine.step()


def _seqs(llm: LLM):
    return [s for seqs in llm.engine._requests.values() for s in seqs]


def stop(llm: LLM) -> None:
    for request_id in list(llm.engine._requests):
        llm.engine.abort_request(request_id)
    while llm.engine.has_unfinished_requests():
        llm.engine.step()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--settings", nargs="+", default=list(SETTINGS), choices=list(SETTINGS))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 32])
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="alternated rounds of --steps each")
    p.add_argument("--rows", type=int, default=15, help="profile table rows")
    p.add_argument("--prefill", type=int, default=0, help="prompts in a timed prefill step")
    p.add_argument("--out", type=Path, default=None)
    args = p.parse_args()
    model = default_model()
    if args.out:
        args.out.write_text("")
    llms = {name: LLM(model, max_model_len=2048, **SETTINGS[name]) for name in args.settings}
    if "bf16-onednn" in llms:
        onednn_only(llms["bf16-onednn"])
    bf16_linears = (
        linear_bf16.describe()
        if linear_bf16.available()
        else "no bf16 arithmetic: bf16 weights widened to fp32 in pagoda's CPU linear kernel"
    )
    lines = [
        f"# Decode-step profile, SmolLM2-135M (`{Path(model).name}`)",
        "",
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, prompts of "
        f"{args.prompt_len} random tokens; settings alternated in one run ({args.rounds} rounds"
        f" x {args.steps} steps each). bf16 = the bf16 CPU path ({bf16_linears}, "
        "bf16 KV cache, fp32 elsewhere, decode steps replayed from CPU graphs); bf16-eager = the "
        "same run eagerly (before CPU graphs); bf16-onednn = eager with oneDNN at every batch "
        "size; bf16-torch = bf16 through torch ops (before it); fp32 = the fp32 C++ kernels, "
        "fp32-eager the same run eagerly, fp32-torch through torch ops (a CPU without the C++ "
        "kernels). The profiler does not see replayed kernels (called from C, "
        "csrc/replay.cpp): the `bf16` and `fp32` tables show what is left around them, and "
        "the replayed kernels are timed one by one in C.",
        "",
    ]
    emit(lines, args.out)
    for batch in args.batches:
        lines = []
        times: dict[str, list[float]] = {name: [] for name in llms}
        for llm in llms.values():
            start(llm, batch, args.prompt_len, seed=batch)
        for _ in range(args.rounds):
            for name, llm in llms.items():
                for _ in range(args.steps):
                    t0 = time.perf_counter()
                    llm.engine.step()
                    times[name].append((time.perf_counter() - t0) * 1e3)
        lines += [f"## batch {batch}", "", "| setting | ms per step (median, min-max) |"]
        lines += ["|---|---|"]
        for name, ms in times.items():
            lines.append(f"| {name} | {statistics.median(ms):.1f} ({min(ms):.1f}-{max(ms):.1f}) |")
        lines.append("")
        splits = {name: replay_split(llm, batch) for name, llm in llms.items()}
        splits = {name: split for name, split in splits.items() if split}
        if splits:
            lines += [f"### replayed batch-{batch} step, kernels timed one by one (ms)", ""]
            lines += kernel_table(splits)
        for name, llm in llms.items():
            with labelled_kernels(llm), profile(activities=[ProfilerActivity.CPU]) as prof:
                for _ in range(3):
                    llm.engine.step()
            table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
            lines += [f"### {name}, batch {batch}: 3 decode steps", "", "```", table, "```", ""]
            stop(llm)
        emit(lines, args.out)
    if args.prefill:
        emit(prefill_section(llms, args), args.out)


def prefill_section(llms: dict[str, LLM], args: argparse.Namespace) -> list[str]:
    """Prefill steps of `args.prefill` prompts, settings alternated: the step's median and each
    kernel's median share of it."""
    steps: dict[str, list[float]] = {name: [] for name in llms}
    kernels: dict[str, list[dict[str, float]]] = {name: [] for name in llms}
    for round_ in range(args.rounds * args.steps + 2):
        for name, llm in llms.items():
            totals: dict[str, float] = collections.Counter()
            ms = prefill_step(llm, args.prefill, args.prompt_len, 1000 + round_, totals)
            if round_ >= 2:  # the first two warm up
                steps[name].append(ms)
                kernels[name].append({k: t * 1e3 for k, t in totals.items()})
    splits = {
        name: {k: statistics.median(run.get(k, 0.0) for run in runs) for k in set().union(*runs)}
        for name, runs in kernels.items()
    }
    step_ms = {name: statistics.median(ms) for name, ms in steps.items()}
    title = f"## prefill step: {args.prefill} prompts of {args.prompt_len} tokens at once"
    lines = [title, "", f"Medians of {len(steps[next(iter(steps))])} steps per setting (ms)."]
    return lines + [""] + kernel_table(splits, step_ms)


def emit(lines: list[str], out: Path | None) -> None:
    """Print a section, and append it to `out`: a run cut short keeps what it measured."""
    text = "\n".join(lines) + "\n"
    print(text, flush=True)
    if out:
        with out.open("a") as f:
            f.write(text)


if __name__ == "__main__":
    main()
