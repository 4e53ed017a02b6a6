"""/v1/images/generations: an image model's worker client, the endpoint, and the image files
that `response_format: url` points at."""

from __future__ import annotations

import asyncio
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

import pybase64
from starlette.requests import Request
from starlette.responses import Response

from pagoda.engine.image_pipeline import ImageModelConfig
from pagoda.engine.image_worker import run_image_worker
from pagoda.logs import at_revision
from pagoda.server.catalog import CatalogEntry, ImageSettings, resolve_revision, resolve_source
from pagoda.server.disconnect import unless_disconnected
from pagoda.server.errors import APIError
from pagoda.server.generation import event_stream
from pagoda.server.image_metrics import ImageMetrics
from pagoda.server.image_request import ImageGenerationRequest
from pagoda.server.image_store import MEDIA_TYPES, URL_PATH, ImageStore
from pagoda.server.keys.meter import Meter
from pagoda.server.overload import queue_full
from pagoda.server.worker_client import ACCEPTED, WorkerClient, start_side_by_side

logger = logging.getLogger("pagoda")


@dataclass(slots=True)
class ImageOutput:
    index: int
    seed: int
    data: bytes | None  # the encoded image
    error: str | None  # the pipeline failed (e.g. out of memory): no image
    batch_size: int  # images in the pipeline call that made it
    pipeline_seconds: float  # that call's run time
    partial_index: int | None  # None: the image; k: its k-th preview
    prompt_tokens: int  # the usage (0 in a preview): see ImagePipeline.check_prompt
    image_tokens: int  # and ImagePipeline.image_tokens


class ImageClient(WorkerClient):
    kind = "image"

    def __init__(self, config: ImageModelConfig, name: str) -> None:
        super().__init__(name, run_image_worker, (config,))
        self.config = config
        self.stats = {"running": 0, "waiting": 0}

    def decode_output(self, fields: list) -> ImageOutput:
        return ImageOutput(*fields[1:])

    async def outputs(self, request_id: str, fields: dict) -> AsyncIterator[ImageOutput | None]:
        """None once the worker has accepted the request (RequestRejected, a 400, where it
        refuses it), then the outputs as they come, each image's previews before it, until its
        `n` images. A failed image raises APIError 500; leaving early aborts the request."""
        left = fields["n"]

        def finished(output: ImageOutput | str) -> bool:
            nonlocal left
            if output is not ACCEPTED and output.partial_index is None:  # an image
                left -= 1
            return left == 0

        async with aclosing(self.stream(request_id, [fields], finished)) as stream:
            async for output in stream:
                if output is ACCEPTED:
                    yield None
                    continue
                if output.error is not None:  # leaving the stream aborts the other images
                    raise APIError(500, output.error)
                yield output

    async def generate(self, request_id: str, fields: dict) -> list[ImageOutput]:
        """The request's `n` images in index order. Cancelling aborts the request."""
        async with aclosing(self.outputs(request_id, fields)) as outputs:
            images = [o async for o in outputs if o is not None and o.partial_index is None]
        return sorted(images, key=lambda output: output.index)


@dataclass
class ServedImageModel:
    """An image model the server exposes: its worker process and its catalog settings."""

    id: str
    client: ImageClient
    settings: ImageSettings
    kind: str = "image"
    created: int = field(default_factory=lambda: int(time.time()))
    owned_by: str = "pagoda"
    max_model_len: int = 0
    queued: int = 0  # images requested and not yet returned
    last_latency: float = 1.0  # seconds, for Retry-After

    def admit(self, n: int) -> None:
        limit = self.settings.max_queue
        if self.queued + n > limit:
            what = f"{self.queued} images queued (limit {limit})"
            raise queue_full(self.id, what, self.last_latency)
        self.queued += n


def image_model_config(entry: CatalogEntry, cpu_threads: int | None = None) -> ImageModelConfig:
    settings = entry.image_settings()
    return ImageModelConfig(
        model=resolve_source(entry),
        revision=resolve_revision(entry),
        cpu_offload=settings.cpu_offload,
        vae_tiling=settings.vae_tiling,
        max_batch_size=settings.max_batch_size,
        max_sequence_length=settings.max_sequence_length,
        cpu_threads=cpu_threads,
        **entry.engine_kwargs(),  # dtype and device
    )


