"""Images: pagoda's /v1/images/generations over HTTP against the same diffusers pipeline called
in-process, in one run.

- In-process baseline: the pipeline in this process makes images one by one (one pipeline
  call and one PNG encoding per image, with the server's PNG settings: `encode_image`), as a
  script calling diffusers would, with what pagoda's workers do around the call: glibc keeps
  freed blocks (`keep_freed_memory`) and the call runs under `torch.inference_mode()` (diffusers
  runs it under `no_grad`), so that the two sides differ by the server alone.
- Server: `pagoda serve --catalog <generated catalog>` with the same pipeline, driven over HTTP
  (b64_json PNG, one image per request, distinct seeds) by aiohttp, as benchmarks/embeddings.py
  drives its servers: the client shares the cores with the server, and of aiohttp, httpx and
  the OpenAI SDK it spends the least CPU per request (a refused request's round trip: 0.85 ms
  against httpx's 1.6 here). Its latency includes reading the JSON and decoding the base64
  (pybase64, as the server encodes it).
- The pipeline call alone, on both sides: in-process timed around the call; in the server its
  worker's `pagoda:image_pipeline_seconds` (/metrics), read after each server block's left-out
  image and at its end. Their difference is the part of the overhead that the pipeline itself
  runs slower (or faster) in the worker; the rest is the request's way.
- Floors: the same client's round trip on a request the server refuses at validation (a 400
  for n=0: what any request costs before an image is made), and on one its worker refuses as it
  arrives (a prompt too long: the whole way of a request but the pipeline call, its batch and
  the image's bytes). Each follows a server image, as a client's next request does.

Both sides run on --cpu-threads threads (default: torch's default here), so that the server's
thread governor cannot give its worker fewer threads than the baseline has. Each round has two
parts:

- overhead at concurrency 1, in blocks: BLOCK + 1 images in-process one after another, then as
  many through the server (or the other way round, the order switching from block to block),
  the first of each block left out: it follows the other side's images, whose run evicted
  what this side keeps in the caches, and a client calling one side in a loop never pays that.
  (Alternated image by image, in pairs, the in-process images that followed a server image ran
  2-3 ms slower at 256x256 and the overhead came out 2 points lower.) Short blocks keep a
  machine whose speed drifts (a shared host) from slowing one side more than the other.
  Reported: the median over blocks of server / in-process - 1 (each block's median; target at
  most 5%), and of their difference in ms, beside the floors;
- batching: --num-images images in-process one by one, then the same number through the
  server at each --concurrency above 1 (target at concurrency 4: at least 1.3x the in-process
  one-by-one images/s on the tiny pipeline on CPU), the ratio taken within its round and the
  median over rounds reported.

Latencies are pooled over rounds (median, p90); each round's figure is kept in the JSON.

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
import io
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import httpx
import numpy as np
import pybase64
import torch
from diffusers import FluxPipeline
from embeddings import free_port, session  # benchmarks/ is the script's folder
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pagoda.engine.image_worker import encode_image
from pagoda.engine.worker import keep_freed_memory

PROMPTS = ["a lighthouse at dusk", "a red fox in snow", "a bowl of ramen", "a city at night"]
FLOORS = ("floor_http", "floor_worker")
# per block: the mean run time of the pipeline calls of its images (the server's read from its
# metrics after the left-out image and at the block's end)
CALLS = ("in_process_calls", "server_calls")
SIDES = ("in_process", "server", *FLOORS, *CALLS)
BLOCK = 4  # images a block measures, after one left out
READY_TIMEOUT_S = 600


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = pipeline_arguments(__doc__)
    p.add_argument("--num-images", type=int, default=16, help="per measurement")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 4])
    return p.parse_args(argv)


def pipeline_arguments(doc: str) -> argparse.ArgumentParser:
    """The pipeline, its server and the results file: what the image benchmarks share."""
    p = argparse.ArgumentParser(
        description=doc.split("\n\n")[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter
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
    p.add_argument("--cpu-threads", type=int, default=torch.get_num_threads())
    p.add_argument("--max-batch-size", type=int, default=4, help="the server's images per call")
    p.add_argument("--result-json", type=Path)
    return p


def pipeline_source(args: argparse.Namespace, folder: Path) -> str:
    """--model, or the tiny pipeline built under `folder`."""
    if not args.tiny:
        return args.model
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from tests.tiny_flux import build_tiny_flux

    return str(build_tiny_flux(folder / "tiny-flux"))


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


def image_in_process(
    pipe: FluxPipeline, args: argparse.Namespace, seed: int
) -> tuple[float, float]:
    """Seconds to make one image and encode it as the server would, and of those, the
    pipeline call's."""
    width, height = map(int, args.size.split("x"))
    start = time.perf_counter()
    with torch.inference_mode():  # as the worker calls it (diffusers' own default: no_grad)
        image = pipe(
            PROMPTS[seed % len(PROMPTS)],
            height=height,
            width=width,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance,
            max_sequence_length=args.max_sequence_length,
            generator=torch.Generator(args.device).manual_seed(seed),
        ).images[0]
    call = time.perf_counter() - start
    encode_image(image, "png", 100)
    return time.perf_counter() - start, call


