"""Linear layers at SmolLM2-135M's shapes: fp32 (`F.linear`, pagoda's GEMM) against bf16
(`F.linear`, oneDNN packed weights), at 1, 32 and 256 rows; the choice behind `linear_bf16.py`.

Each shape set is all 120 layer matmuls of the model (30 x qkv, o, gate_up, down) plus the
lm_head, with distinct weights per layer so they stream from memory as in a real step. The
variants run alternated, `--repeats` times each; the table gives the median ms per pass and
the GFLOP/s it implies (min-max spread in brackets).

    python benchmarks/linear_bf16.py [--rows 1 32 256] [--repeats 7] [--json out.json]

`--jit N` measures instead what row counts that rarely repeat cost oneDNN (it compiles a
kernel per shape): one layer of each shape over N random row counts, with the rows as they
come and rounded up as `OneDNNLinear` runs them.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F

from pagoda.kernels import linear_bf16, linear_cpu

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
KV = 3 * 64  # 3 KV heads of 64
SHAPES = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN)]
SHAPES += [(HIDDEN, INTERMEDIATE)]


def weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in SHAPES]
    return [*layers, torch.randn(VOCAB, HIDDEN) * 0.02]


Inputs = dict[int, torch.Tensor]  # input width -> rows of that width


def variants(ws: list[torch.Tensor]) -> dict[str, Callable[[Inputs], object]]:
    bf16 = [w.bfloat16() for w in ws]
    found: dict[str, Callable[[Inputs], object]] = {
        "fp32 F.linear": lambda x: [F.linear(x[w.shape[1]], w) for w in ws],
        "bf16 F.linear (fp32 in/out)": lambda x: [
            F.linear(x[w.shape[1]].bfloat16(), w).float() for w in bf16
        ],
    }
    if linear_cpu._library() is not None:
        packed = [linear_cpu.PackedLinear(w) for w in ws]
        found["fp32 pagoda GEMM"] = lambda x: [p(x[p.in_features]) for p in packed]
    if linear_bf16.available():
        onednn = [linear_bf16.OneDNNLinear(w) for w in ws]
        found["bf16 oneDNN packed (fp32 in/out)"] = lambda x: [p(x[p.in_features]) for p in onednn]
        found["bf16 oneDNN packed (bf16 in/out)"] = lambda x: [
            p(x[p.in_features].bfloat16()) for p in onednn
        ]
    return found


def flops(rows: int, ws: list[torch.Tensor]) -> float:
    return 2.0 * rows * sum(w.numel() for w in ws)


def compile_cost(ws: list[torch.Tensor], counts: int) -> dict[str, list[float]]:
    """ms per call of one layer of each shape over a stream of `counts` random row counts
    (33-1032, as prefill chunks and embedding batches come), with the rows as they come and
    rounded up as `OneDNNLinear` runs them; each variant gets its own counts."""
    layers = [linear_bf16.OneDNNLinear(w) for w in ws[: len(SHAPES)]]

    def exact(layer: linear_bf16.OneDNNLinear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, None, "none", [], "")

    def padded(layer: linear_bf16.OneDNNLinear, x: torch.Tensor) -> torch.Tensor:
        return layer(x)

    gen = torch.Generator().manual_seed(0)
    stream = (torch.randint(33, 1033, (2 * counts,), generator=gen)).tolist()
    raw: dict[str, list[float]] = {}
    for i, (name, fn) in enumerate([("rows as they come", exact), ("rows padded", padded)]):
        ms = []
        for rows in stream[i::2]:
            for layer in layers:
                x = torch.randn(rows, layer.in_features).bfloat16()
                start = time.perf_counter()
                fn(layer, x)
                ms.append((time.perf_counter() - start) * 1e3)
        raw[name] = ms
        half = ms[len(ms) // 2 :]
        print(
            f"| {name} | {statistics.mean(ms):.2f} | {statistics.median(ms):.2f} "
            f"| {statistics.mean(half):.2f} |"
        )
    return raw


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the raw timings here")
    parser.add_argument("--jit", type=int, metavar="N", help="compile cost at N new row counts")
    args = parser.parse_args()
    ws = weights()
    if args.jit:
        print("| variant | ms per call, mean | median | mean of the second half |")
        print("|---|---|---|---|")
        with torch.inference_mode():
            raw_jit = compile_cost(ws, args.jit)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "jit_ms": raw_jit}, f)
        return
    found = variants(ws)
    raw: dict[str, dict[str, list[float]]] = {}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}"
    )
    print("| rows | variant | ms per pass (median, min-max) | GFLOP/s |")
    print("|---|---|---|---|")
    with torch.inference_mode():
        for rows in args.rows:
            x = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
            times: dict[str, list[float]] = {name: [] for name in found}
            for fn in found.values():  # warm-up (oneDNN builds its kernels on first use)
                fn(x)
            for _ in range(args.repeats):
                for name, fn in found.items():
                    start = time.perf_counter()
                    fn(x)
                    times[name].append((time.perf_counter() - start) * 1e3)
            for name, ms in times.items():
                med = statistics.median(ms)
                gflops = flops(rows, ws) / med / 1e6
                print(
                    f"| {rows} | {name} | {med:.1f} ({min(ms):.1f}-{max(ms):.1f}) | {gflops:.0f} |"
                )
            raw[str(rows)] = times
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {"torch": torch.__version__, "threads": torch.get_num_threads(), "ms": raw}, f
            )


if __name__ == "__main__":
    main()