async def start_image_models(
    entries: list[CatalogEntry], cpu_threads: int | None = None
) -> dict[str, ServedImageModel]:
    """One worker process per image entry, loading at the same time (`cpu_threads`: serve's
    --cpu-threads)."""
    clients = [ImageClient(image_model_config(e, cpu_threads), e.id) for e in entries]
    try:
        await start_side_by_side([client.start() for client in clients])
    except BaseException:
        await asyncio.gather(*(c.shutdown() for c in clients), return_exceptions=True)
        raise
    served = {}
    for entry, client in zip(entries, clients):
        info = client.info
        served[entry.id] = ServedImageModel(
            entry.id, client, entry.image_settings(), owned_by=entry.owned_by
        )
        logger.info(
            "serving %s%s: %s on %s (%s), loaded in %.1f s, up to %d images per batch",
            entry.id,
            at_revision(client.config.revision),
            info["pipeline"],
            info["device"],
            info["dtype"],
            info["load_seconds"],
            info["max_batch_size"],
        )
    return served


async def generate_images(
    model: ServedImageModel,
    req: ImageGenerationRequest,
    request: Request,
    metrics: ImageMetrics,
    store: ImageStore,
    public_url: str | None,
    meter: Meter,
) -> Response:
    fields = req.worker_fields(model.settings, model.client.info["accepts"])
    model.admit(req.n)
    metrics.queue.labels(model.id).inc(req.n)
    head = {
        "background": "opaque",  # as OpenAI reports the image's: these pipelines make no alpha
        "output_format": req.output_format,
        "quality": req.quality_used,
        "size": f"{fields['width']}x{fields['height']}",
    }
    if req.stream:
        outputs = model.client.outputs(f"img-{uuid.uuid4().hex}", fields)
        try:  # the worker's check of the prompt, before the 200: a bad one is a 400 still
            await unless_disconnected(request, anext(outputs))
        except BaseException:
            await outputs.aclose()
            leave_queue(model, metrics, req.n)
            raise
        return event_stream(image_events(model, outputs, fields, head, metrics, meter), meter)
    start = time.monotonic()
    try:
        work = model.client.generate(f"img-{uuid.uuid4().hex}", fields)
        outputs = await unless_disconnected(request, work)
    finally:
        leave_queue(model, metrics, req.n)
    observe(model, metrics, fields, outputs, start)
    meter.record(images=req.n)
    base_url = (public_url or str(request.base_url)).rstrip("/")
    head = {"created": int(time.time()), **head, "usage": usage(outputs)}
    # the seed (an extension) remakes the image
    items: list[dict] = [{"seed": output.seed} for output in outputs]
    inline = [output.data if req.response_format == "b64_json" else None for output in outputs]
    if req.response_format == "url":
        images = [output.data for output in outputs]
        names = await asyncio.to_thread(store.save, images, req.output_format)
        for item, name in zip(items, names):
            item["url"] = f"{base_url}{URL_PATH}{name}"
    return Response(response_body(head, items, inline), media_type="application/json")


async def image_events(
    model: ServedImageModel,
    outputs: AsyncIterator[ImageOutput | None],
    fields: dict,
    head: dict,
    metrics: ImageMetrics,
    meter: Meter,
) -> AsyncIterator[bytes | str]:
    """A streamed request's SSE events, as OpenAI's images API streams them: each preview
    (`image_generation.partial_image`), then the image (`image_generation.completed`).
    `outputs`: the request's, past the worker's acceptance."""
    start = time.monotonic()
    images = []
    try:
        async with aclosing(outputs):
            async for output in outputs:
                if output.partial_index is None:
                    images.append(output)
                    meter.record(images=1)
                    event = {"type": "image_generation.completed", **head, "seed": output.seed}
                    event["usage"] = usage([output])
                else:
                    event = {"type": "image_generation.partial_image", **head}
                    event["partial_image_index"] = output.partial_index
                event["created_at"] = int(time.time())
                yield sse_event(event["type"], with_b64(event, output.data))
    except APIError as exc:  # the pipeline failed: after the 200, only an error event can say
        logger.warning("image stream ended by an error: %s", exc)
        yield json.dumps(exc.body())
    finally:
        leave_queue(model, metrics, fields["n"])
    if images:
        observe(model, metrics, fields, images, start)
    yield "[DONE]"