def in_process(pipe: FluxPipeline, args: argparse.Namespace, seed0: int) -> dict:
    image_in_process(pipe, args, seed0 - 1)  # warm-up
    start = time.perf_counter()
    latencies = [image_in_process(pipe, args, seed0 + i)[0] for i in range(args.num_images)]
    return summary(latencies, time.perf_counter() - start)


# -- server ---------------------------------------------------------------------------------


def write_catalog(folder: Path, model: str, args: argparse.Namespace, max_queue: int = 64) -> Path:
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
      max_queue: {max_queue}
"""
    )
    return path


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


def image_body(seed: int) -> dict:
    prompt = PROMPTS[seed % len(PROMPTS)]
    return {"model": "bench-image", "prompt": prompt, "response_format": "b64_json", "seed": seed}


async def served_image(client: aiohttp.ClientSession, url: str, seed: int) -> float:
    """Seconds to get one image through the server, its JSON read and its base64 decoded."""
    t0 = time.perf_counter()
    async with client.post(f"{url}/v1/images/generations", json=image_body(seed)) as response:
        response.raise_for_status()
        body = await response.read()
    data = pybase64.b64decode(json.loads(body)["data"][0]["b64_json"], validate=True)
    seconds = time.perf_counter() - t0
    Image.open(io.BytesIO(data)).verify()
    return seconds


async def over_http(url: str, args: argparse.Namespace, concurrency: int, seed0: int) -> dict:
    slots = asyncio.Semaphore(concurrency)
    latencies: list[float] = []

    async def one(client: aiohttp.ClientSession, seed: int) -> None:
        async with slots:
            latencies.append(await served_image(client, url, seed))

    async with session(concurrency) as client:
        # warm-up at the part's own concurrency: the worker's first batch of that size (its
        # memory), and a steady state to start from (a burst's first request would start alone
        # after a part that ended with one, and the rest wait a whole batch behind it)
        await asyncio.gather(*(one(client, seed0 - 1 - k) for k in range(concurrency)))
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(client, seed0 + i) for i in range(args.num_images)))
        return summary(latencies, time.perf_counter() - start)


async def blocks_at_concurrency_1(
    pipe: FluxPipeline, url: str, args: argparse.Namespace, seed0: int
) -> dict[str, list[float]]:
    """Blocks of BLOCK images in-process and BLOCK through the server, --num-images a side
    (rounded up to whole blocks), each block's first image left out: {"in_process": [s, ...],
    "server": [s, ...], "floor_http": [...], "floor_worker": [...], "in_process_calls": [...],
    "server_calls": [...]}, the sides' lists in blocks of BLOCK, the calls' one per block.
    After every server block, one refused request, alternately at validation ("floor_http")
    and by the worker ("floor_worker")."""
    sides: dict[str, list[float]] = {side: [] for side in SIDES}
    seed = seed0
    async with session(1) as client:
        for block in range(-(-args.num_images // BLOCK)):
            order = ("server", "in_process") if block % 2 else ("in_process", "server")
            for side in order:
                times, calls = [], []
                for i in range(BLOCK + 1):
                    seed += 1
                    if side == "server":
                        times.append(await served_image(client, url, seed))
                        if i in (0, BLOCK):  # after the left-out image, and at the end
                            calls.append(await pipeline_seconds(client, url))
                    else:
                        total, call = image_in_process(pipe, args, seed)
                        times.append(total)
                        calls.append(call)
                calls_s = calls[1] - calls[0] if side == "server" else sum(calls[1:])
                sides[side] += times[1:]
                sides[f"{side}_calls"].append(calls_s / BLOCK)
                if side == "server":
                    floor = FLOORS[block % 2]
                    sides[floor].append(await refused(client, url, floor_body(floor, args)))
    return sides


async def pipeline_seconds(client: aiohttp.ClientSession, url: str) -> float:
    """The server's pipeline run time so far, summed over its images (its metrics)."""
    async with client.get(f"{url}/metrics") as response:
        text = await response.text()
    for family in text_string_to_metric_families(text):
        if family.name == "pagoda:image_pipeline_seconds":  # no sample before the first image
            sums = [s.value for s in family.samples if s.name.endswith("_sum")]
            return sum(sums)
    raise KeyError("pagoda:image_pipeline_seconds is not in the server's metrics")


def floor_body(floor: str, args: argparse.Namespace) -> dict:
    """floor_http: n=0, refused before the worker; floor_worker: a prompt of more T5 tokens than
    the model takes, which the worker refuses as it arrives: the whole way of a request but the
    pipeline call, its batch and its image's bytes."""
    if floor == "floor_http":
        return {"model": "bench-image", "prompt": PROMPTS[0], "n": 0}
    return {"model": "bench-image", "prompt": "word " * (args.max_sequence_length + 8)}


