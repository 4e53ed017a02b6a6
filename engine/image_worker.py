"""The image worker: a diffusers pipeline driven by the shared worker loop (engine/worker.py).

An add's payload is one dict of request fields (see `ImageRequest`); an output is
`[request_id, index, seed, encoded_image_bytes, error, batch_size, pipeline_seconds,
partial_index, prompt_tokens, image_tokens]` (error is None, or a message with no image;
batch_size: the images of the pipeline call it came from; pipeline_seconds: that call's run
time, its encoding left out; partial_index: None for an image, k for its k-th preview, which
comes before it with 0 for the seconds and tokens; prompt_tokens and image_tokens: the usage,
see ImagePipeline.check_prompt and image_tokens). The images
of all waiting requests with the same size, steps and guidance run as one pipeline call (FIFO,
at most max_batch_size). The call runs in a thread, so that the loop keeps reading its inbox:
an abort between two denoising steps interrupts a batch whose requests are all gone, and drops
an aborted request's images that have not started.

A batch that would start with fewer images than the last one had waits a little for the last
batch's clients to come back (`BatchGather`, engine/worker.py). A batch's images are encoded
in parallel (PIL's encoders release the GIL).
"""

from __future__ import annotations

import io
import logging
import os
import random
import threading
import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import partial

import torch
from PIL.Image import Image

from pagoda.engine.cpu_threads import governor_for
from pagoda.engine.image_pipeline import BatchShape, ImageJob, ImageModelConfig, ImagePipeline
from pagoda.engine.worker import BatchGather, run_worker
from pagoda.logs import LogSettings, at_revision

logger = logging.getLogger(__name__)
WAIT_S = 0.05  # how long a step waits on a running batch before the loop reads its inbox
PIL_FORMATS = {"png": "PNG", "jpeg": "JPEG", "webp": "WEBP"}
# zlib's fastest level: a 1024x1024 picture encoded in 85 ms against PIL's default level 6's
# 222 ms, for a file 16% larger (a GPU makes a FLUX.1-schnell image in well under a second)
PNG_COMPRESS_LEVEL = 1
# How long a batch waits for its clients to come back (worker.py's default: 20 ms). Four clients
# of 512x512 images on two cores took 44-65 ms (the PNGs read and decoded, the next requests
# sent); within 20 ms only the first was back, and batches alternated 1 + 3 for good.
GATHER_MAX_S = 0.25


@dataclass(slots=True)
class ImageRequest:
    prompt: str
    n: int
    height: int
    width: int
    steps: int
    guidance_scale: float
    seed: int | None = None  # image i gets seed + i; None: a random seed per image
    negative_prompt: str | None = None
    true_cfg_scale: float | None = None
    output_format: str = "png"
    output_compression: int = 100  # jpeg and webp quality
    partial_images: int = 0  # previews each image streams before it (0-3)

    def shape(self) -> BatchShape:
        return BatchShape(
            self.height,
            self.width,
            self.steps,
            self.guidance_scale,
            self.true_cfg_scale,
            self.negative_prompt is not None,
        )


@dataclass(slots=True)
class PendingImage:
    request_id: str
    index: int
    request: ImageRequest
    job: ImageJob
    prompt_tokens: int


@dataclass(slots=True)
class RunningBatch:
    images: list[PendingImage]
    future: Future | None = None
    aborted: set[str] = field(default_factory=set)
    seconds: float = 0.0  # the pipeline call's run time, once it has run
    # previews being encoded or encoded, in the order they were made: (image, its preview
    # index, the encoding); `wake` is set when an encoding is done and when the call ends
    previews: deque[tuple[PendingImage, int, Future]] = field(default_factory=deque)
    wake: threading.Event = field(default_factory=threading.Event)

    def all_aborted(self) -> bool:
        return all(image.request_id in self.aborted for image in self.images)


