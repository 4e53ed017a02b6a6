"""Linear layers at SmolLM2-135M's shapes: fp32 (`F.linear`, pagoda's GEMM) against bf16
(`F.linear`, oneDNN packed weights, pagoda's kernel on AMX and with AVX512-BF16), at 1, 32 and
256 rows; the choices behind `linear_bf16.py`.

Each shape set is all 120 layer matmuls of the model (30 x qkv, o, gate_up, down) plus the
lm_head, with distinct weights per layer so they stream from memory as in a real step. The
variants run alternated, `--repeats` times each; the first table gives the median ms per pass
and the GFLOP/s it implies (min-max spread in brackets), the second each shape's part of the
pass for the bf16 variants, as the GB/s at which they read the bf16 weights (the bound at a
few rows: compare the machine's copy bandwidth).

    python benchmarks/linear_bf16.py [--rows 1 32 256] [--repeats 7] [--json out.json]

`--jit N` measures instead what row counts that rarely repeat cost oneDNN (it compiles a
kernel per shape): one layer of each shape over N random row counts, with the rows as they
come and rounded up as `Bf16Linear` gives them to oneDNN.

`--tile-peak` measures instead the AMX tiles' own bf16 peak, what the kernel's TFLOP/s are
judged against: `tile_peak.cpp` runs nothing but tile products, on one thread and on all, with
random normal values and with zeros (the tiles' speed can depend on the data: arbitrary bit
patterns, denormals and NaNs among them, ran a tenth to a quarter slower in a scratch loop).
"""

from __future__ import annotations

import argparse
import ctypes
import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn.functional as F

from pagoda.kernels import cpu_native, linear_bf16, linear_cpu

HIDDEN, INTERMEDIATE, LAYERS, VOCAB = 576, 1536, 30, 49152
KV = 3 * 64  # 3 KV heads of 64
SHAPES = [(HIDDEN + 2 * KV, HIDDEN), (HIDDEN, HIDDEN), (2 * INTERMEDIATE, HIDDEN)]
SHAPES += [(HIDDEN, INTERMEDIATE)]
NAMES = ["qkv", "o", "gate_up", "down", "lm_head"]


def weights() -> list[torch.Tensor]:
    torch.manual_seed(0)
    layers = [torch.randn(n, k) * 0.02 for _ in range(LAYERS) for n, k in SHAPES]
    return [*layers, torch.randn(VOCAB, HIDDEN) * 0.02]


Inputs = dict[int, torch.Tensor]  # input width -> rows of that width
Layer = Callable[[Inputs], object]  # one weight's matmul


def variants(ws: list[torch.Tensor]) -> dict[str, list[Layer]]:
    """Per variant, one call per weight of `ws`."""
    bf16 = [w.bfloat16() for w in ws]
    found: dict[str, list[Layer]] = {
        "fp32 F.linear": [lambda x, w=w: F.linear(x[w.shape[1]], w) for w in ws],
        "bf16 F.linear (fp32 in/out)": [
            lambda x, w=w: F.linear(x[w.shape[1]].bfloat16(), w).float() for w in bf16
        ],
    }
    if linear_cpu._library() is not None:
        packed = [linear_cpu.PackedLinear(w) for w in ws]
        found["fp32 pagoda GEMM"] = [lambda x, p=p: p(x[p.in_features]) for p in packed]
    if linear_bf16.available():
        onednn = [(torch.ops.mkldnn._reorder_linear_weight(w), w.shape[1]) for w in bf16]
        found["bf16 oneDNN packed (fp32 in/out)"] = [
            lambda x, p=p, k=k: onednn_call(p, x[k]) for p, k in onednn
        ]
        found["bf16 oneDNN packed (bf16 in/out)"] = [
            lambda x, p=p, k=k: onednn_call(p, x[k].bfloat16()) for p, k in onednn
        ]
    if linear_bf16.kernel_library() is not None:
        panels = [(linear_bf16.pack_panels(w), w.shape) for w in ws]
        units = [True, False] if linear_bf16.kernel_amx() else [False]
        for amx in units:
            name = f"bf16 pagoda kernel, {'AMX' if amx else 'AVX512-BF16'} (fp32 in/out)"
            found[name] = [
                lambda x, p=p, n=n, k=k, amx=amx: linear_bf16.panel_linear(x[k], p, None, n, amx)
                for p, (n, k) in panels
            ]
    return found


