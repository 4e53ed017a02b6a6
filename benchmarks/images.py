"""Images: pagoda's /v1/images/generations over HTTP against the same diffusers pipeline called
in-process, in one run.

- In-process baseline: the pipeline in this process makes --num-images images one by one (one
  pipeline call and one PNG encoding per image, with the server's PNG settings:
  `encode_image`), as a script calling diffusers would, with the
  memory setting pagoda's workers use (`keep_freed_memory`: glibc keeps freed blocks), so
  that the two sides differ by the server alone.
- Server: `pagoda serve --catalog <generated catalog>` with the same pipeline, driven over HTTP
  (b64_json PNG, one image per request, distinct seeds) at each --concurrency.
- HTTP floor: the same client's round trip on a request the server answers without its worker
  (a 400 for n=0), one at a time: what any request costs before an image is made.

Both sides run on --cpu-threads threads (default: torch's default here), so that the server's
thread governor cannot give its worker fewer threads than the baseline has. The parts alternate
for --rounds rounds (in-process, then the server at each concurrency); each ratio is taken
within its round and the median over rounds is reported. Reports images/s and latency (median,
p90, pooled over rounds) of each, and the two ratios of issue 12: server overhead at concurrency
1 (server median latency / in-process median latency - 1, target at most 5%; also in ms, beside
the floor) and the batching gain at concurrency 4 (server images/s / in-process one-by-one
images/s; target at least 1.3x on the tiny pipeline on CPU).

    python benchmarks/images.py --tiny --num-images 16 --result-json /tmp/images.json
    python benchmarks/images.py --tiny --size 256x256 --num-images 16  # a larger image
    python benchmarks/images.py --model black-forest-labs/FLUX.1-schnell --device cuda \\
        --dtype bfloat16 --size 1024x1024 --steps 4 --guidance 0 --max-sequence-length 256 \\
        --num-images 32

--tiny builds the tests' tiny random FLUX pipeline (run from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import io
import json
import os
import platform
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch
from diffusers import FluxPipeline
from PIL import Image

from pagoda.engine.image_worker import encode_image
from pagoda.engine.worker import keep_freed_memory

PROMPTS = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a city at night"]
READY_TIMEOUT_S = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--model", help="a diffusers FLUX folder or hub id")
    source.add_argument("--tiny", action="store_true", help="the tests' tiny random FLUX")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    p.add_argument("--size", default="64x64", help="WIDTHxHEIGHT")
    p.add_argument("--steps", type=int, default=2)
    p.add_argument("--guidance", type=float, default=3.5)
    p.add_argument("--max-sequence-length", type=int, default=64, help="FLUX's T5 tokens")
    p.add_argument("--num-images", type=int, default=16, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--cpu-threads", type=int, default=torch.get_num_threads())
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    p.add_argument("--max-batch-size", type=int, default=4, help="the server's images per call")
    p.add_argument("--result-json", type=Path)
    return p.parse_args(argv)


def summary(latencies: list[float], wall: float) -> dict:
    return {
        "images": len(latencies),
        "wall_s": wall,
        "images_per_s": len(latencies) / wall,
        "latency_median_s": float(np.median(latencies)),
        "latency_p90_s": float(np.percentile(latencies, 90)),
        "latencies_s": latencies,
    }


# -- in-process baseline --------------------------------------------------------------------


def in_process(pipe: FluxPipeline, args: argparse.Namespace, seed0: int) -> dict:
    width, height = map(int, args.size.split("x"))
    device = pipe._execution_device

    def one(index: int) -> bytes:
        image = pipe(
            PROMPTS[index % len(PROMPTS)],
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator(device).manual_seed(seed0 + index),
        ).images[0]
        return encode_image(image, "png", 100)

    one(-1)  # warm-up
    latencies = []
    start = time.perf_counter()
    for index in range(args.num_images):
        t0 = time.perf_counter()
        one(index)
        latencies.append(time.perf_counter() - t0)
    return summary(latencies, time.perf_counter() - start)


# -- server ---------------------------------------------------------------------------------


def write_catalog(folder: Path, model: str, args: argparse.Namespace) -> Path:
    path = folder / "models.yaml"
    path.write_text(
        f"""models:
  - id: bench-image
    kind: image
    source: {model}
    engine:
      dtype: {args.dtype}
      device: {args.device}
    image:
      default_size: {args.size}
      max_size: {args.size}
      default_steps: {args.steps}
      max_steps: {args.steps}
      default_guidance: {args.guidance}
      max_sequence_length: {args.max_sequence_length}
      max_batch_size: {args.max_batch_size}
      max_queue: {max(64, 2 * max(args.concurrency))}
