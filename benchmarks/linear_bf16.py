"""Linear layers at SmolLM2-135M's shapes: fp32 (`F.linear`, pagoda's GEMM) against bf16
(`F.linear`, oneDNN packed weights), at 1, 32 and 256 rows; the choice behind `linear_bf16.py`.

Each shape set is all 120 layer matmuls of the model (30 x qkv, o, gate_up, down) plus the
lm_head, with distinct weights per layer so they stream from memory as in a real step. The
variants run alternated, `--repeats` times each; the table gives the median ms per pass and
the GFLOP/s it implies (min-max spread in brackets).

    python benchmarks/linear_bf16.py [--rows 1 32 256] [--repeats 7] [--json out.json]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the raw timings here")
    args = parser.parse_args()
    ws = weights()
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