def onednn_call(packed: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """oneDNN's matmul as `Bf16Linear` calls it, in x's dtype."""
    y = torch.ops.mkldnn._linear_pointwise(x.to(torch.bfloat16), packed, None, "none", [], "")
    return y.to(x.dtype)


def groups(ws: list[torch.Tensor]) -> dict[str, list[int]]:
    """The weights of each shape (indices into `ws`: the layers' four, then the lm_head)."""
    layers = len(ws) - 1
    found = {name: list(range(s, layers, len(SHAPES))) for s, name in enumerate(NAMES[:-1])}
    return found | {"lm_head": [layers]}


def flops(rows: int, ws: list[torch.Tensor]) -> float:
    return 2.0 * rows * sum(w.numel() for w in ws)


def copy_bandwidth(nbytes: int, repeats: int) -> float:
    """GB/s read by torch's copy of an `nbytes` buffer (it writes as many)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return nbytes / statistics.median(times[1:]) / 1e9


def timed(layers: list[Layer], x: Inputs) -> float:
    start = time.perf_counter()
    for layer in layers:
        layer(x)
    return (time.perf_counter() - start) * 1e3


def compile_cost(ws: list[torch.Tensor], counts: int) -> dict[str, list[float]]:
    """ms per call of one layer of each shape over a stream of `counts` random row counts
    (33-1032, as prefill chunks and embedding batches come), with the rows as they come and
    rounded up as `Bf16Linear` gives them to oneDNN; each variant gets its own counts."""
    layers = [linear_bf16.Bf16Linear(w, amx=False) for w in ws[: len(SHAPES)]]

    def exact(layer: linear_bf16.Bf16Linear, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, layer.packed, None, "none", [], "")

    def padded(layer: linear_bf16.Bf16Linear, x: torch.Tensor) -> torch.Tensor:
        return layer._onednn(x)

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


def tile_peak(iterations: int, repeats: int) -> dict[str, list[float]]:
    """TFLOP/s of the tiles alone (`tile_peak.cpp`) per run, by data and thread count; the
    process holds the tile state already (`linear_bf16.kernel_amx`)."""
    source = Path(__file__).with_name("tile_peak.cpp")
    flags = cpu_native.FLAGS["AVX512"]
    peak = ctypes.CDLL(str(cpu_native.compile_source(cpu_native.compiler(), source, flags)))
    peak = peak.pagoda_tile_peak
    peak.restype, peak.argtypes = ctypes.c_double, [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int]
    data = {
        "random": torch.randn(2048).bfloat16(),
        "zeros": torch.zeros(2048, dtype=torch.bfloat16),
    }
    flops = iterations * 4 * 2 * 16 * 16 * 32  # four 16 x 16 x 32 tile products a round
    out: dict[str, list[float]] = {}
    for _ in range(repeats):  # alternated, as the machine's speed drifts
        for name, values in data.items():
            for threads in sorted({1, torch.get_num_threads()}):
                seconds = peak(values.data_ptr(), iterations // threads, threads)
                out.setdefault(f"{name}, {threads} thread(s)", []).append(flops / seconds / 1e12)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, nargs="+", default=[1, 32, 256])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--json", help="write the raw timings here")
    parser.add_argument("--jit", type=int, metavar="N", help="compile cost at N new row counts")
    parser.add_argument("--tile-peak", action="store_true", help="the AMX tiles' own peak")
    args = parser.parse_args()
    if args.tile_peak:
        if not linear_bf16.kernel_amx():
            raise SystemExit("this CPU has no AMX tiles (or Linux does not grant them)")
        runs = tile_peak(20_000_000, args.repeats)
        print("| data, threads | TFLOP/s (median, min-max) |")
        print("|---|---|")
        for name, tf in runs.items():
            print(f"| {name} | {statistics.median(tf):.2f} ({min(tf):.2f}-{max(tf):.2f}) |")
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"torch": torch.__version__, "tile_peak_tflops": runs}, f)
        return
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
    parts = groups(ws)
    raw: dict[str, dict[str, list[float]]] = {}
    per_shape: dict[str, dict[str, dict[str, list[float]]]] = {}
    print(
        f"torch {torch.__version__}, {torch.get_num_threads()} threads, CPU capability "
        f"{torch.backends.cpu.get_cpu_capability()}; copying the bf16 weights' bytes reads "
        f"{copy_bandwidth(sum(w.numel() * 2 for w in ws), args.repeats):.1f} GB/s"
    )
    with torch.inference_mode():
        for rows in args.rows:
            x = {k: torch.randn(rows, k) for k in (HIDDEN, INTERMEDIATE)}
            times: dict[str, list[float]] = {name: [] for name in found}
            shapes = {name: {g: [] for g in parts} for name in found if name.startswith("bf16")}
            for layers in found.values():  # warm-up (oneDNN builds its kernels on first use)
                timed(layers, x)
            for _ in range(args.repeats):
                for name, layers in found.items():
                    times[name].append(timed(layers, x))
                for name in shapes:
                    for group, indices in parts.items():
                        layers = [found[name][i] for i in indices]
                        shapes[name][group].append(timed(layers, x))
            print(f"\n{rows} rows\n")
            print("| variant | ms per pass (median, min-max) | GFLOP/s |")
            print("|---|---|---|")
            for name, ms in times.items():
                med = statistics.median(ms)
                gflops = flops(rows, ws) / med / 1e6
                print(f"| {name} | {med:.1f} ({min(ms):.1f}-{max(ms):.1f}) | {gflops:.0f} |")
            print("\n| variant | " + " | ".join(f"{g} GB/s" for g in parts) + " |")
            print("|---|" + "---|" * len(parts))
            for name, by_group in shapes.items():
                cells = []
                for group, ms in by_group.items():
                    gb = sum(ws[i].numel() * 2 for i in parts[group]) / 1e9
                    cells.append(f"{gb / (statistics.median(ms) / 1e3):.1f}")
                print(f"| {name} | " + " | ".join(cells) + " |")
            raw[str(rows)] = times
            per_shape[str(rows)] = shapes
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "torch": torch.__version__,
                    "threads": torch.get_num_threads(),
                    "ms": raw,
                    "ms_per_shape": per_shape,
                },
                f,
            )


if __name__ == "__main__":
    main()