def sse_event(name: str, data: bytes) -> bytes:
    """One SSE event with its JSON on one `data:` line, as sse-starlette writes them (`\r\n`
    ends a line): JSON has no line break. Written here because sse-starlette decodes,
    regex-splits, copies and encodes again the event's text, the image's base64 included:
    1.7 ms in the event loop for a 170 KB PNG (256x256), against 0.03 ms for the same bytes."""
    return b"".join([b"event: ", name.encode(), b"\r\ndata: ", data, b"\r\n\r\n"])


def leave_queue(model: ServedImageModel, metrics: ImageMetrics, n: int) -> None:
    model.queued -= n
    metrics.queue.labels(model.id).dec(n)


def observe(
    model: ServedImageModel,
    metrics: ImageMetrics,
    fields: dict,
    outputs: list[ImageOutput],
    start: float,
) -> None:
    model.last_latency = time.monotonic() - start
    metrics.latency.labels(model.id).observe(model.last_latency)
    metrics.images.labels(model.id).inc(len(outputs))
    metrics.steps.labels(model.id).inc(len(outputs) * fields["steps"])
    for output in outputs:
        metrics.batch_size.labels(model.id).observe(output.batch_size)
        metrics.pipeline_seconds.labels(model.id).observe(output.pipeline_seconds)


def usage(images: list[ImageOutput]) -> dict:
    """OpenAI's image usage: the prompt's tokens (counted once) and the image tokens made."""
    prompt = images[0].prompt_tokens
    made = sum(image.image_tokens for image in images)
    return {
        "input_tokens": prompt,
        "input_tokens_details": {"text_tokens": prompt, "image_tokens": 0},
        "output_tokens": made,
        "total_tokens": prompt + made,
    }


def response_body(head: dict, items: list[dict], inline: list[bytes | None]) -> bytes:
    """`{**head, "data": items}` as JSON, with `b64_json` added to each item that has inline
    bytes."""
    parts = [json.dumps(head)[:-1].encode(), b',"data":[']
    for index, (item, data) in enumerate(zip(items, inline)):
        if index:
            parts.append(b",")
        parts.append(json.dumps(item).encode() if data is None else with_b64(item, data))
    parts.append(b"]}")
    return b"".join(parts)


def with_b64(item: dict, data: bytes) -> bytes:
    """`{**item, "b64_json": base64 of data}` as JSON. The base64 text is written in place:
    its alphabet needs no JSON escaping, and the JSON encoder held the event loop for 7 ms
    over the 4 MB of text of a 3 MB PNG."""
    return b"".join(
        [json.dumps(item)[:-1].encode(), b',"b64_json":"', pybase64.b64encode(data), b'"}']
    )


# OpenAI's other image endpoints, which an SDK user may call: told plainly, not "Unknown route"
UNSERVED_PATHS = ("/v1/images/edits", "/v1/images/variations")


async def unserved_image_endpoint(request: Request) -> Response:
    raise APIError(
        404,
        f"{request.url.path} is not served here: pagoda makes images from a prompt only, "
        "with POST /v1/images/generations (no edits or variations).",
    )


async def image_file(request: Request, store: ImageStore | None) -> Response:
    """GET /v1/images/files/<name>: open to anyone who has the URL, until it expires."""
    name = request.path_params["name"]
    found = store.lookup(name) if store is not None else None
    try:
        if found is None:
            raise FileNotFoundError(name)
        path, seconds_left = found
        content = await asyncio.to_thread(path.read_bytes)
    except FileNotFoundError:
        raise APIError(
            404, "This image does not exist or its URL has expired.", code="image_not_found"
        ) from None
    return Response(
        content,
        media_type=MEDIA_TYPES[path.suffix.removeprefix(".")],
        headers={"Cache-Control": f"private, max-age={int(seconds_left)}"},
    )