class ImageWorker:
    acknowledges_adds = True  # a streamed request answers 400, not 200, for a bad prompt

    def __init__(self, config: ImageModelConfig) -> None:
        start = time.monotonic()
        # Every torch op of this process runs in this one thread, the load included. libgomp
        # keeps a pool of OpenMP threads for each thread that runs a parallel region, and once
        # its threads outnumber the cores, they stop spinning between regions and sleep: a
        # single parallel region in the main thread (a large model's load converting its
        # weights has them) made each image of the tiny test pipeline 15-20% slower on 2 cores.
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="pagoda-images")
        self.pipeline = self._executor.submit(_load_pipeline, config).result()
        self.max_batch_size = config.max_batch_size
        self.load_seconds = time.monotonic() - start
        self.governor = governor_for(self.pipeline.device, config.cpu_threads)
        self.waiting: deque[PendingImage] = deque()
        self.running: RunningBatch | None = None
        self.gather = BatchGather(max_s=GATHER_MAX_S)  # counts images
        encoders = min(self.max_batch_size, config.cpu_threads or os.cpu_count() or 1)
        self._encoders = ThreadPoolExecutor(encoders, thread_name_prefix="pagoda-encode")
        self._rng = random.SystemRandom()
        logger.info(
            "loaded %s%s (%s) on %s in %s in %.1f s",
            config.model,
            at_revision(config.revision),
            type(self.pipeline.pipe).__name__,
            self.pipeline.device,
            self.pipeline.dtype,
            self.load_seconds,
        )

    def info(self) -> dict:
        return {**self.pipeline.info(), "load_seconds": round(self.load_seconds, 3)}

    def add(self, request_id: str, fields: dict) -> None:
        try:
            request = ImageRequest(**fields)
        except TypeError as exc:  # a server of another version: refuse, do not die
            raise ValueError(f"malformed image request: {exc}") from None
        tokens = self.pipeline.check_prompt(request.prompt, "prompt")
        if request.negative_prompt is not None:
            self.pipeline.check_prompt(request.negative_prompt, "negative_prompt")
        for index in range(request.n):
            seed = self._random_seed() if request.seed is None else request.seed + index
            job = ImageJob(request.prompt, seed, request.negative_prompt, request.partial_images)
            self.waiting.append(PendingImage(request_id, index, request, job, tokens))

    def _random_seed(self) -> int:
        # below 2**53: a seed a JavaScript client reads (as a double) and sends back intact
        return self._rng.getrandbits(53)

    def abort(self, request_ids: list[str]) -> None:
        gone = set(request_ids)
        self.waiting = deque(image for image in self.waiting if image.request_id not in gone)
        if self.running is not None:
            self.running.aborted |= gone

    def has_work(self) -> bool:
        return self.running is not None or bool(self.waiting)

    def step(self) -> list[list]:
        if self.running is None:
            if not self.gather.ready(min(len(self.waiting), self.max_batch_size)):
                time.sleep(self.gather.poll_s)
                return []
            self.running = self._start_batch()
        batch = self.running
        if not batch.wake.wait(WAIT_S):
            return []
        batch.wake.clear()
        if not batch.future.done():
            return self._take_previews(batch)
        previews = self._take_previews(batch, every=True)  # an image's go out before it
        # its clients come back on top of the images that arrived meanwhile: counted as served,
        # a batch of 3 with a 4th waiting would start again with 3 as soon as 2 are back
        served = min(len(batch.images) + len(self.waiting), self.max_batch_size)
        self.gather.ran(served, batch.seconds)
        try:
            encoded = batch.future.result()
        except Exception as exc:  # e.g. out of memory: fail this batch, keep serving
            logger.exception("an image batch failed")
            self.running = None
            message = f"image generation failed: {type(exc).__name__}: {exc}"
            size = len(batch.images)
            return previews + [
                [i.request_id, i.index, i.job.seed, None, message, size, batch.seconds, None, 0, 0]
                for i in batch.images
            ]
        self.running = None
        size = len(batch.images)
        image_tokens = self.pipeline.image_tokens(batch.images[0].request.shape())
        return previews + [
            [image.request_id, image.index, image.job.seed, data, None, size, batch.seconds]
            + [None, image.prompt_tokens, image_tokens]
            for image, data in zip(batch.images, encoded)
            if image.request_id not in batch.aborted
        ]

    def take_rejected(self) -> list[tuple[str, str]]:
        return []  # every refusal happens at add

    def stats(self) -> dict:
        running = len(self.running.images) if self.running is not None else 0
        return {"running": running, "waiting": len(self.waiting)}

    def _start_batch(self) -> RunningBatch:
        shape = self.waiting[0].request.shape()
        images, rest = [], deque()
        for image in self.waiting:
            if len(images) < self.max_batch_size and image.request.shape() == shape:
                images.append(image)
            else:
                rest.append(image)
        self.waiting = rest
        batch = RunningBatch(images)
        batch.future = self._executor.submit(self._run, shape, batch)
        batch.future.add_done_callback(lambda _: batch.wake.set())
        return batch

    def _encode_partial(self, batch: RunningBatch, position: int, index: int, picture) -> None:
        """A preview from the pipeline's thread: encoded beside the next steps, not in them."""
        image = batch.images[position]
        if image.request_id in batch.aborted:
            return
        encoding = self._encoders.submit(encode_request_image, picture, image.request)
        batch.previews.append((image, index, encoding))
        encoding.add_done_callback(lambda _: batch.wake.set())

    def _take_previews(self, batch: RunningBatch, every: bool = False) -> list[list]:
        """The outputs of the previews encoded so far, in order (`every`: all, waiting for
        those under way)."""
        outputs = []
        while batch.previews and (every or batch.previews[0][2].done()):
            image, index, encoding = batch.previews.popleft()
            if encoding.exception() is not None:  # the image itself still comes
                logger.warning("a preview could not be encoded: %s", encoding.exception())
                continue
            if image.request_id in batch.aborted:
                continue
            output = [image.request_id, image.index, image.job.seed, encoding.result(), None]
            outputs.append(output + [len(batch.images), 0.0, index, 0, 0])
        return outputs

    def _run(self, shape: BatchShape, batch: RunningBatch) -> list[bytes]:
        # torch's thread count belongs to the thread that sets it: the governor ticks in the
        # loop's thread, the pipeline runs in this one
        if self.governor is not None and torch.get_num_threads() != self.governor.threads:
            torch.set_num_threads(self.governor.threads)
        jobs = [image.job for image in batch.images]
        start = time.monotonic()
        previews = partial(self._encode_partial, batch)
        pictures = self.pipeline.run(shape, jobs, stop=batch.all_aborted, on_partial=previews)
        batch.seconds = time.monotonic() - start
        if batch.all_aborted():
            logger.info("interrupted a batch of %d images: its requests are gone", len(jobs))
            return []
        requests = [image.request for image in batch.images]
        if len(pictures) == 1:  # no hand-off to an encoder thread and back (0.3 ms)
            return [encode_request_image(pictures[0], requests[0])]
        return list(self._encoders.map(encode_request_image, pictures, requests))


def _load_pipeline(config: ImageModelConfig) -> ImagePipeline:
    if config.cpu_threads is not None:
        torch.set_num_threads(config.cpu_threads)
    return ImagePipeline(config)


def encode_request_image(picture: Image, request: ImageRequest) -> bytes:
    return encode_image(picture, request.output_format, request.output_compression)


def encode_image(image: Image, output_format: str, compression: int) -> bytes:
    """PNG (lossless; compression does not apply), or JPEG / WebP at quality `compression`."""
    buffer = io.BytesIO()
    if output_format == "png":
        image.save(buffer, format="PNG", compress_level=PNG_COMPRESS_LEVEL)
    else:
        image.save(buffer, format=PIL_FORMATS[output_format], quality=compression)
    return buffer.getvalue()


def run_image_worker(
    config: ImageModelConfig, input_addr: str, output_addr: str, log_settings: LogSettings
) -> None:
    """Process entry point of an image model's worker."""
    worker = partial(ImageWorker, config)
    run_worker(worker, input_addr, output_addr, log_settings, model_in_thread=True)
