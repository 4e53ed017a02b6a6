"""Images: pagoda's /v1/images/generations over HTTP against the same diffusers pipeline called
in-process, in one run.

- In-process baseline: the pipeline in this process makes --num-images images one by one (one
  pipeline call and one PNG encoding per image), as a script calling diffusers would. It runs
  before and after the server part; both passes are reported and pooled.
- Server: `pagoda serve --catalog <generated catalog>` with the same pipeline, driven over HTTP
  (b64_json PNG, one image per request, distinct seeds) at each --concurrency.

Reports images/s and latency (median, p90) of each, and the two ratios of issue 12: server
overhead at concurrency 1 (server median latency / in-process median latency - 1; target at
most 5%) and the batching gain at concurrency 4 (server images/s / in-process one-by-one
images/s; target at least 1.3x on the tiny pipeline on CPU).

    python benchmarks/images.py --tiny --num-images 16 --result-json /tmp/images.json
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
        buffer = io.BytesIO()
        image.save(buffer, format="PNG")
        return buffer.getvalue()

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


def start_server(catalog: Path, folder: Path) -> tuple[subprocess.Popen, str, Path]:
    port = free_port()
    log = folder / "server.log"
    process = subprocess.Popen(
        [sys.executable, "-m", "pagoda", "serve", "--catalog", str(catalog), "--port", str(port)]
        + ["--image-dir", str(folder / "files")],
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
        dtype = getattr(torch, args.dtype)
        pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        results: dict = {"in_process": [in_process(pipe, args, seed0=0)], "server": {}}
        process, url, log = start_server(write_catalog(folder, model, args), folder)
        try:
            for concurrency in args.concurrency:
                run = asyncio.run(over_http(url, args, concurrency, seed0=1000 * concurrency))
                results["server"][str(concurrency)] = run
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            server_log = log.read_text()
        results["in_process"].append(in_process(pipe, args, seed0=500))
    report(args, results, model, server_log)
    return 0


def report(args: argparse.Namespace, results: dict, model: str, server_log: str) -> None:
    passes = results["in_process"]
    pooled = summary(
        [t for run in passes for t in run["latencies_s"]], sum(run["wall_s"] for run in passes)
    )
    rows = [("in-process, one by one (pooled)", pooled)]
    rows += [(f"server, concurrency {c}", run) for c, run in results["server"].items()]
    print(f"{args.size}, {args.steps} steps, {args.device} {args.dtype}, {args.num_images} images")
    print(f"{'':36} {'images/s':>9} {'median s':>9} {'p90 s':>9}")
    for label, run in rows:
        print(
            f"{label:36} {run['images_per_s']:9.3f} {run['latency_median_s']:9.3f} "
            f"{run['latency_p90_s']:9.3f}"
        )
    ratios = {}
    if "1" in results["server"]:
        one = results["server"]["1"]
        ratios["overhead_c1"] = one["latency_median_s"] / pooled["latency_median_s"] - 1
        print(f"server overhead at concurrency 1: {100 * ratios['overhead_c1']:+.1f}% (median)")
    if "4" in results["server"]:
        ratios["batching_c4"] = results["server"]["4"]["images_per_s"] / pooled["images_per_s"]
        print(f"server at concurrency 4 / in-process one by one: {ratios['batching_c4']:.2f}x")
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
                    "pooled_in_process": pooled,
                    **results,
                    "server_log": server_log.splitlines()[-40:],
                },
                indent=1,
            )
        )


if __name__ == "__main__":
    sys.exit(main())
