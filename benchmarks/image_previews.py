"""Streamed images and their previews: what `stream: true` with `partial_images` costs, through
pagoda's /v1/images/generations, in one run.

One client at a time (aiohttp, as benchmarks/images.py drives the server), in blocks: BLOCK + 1
requests of one kind, then of the next, the order rotating from block to block and the first of
each block left out (it follows the other kinds' requests). Three kinds, the same size, steps
and seeds:

- whole: `stream: false`, b64_json, the response's JSON read and its base64 decoded;
- stream: `stream: true` without previews, to its `image_generation.completed` event, decoded;
- previews: `stream: true` with --partial-images, to each preview's event and to the image's.

Reported (medians over the blocks' medians): each kind's time to its image; the stream's cost
(stream / whole - 1), the previews' cost (previews / stream - 1) and the time to each preview,
also as a share of the image's time. A preview costs a VAE decode in the pipeline's call and an
encoding beside its next steps, so its cost is about the VAE's share of the image times the
previews.

    python benchmarks/image_previews.py --tiny --size 256x256 --steps 8 \\
        --result-json benchmarks/results/image_previews_tiny_cpu.json
    python benchmarks/image_previews.py --model black-forest-labs/FLUX.1-schnell --device cuda \\
        --dtype bfloat16 --size 1024x1024 --steps 4 --guidance 0 --max-sequence-length 256

--tiny builds the tests' tiny random FLUX pipeline (run from the repository root).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import signal
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import numpy as np
import pybase64
import torch
from embeddings import session  # benchmarks/ is the script's folder
from images import PROMPTS, pipeline_arguments, pipeline_source, start_server, write_catalog

KINDS = ("whole", "stream", "previews")
BLOCK = 4  # requests a block measures, after one left out
EVENT_END = b"\r\n\r\n"  # sse-starlette's line separator, twice


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = pipeline_arguments(__doc__)
    p.add_argument("--partial-images", type=int, default=3, choices=(1, 2, 3))
    p.add_argument("--blocks", type=int, default=12, help="blocks of each kind")
    return p.parse_args(argv)


def body(kind: str, seed: int, args: argparse.Namespace) -> dict:
    request = {"model": "bench-image", "prompt": PROMPTS[seed % len(PROMPTS)], "seed": seed}
    if kind == "whole":
        return request | {"response_format": "b64_json"}
    return request | {"stream": True, "partial_images": args.partial_images * (kind == "previews")}


async def whole(client: aiohttp.ClientSession, url: str, request: dict) -> list[float]:
    """[seconds to the image], its JSON read and its base64 decoded."""
    t0 = time.perf_counter()
    async with client.post(url, json=request) as response:
        response.raise_for_status()
        data = json.loads(await response.read())["data"][0]["b64_json"]
    pybase64.b64decode(data, validate=True)
    return [time.perf_counter() - t0]


async def streamed(client: aiohttp.ClientSession, url: str, request: dict) -> list[float]:
    """Seconds to each event's image, decoded: the previews', then the image's."""
    t0 = time.perf_counter()
    times, buffer, scanned = [], bytearray(), 0
    async with client.post(url, json=request) as response:
        response.raise_for_status()
        async for chunk in response.content.iter_any():  # events far longer than a line limit
            buffer += chunk
            while (end := buffer.find(EVENT_END, scanned)) >= 0:
                event, buffer, scanned = bytes(buffer[:end]), buffer[end + len(EVENT_END) :], 0
                lines = event.split(b"\r\n")
                data = b"".join(line[6:] for line in lines if line.startswith(b"data: "))
                if data and data != b"[DONE]":
                    payload = json.loads(data)
                    if "error" in payload:
                        raise RuntimeError(payload["error"])
                    pybase64.b64decode(payload["b64_json"], validate=True)
                    times.append(time.perf_counter() - t0)
            scanned = max(0, len(buffer) - len(EVENT_END) + 1)
    return times


async def blocks(url: str, args: argparse.Namespace) -> dict[str, list[list[float]]]:
    """Per kind, one list of event times per measured request."""
    runs: dict[str, list[list[float]]] = {kind: [] for kind in KINDS}
    seed = 0
    async with session(1) as client:
        for block in range(args.blocks * len(KINDS)):
            kind = KINDS[(block + block // len(KINDS)) % len(KINDS)]  # each order in turn
            call = whole if kind == "whole" else streamed
            for i in range(BLOCK + 1):
                seed += 1
                times = await call(client, f"{url}/v1/images/generations", body(kind, seed, args))
                if i:
                    runs[kind].append(times)
    return runs


def block_medians(times: list[list[float]], event: int) -> np.ndarray:
    """The median of each block's requests' time to their `event`-th event."""
    values = np.array([t[event] for t in times])
    return np.median(values.reshape(-1, BLOCK), axis=1)


def report(args: argparse.Namespace, runs: dict, model: str) -> dict:
    image = {kind: block_medians(runs[kind], -1) for kind in KINDS}
    previews = len(runs["previews"][0]) - 1
    figures = {f"{kind}_image_s": float(np.median(image[kind])) for kind in KINDS}
    figures["stream_cost"] = float(np.median(image["stream"] / image["whole"] - 1))
    figures["previews_cost"] = float(np.median(image["previews"] / image["stream"] - 1))
    figures["preview_s"] = [
        float(np.median(block_medians(runs["previews"], k))) for k in range(previews)
    ]
    print(
        f"{args.size}, {args.steps} steps, {args.device} {args.dtype}, {args.partial_images} "
        f"previews asked, {previews} sent; {args.blocks} blocks of {BLOCK} a kind"
    )
    for kind in KINDS:
        print(f"{kind:9} to the image: {1000 * figures[f'{kind}_image_s']:8.1f} ms")
    print(f"the stream's cost (stream / whole - 1): {100 * figures['stream_cost']:+.1f}%")
    print(
        f"the previews' cost (previews / stream - 1): {100 * figures['previews_cost']:+.1f}%, "
        f"{100 * figures['previews_cost'] / max(previews, 1):+.1f}% a preview"
    )
    image_s = figures["previews_image_s"]
    for k, seconds in enumerate(figures["preview_s"]):
        print(f"preview {k}: {1000 * seconds:8.1f} ms, {100 * seconds / image_s:.0f}% of the image")
    return {
        "config": {**vars(args), "result_json": str(args.result_json), "model": model},
        "machine": {
            "platform": platform.platform(),
            "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        },
        "figures": figures,
        "runs": runs,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="pagoda-bench-previews-") as tmp:
        folder = Path(tmp)
        model = pipeline_source(args, folder)
        catalog = write_catalog(folder, model, args)
        process, url, log = start_server(catalog, folder, args.cpu_threads)
        try:
            asyncio.run(blocks(url, argparse.Namespace(**{**vars(args), "blocks": 1})))  # warm
            runs = asyncio.run(blocks(url, args))
        finally:
            process.send_signal(signal.SIGTERM)
            process.wait(60)
    result = report(args, runs, model)
    if args.result_json:
        args.result_json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