"""
    )
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(catalog: Path, folder: Path, threads: int) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = folder / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--catalog", str(catalog), "--port", str(port)]
        + ["--image-dir", str(folder / "files"), "--cpu-threads", str(threads)],
        stdout=log.open("w"),
        stderr=subprocess.STDOUT,
        env={**os.environ, "HF_HUB_OFFLINE": os.environ.get("HF_HUB_OFFLINE", "1")},
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + READY_TIMEOUT_S
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"pagoda serve exited:\n{log.read_text()}")
        try:
            if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                return process, url, log
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    process.kill()
    raise TimeoutError(f"pagoda serve did not come up:\n{log.read_text()}")


async def over_http(url: str, args: argparse.Namespace, concurrency: int, seed0: int) -> dict:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(client: httpx.AsyncClient, index: int) -> None:
        body = {
            "model": "bench-image",
            "prompt": PROMPTS[index % len(PROMPTS)],
            "response_format": "b64_json",
            "seed": seed0 + index,
        }
        async with slots:
            t0 = time.perf_counter()
            response = await client.post("/v1/images/generations", json=body)
            response.raise_for_status()
            data = base64.b64decode(response.json()["data"][0]["b64_json"])
            latencies.append(time.perf_counter() - t0)
        Image.open(io.BytesIO(data)).verify()

    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        await one(client, -1)  # warm-up
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(client, i) for i in range(args.num_images)))
        return summary(latencies, time.perf_counter() - start)


async def http_floor(url: str, count: int) -> float:
    """Median seconds of a round trip the server refuses at validation (no worker involved)."""
    body = {"model": "bench-image", "prompt": PROMPTS[0], "n": 0}
    latencies = []
    async with httpx.AsyncClient(base_url=url, timeout=None) as client:
        for _ in range(count + 1):  # the first one warms up
            t0 = time.perf_counter()
            response = await client.post("/v1/images/generations", json=body)
            latencies.append(time.perf_counter() - t0)
            assert response.status_code == 400, response.text
    return float(np.median(latencies[1:]))


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-images-") as tmp:
        folder = Path(tmp)
        model = args.model
        if args.tiny:
            sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
            from tests.tiny_flux import build_tiny_flux

            model = str(build_tiny_flux(folder / "tiny-flux"))
        torch.set_num_threads(args.cpu_threads)
        keep_freed_memory()
        dtype = getattr(torch, args.dtype)
        pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        results: dict = {"in_process": [], "server": {str(c): [] for c in args.concurrency}}
        catalog = write_catalog(folder, model, args)
        process, url, log = start_server(catalog, folder, args.cpu_threads)
        try:
            results["http_floor_s"] = asyncio.run(http_floor(url, args.num_images))
            for r in range(args.rounds):
                results["in_process"].append(in_process(pipe, args, seed0=100_000 * r))
                for concurrency in args.concurrency:
                    seed0 = 100_000 * r + 1000 * concurrency
                    run = asyncio.run(over_http(url, args, concurrency, seed0))
                    results["server"][str(concurrency)].append(run)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            server_log = log.read_text()
    report(args, results, model, server_log)
    return 0


def pool(runs: list[dict]) -> dict:
    return summary([t for run in runs for t in run["latencies_s"]], sum(r["wall_s"] for r in runs))


def report(args: argparse.Namespace, results: dict, model: str, server_log: str) -> None:
    passes = results["in_process"]
    rows = [("in-process, one by one", pool(passes))]
    rows += [(f"server, concurrency {c}", pool(runs)) for c, runs in results["server"].items()]
    print(
        f"{args.size}, {args.steps} steps, {args.device} {args.dtype}, {args.cpu_threads} "
        f"threads, {args.num_images} images per part, {args.rounds} rounds (pooled)"
    )
    print(f"{'':36} {'images/s':>9} {'median s':>9} {'p90 s':>9}")
    for label, run in rows:
        print(
            f"{label:36} {run['images_per_s']:9.3f} {run['latency_median_s']:9.4f} "
            f"{run['latency_p90_s']:9.4f}"
        )
    floor_ms = 1000 * results["http_floor_s"]
    print(f"HTTP floor (a request refused at validation, same client): {floor_ms:.2f} ms")
    ratios: dict = {}
    if "1" in results["server"]:
        pairs = list(zip(results["server"]["1"], passes))
        over = [s["latency_median_s"] / p["latency_median_s"] - 1 for s, p in pairs]
        over_ms = [1000 * (s["latency_median_s"] - p["latency_median_s"]) for s, p in pairs]
        ratios |= {"overhead_c1": float(np.median(over)), "overhead_c1_rounds": over}
        ratios |= {"overhead_c1_ms": float(np.median(over_ms)), "overhead_c1_ms_rounds": over_ms}
        print(
            f"server overhead at concurrency 1: {100 * ratios['overhead_c1']:+.1f}% = "
            f"{ratios['overhead_c1_ms']:+.2f} ms per image (median of rounds' median latencies; "
            f"rounds: {', '.join(f'{100 * o:+.1f}%' for o in over)})"
        )
    if "4" in results["server"]:
        pairs = list(zip(results["server"]["4"], passes))
        gain = [s["images_per_s"] / p["images_per_s"] for s, p in pairs]
        ratios |= {"batching_c4": float(np.median(gain)), "batching_c4_rounds": gain}
        print(
            f"server at concurrency 4 / in-process one by one: {ratios['batching_c4']:.2f}x "
            f"(median of rounds: {', '.join(f'{g:.2f}x' for g in gain)})"
        )
    if args.result_json:
        args.result_json.write_text(
            json.dumps(
                {
                    "config": {**vars(args), "result_json": str(args.result_json), "model": model},
                    "machine": {
                        "platform": platform.platform(),
                        "cpus": os.cpu_count(),
                        "torch": torch.__version__,
                        "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
                    },
                    "ratios": ratios,
                    **results,
                    "server_log": server_log.splitlines()[-40:],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