async def refused(client: aiohttp.ClientSession, url: str, body: dict) -> float:
    t0 = time.perf_counter()
    async with client.post(f"{url}/v1/images/generations", json=body) as response:
        await response.read()
    assert response.status == 400, response.status
    return time.perf_counter() - t0


# -- the run --------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-images-") as tmp:
        folder = Path(tmp)
        model = pipeline_source(args, folder)
        torch.set_num_threads(args.cpu_threads)
        keep_freed_memory(one_arena=True)  # as the image worker does
        dtype = getattr(torch, args.dtype)
        pipe = FluxPipeline.from_pretrained(model, dtype=dtype).to(args.device)
        pipe.set_progress_bar_config(disable=True)
        batching = [c for c in args.concurrency if c > 1]
        results: dict = {"blocks": [], "in_process": [], "server": {str(c): [] for c in batching}}
        catalog = write_catalog(folder, model, args, max(64, 2 * max(args.concurrency)))
        process, url, log = start_server(catalog, folder, args.cpu_threads)
        try:
            for r in range(args.rounds):
                seed0 = 100_000 * (r + 1)  # every image of the run has a seed of its own
                if 1 in args.concurrency:
                    blocks = blocks_at_concurrency_1(pipe, url, args, seed0)
                    results["blocks"].append(asyncio.run(blocks))
                if not batching:
                    continue
                results["in_process"].append(in_process(pipe, args, seed0 + 10_000))
                for concurrency in batching:
                    run = asyncio.run(over_http(url, args, concurrency, seed0 + 1000 * concurrency))
                    results["server"][str(concurrency)].append(run)
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
            server_log = log.read_text()
    report(args, results, model, server_log)
    return 0


def overhead(blocks: dict[str, list[float]]) -> tuple[float, float]:
    """Median over blocks of server / in-process - 1 (each block's median), and of the
    difference in ms."""
    server = np.median(np.array(blocks["server"]).reshape(-1, BLOCK), axis=1)
    local = np.median(np.array(blocks["in_process"]).reshape(-1, BLOCK), axis=1)
    return median_gap(server, local)


def pipeline_gap(blocks: dict[str, list[float]]) -> tuple[float, float]:
    """The same for the blocks' pipeline calls: the part of the overhead that the pipeline
    itself runs slower (or faster) in the worker's process."""
    return median_gap(np.array(blocks["server_calls"]), np.array(blocks["in_process_calls"]))


def median_gap(server: np.ndarray, local: np.ndarray) -> tuple[float, float]:
    return float(np.median(server / local - 1)), float(np.median(1000 * (server - local)))


def pool(runs: list[dict]) -> dict:
    return summary([t for run in runs for t in run["latencies_s"]], sum(r["wall_s"] for r in runs))


def report(args: argparse.Namespace, results: dict, model: str, server_log: str) -> None:
    all_blocks = {side: [t for run in results["blocks"] for t in run[side]] for side in SIDES}
    rows = []
    if results["blocks"]:  # one image at a time, back to back: images/s from their sum
        for side in ("in_process", "server"):
            latencies = all_blocks[side]
            label = f"{side.replace('_', '-')}, blocks at concurrency 1"
            rows.append((label, summary(latencies, sum(latencies))))
    if results["in_process"]:
        rows.append(("in-process, one by one", pool(results["in_process"])))
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
    ratios: dict = {}
    if results["blocks"]:
        for floor, what in zip(FLOORS, ("at validation", "by the worker")):
            ratios[f"{floor}_ms"] = 1000 * float(np.median(all_blocks[floor]))
            print(
                f"{floor}: a request refused {what}, after a server image: "
                f"{ratios[f'{floor}_ms']:.2f} ms (median of {len(all_blocks[floor])})"
            )
        rounds = [overhead(run) for run in results["blocks"]]
        pooled = overhead(all_blocks)
        ratios |= {"overhead_c1": pooled[0], "overhead_c1_ms": pooled[1]}
        ratios |= {"overhead_c1_rounds": [r[0] for r in rounds]}
        ratios |= {"overhead_c1_ms_rounds": [r[1] for r in rounds]}
        print(
            f"server overhead at concurrency 1: {100 * pooled[0]:+.1f}% = {pooled[1]:+.2f} ms "
            f"per image (median over {len(all_blocks['server']) // BLOCK} blocks of {BLOCK}; "
            f"rounds' medians: {', '.join(f'{100 * r[0]:+.1f}%' for r in rounds)})"
        )
        calls = pipeline_gap(all_blocks)
        ratios |= {"pipeline_c1": calls[0], "pipeline_c1_ms": calls[1]}
        print(
            f"of which the pipeline call in the worker against in-process: {100 * calls[0]:+.1f}% "
            f"= {calls[1]:+.2f} ms (median over blocks; the rest is the request's way)"
        )
    if "4" in results["server"]:
        pairs = list(zip(results["server"]["4"], results["in_process"]))
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
