"""/v1/images/generations: a real `pagoda serve --catalog` serving a tiny random FLUX pipeline
(and a tiny chat model beside it), driven by the openai SDK and httpx, checked against
diffusers' own FluxPipeline on the same weights and seeds."""

from __future__ import annotations

import base64
import io
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import pytest
import torch
from diffusers import FluxPipeline
from PIL import Image

from pagoda.engine import image_worker
from pagoda.engine.image_pipeline import (
    BatchShape,
    ImageJob,
    ImageModelConfig,
    ImagePipeline,
    preview_steps,
)
from pagoda.engine.image_worker import ImageWorker
from pagoda.server.api_models import ImagesResponse, ImageStreamEvent
from pagoda.server.catalog import ImageSettings
from pagoda.server.errors import APIError
from pagoda.server.image_request import ImageGenerationRequest
from pagoda.server.images import response_body
from pagoda.server.metrics import Metrics
from tests.serving import Server
from tests.tiny_flux import build_tiny_flux
from tests.tiny_models import build_tiny_model

IMAGE_MODEL = "test-org/tiny-flux"
CHAT_MODEL = "test-org/tiny-llama"
KEY = "sk-images-key"
STEPS, GUIDANCE, MAX_SEQUENCE_LENGTH = 2, 3.5, 64

CATALOG = """\
models:
  - id: {chat}
    kind: chat
    source: {llama}
    max_model_len: 256
    engine:
      dtype: float32
      kv_cache_memory: 64MiB
  - id: {image}
    kind: image
    source: {flux}
    engine:
      dtype: float32
      device: cpu
    image:
      default_size: 64x64
      max_size: 256x256
      max_pixels: 32768
      default_steps: {steps}
      max_steps: 8
      default_guidance: {guidance}
      max_sequence_length: {max_sequence_length}
      max_batch_size: 4
      max_queue: 12
"""


@pytest.fixture(scope="module")
def flux_dir(tmp_path_factory) -> Path:
    return build_tiny_flux(tmp_path_factory.mktemp("tiny_flux") / "flux")


@pytest.fixture(scope="module")
def catalog(tmp_path_factory, flux_dir) -> Path:
    root = tmp_path_factory.mktemp("images_catalog")
    llama = build_tiny_model("llama", root / "llama")
    path = root / "models.yaml"
    path.write_text(
        CATALOG.format(
            chat=CHAT_MODEL,
            llama=llama,
            image=IMAGE_MODEL,
            flux=flux_dir,
            steps=STEPS,
            guidance=GUIDANCE,
            max_sequence_length=MAX_SEQUENCE_LENGTH,
        )
    )
    return path


@pytest.fixture(scope="module")
def server(catalog, tmp_path_factory):
    image_dir = tmp_path_factory.mktemp("image_files")
    args = ["--catalog", str(catalog), "--api-key", KEY, "--image-dir", str(image_dir)]
    srv = Server(args).wait_ready()
    srv.image_dir = image_dir
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def http(server):
    headers = {"Authorization": f"Bearer {KEY}"}
    with httpx.Client(base_url=server.url, headers=headers, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def reference(flux_dir) -> FluxPipeline:
    pipe = FluxPipeline.from_pretrained(flux_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def diffusers_image(pipe: FluxPipeline, prompt: str, seed: int, size=(64, 64)) -> np.ndarray:
    """What diffusers itself makes of the prompt and seed."""
    width, height = size
    image = pipe(
        prompt,
        num_inference_steps=STEPS,
        guidance_scale=GUIDANCE,
        height=height,
        width=width,
        generator=torch.Generator("cpu").manual_seed(seed),
        max_sequence_length=MAX_SEQUENCE_LENGTH,
    ).images[0]
    return np.asarray(image)


def decode(data: bytes, expected_format: str = "PNG") -> np.ndarray:
    image = Image.open(io.BytesIO(data))
    assert image.format == expected_format
    return np.asarray(image.convert("RGB"))


def generate(client, **kwargs):
    """client.images.generate with our extensions (seed, steps...) in extra_body."""
    extras = {k: kwargs.pop(k) for k in list(kwargs) if k in EXTENSIONS}
    kwargs.setdefault("model", IMAGE_MODEL)
    kwargs.setdefault("prompt", "a lighthouse at dusk")
    return client.images.generate(**kwargs, extra_body=extras or None)


EXTENSIONS = ("seed", "num_inference_steps", "guidance_scale", "negative_prompt", "true_cfg_scale")


def b64_images(response) -> list[np.ndarray]:
    return [decode(base64.b64decode(item.b64_json)) for item in response.data]


def metric(text: str, name: str) -> float:
    match = re.search(rf'^{re.escape(name)}{{model_name="{IMAGE_MODEL}"}} (\S+)$', text, re.M)
    assert match, f"{name} missing from /metrics"
    return float(match.group(1))


# --- the contract ------------------------------------------------------------------------


def test_b64_json_equals_diffusers_on_the_same_seed(client, reference):
    response = generate(client, prompt="a red fox", response_format="b64_json", seed=1234)
    assert isinstance(response.created, int) and len(response.data) == 1
    item = response.data[0]
    assert item.url is None and item.model_extra["seed"] == 1234
    (got,) = b64_images(response)
    assert got.shape == (64, 64, 3)
    assert np.array_equal(got, diffusers_image(reference, "a red fox", 1234))


def test_response_body_writes_base64_in_place_as_valid_json():
    head = {"created": 1, "output_format": "png", "quality": None, "size": "64x64"}
    items = [{"seed": 7}, {"seed": 8, "url": "http://h/v1/images/files/a.png"}, {"seed": 9}]
    images = [bytes(range(256)) * 3, None, b"\xff\xfe"]
    body = json.loads(response_body(head, items, images))
    assert body == {
        **head,
        "data": [
            {"seed": 7, "b64_json": base64.b64encode(images[0]).decode()},
            items[1],
            {"seed": 9, "b64_json": "//4="},
        ],
    }


def test_url_is_served_without_the_key_and_decodes(server, client):
    b64 = generate(client, response_format="b64_json", seed=5, size="128x64")
    response = generate(client, response_format="url", seed=5, size="128x64")
    url = response.data[0].url
    assert response.data[0].b64_json is None
    assert re.fullmatch(rf"{server.url}/v1/images/files/[A-Za-z0-9_-]{{43}}\.png", url)
    fetched = httpx.get(url, timeout=30)  # no Authorization header, as with OpenAI's URLs
    assert fetched.status_code == 200
    assert fetched.headers["content-type"] == "image/png"
    assert "max-age" in fetched.headers["cache-control"]
    image = decode(fetched.content)
    assert image.shape == (64, 128, 3)
    assert np.array_equal(image, b64_images(b64)[0])


def test_defaults_url_and_the_first_image_model(client):
    response = client.images.generate(prompt="no model named")  # as DALL-E clients send it
    assert response.data[0].url is not None and response.size == "64x64"


def test_unknown_or_forged_file_names_are_404(server):
    for name in ["A" * 43 + ".png", "..%2Fmodels.yaml", "x.png"]:
        response = httpx.get(f"{server.url}/v1/images/files/{name}")
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found_error"


def test_n_images_follow_seed_plus_index_and_equal_single_ones(client, reference):
    many = b64_images(generate(client, n=3, seed=100, response_format="b64_json"))
    for index, image in enumerate(many):
        alone = b64_images(generate(client, seed=100 + index, response_format="b64_json"))[0]
        assert np.array_equal(image, alone)
    assert np.array_equal(many[2], diffusers_image(reference, "a lighthouse at dusk", 102))


def batched_images(server, size: int) -> float:
    """Images made so far in pipeline calls of exactly `size` images."""
    text = httpx.get(f"{server.url}/metrics").text

    def bucket(le: int) -> float:
        name = f'pagoda:image_batch_size_bucket{{le="{float(le)}",model_name="{IMAGE_MODEL}"}}'
        found = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
        return float(found.group(1)) if found else 0.0  # no image made yet

    return bucket(size) - bucket(size - 1)


def test_concurrent_requests_batch_and_keep_their_images(server, client, http, reference):
    """Four requests that arrive while the worker is busy run as one pipeline call of four,
    and each image is still the one diffusers makes alone from its seed."""
    before = batched_images(server, 4)
    # long enough (two images of the most pixels, the most steps) that all four arrive while
    # it runs, on a loaded machine too; a batch of two, not counted below
    slow = {"model": IMAGE_MODEL, "prompt": "busy", "size": "128x256", "n": 2}
    slow["num_inference_steps"] = 8
    busy = threading.Thread(
        target=http.post, args=("/v1/images/generations",), kwargs={"json": slow}
    )
    busy.start()
    wait_for_queue(server, slow["n"])  # the queue counts images
    prompts = ["a cat", "a dog", "a boat", "a tree"]
    results: dict[str, np.ndarray] = {}

    def one(prompt: str, seed: int) -> None:
        response = generate(client, prompt=prompt, seed=seed, response_format="b64_json")
        results[prompt] = b64_images(response)[0]

    threads = [threading.Thread(target=one, args=(p, 7 + i)) for i, p in enumerate(prompts)]
    for thread in threads:
        thread.start()
    for thread in [busy, *threads]:
        thread.join()
    assert batched_images(server, 4) == before + 4
    for index, prompt in enumerate(prompts):
        assert np.array_equal(results[prompt], diffusers_image(reference, prompt, 7 + index))


def test_without_a_seed_images_differ(client):
    first, second = (generate(client, response_format="b64_json") for _ in range(2))
    seeds = [r.data[0].model_extra["seed"] for r in (first, second)]
    assert seeds[0] != seeds[1]
    assert all(seed < 2**53 for seed in seeds)  # a JavaScript number holds it exactly
    assert first.quality == "medium"  # OpenAI's value for the default ("auto")
    assert not np.array_equal(b64_images(first)[0], b64_images(second)[0])


def test_steps_guidance_and_quality_change_the_image(client):
    def image(**kwargs):
        return b64_images(generate(client, seed=3, response_format="b64_json", **kwargs))[0]

    base = image()
    assert np.array_equal(base, image(num_inference_steps=STEPS, guidance_scale=GUIDANCE))
    assert np.array_equal(base, image(quality="standard"))
    assert not np.array_equal(base, image(num_inference_steps=STEPS + 1))
    assert not np.array_equal(base, image(guidance_scale=1.0))
    assert np.array_equal(image(quality="low"), image(num_inference_steps=STEPS // 2))
    assert np.array_equal(image(quality="hd"), image(num_inference_steps=2 * STEPS))
    assert not np.array_equal(base, image(negative_prompt="blurry", true_cfg_scale=2.0))
    # true CFG without a negative prompt guides against the empty one (diffusers skips it)
    guided = image(true_cfg_scale=2.0)
    assert not np.array_equal(base, guided)
    assert np.array_equal(guided, image(negative_prompt="", true_cfg_scale=2.0))


@pytest.mark.parametrize(("output_format", "pil_format"), [("jpeg", "JPEG"), ("webp", "WEBP")])
def test_jpeg_and_webp_with_compression(client, output_format, pil_format):
    sizes = []
    for compression in (10, 95):
        response = generate(
            client,
            seed=9,
            response_format="b64_json",
            output_format=output_format,
            output_compression=compression,
            size="128x128",
        )
        assert response.output_format == output_format
        data = base64.b64decode(response.data[0].b64_json)
        assert decode(data, pil_format).shape == (128, 128, 3)
        sizes.append(len(data))
    assert sizes[0] < sizes[1]


def test_models_list_has_the_image_model(client):
    assert {IMAGE_MODEL, CHAT_MODEL} <= {model.id for model in client.models.list()}


# --- usage and streaming -----------------------------------------------------------------


def test_usage_counts_the_prompts_t5_tokens_and_the_image_tokens(client, reference):
    prompt = "a red fox in snow"
    response = generate(client, prompt=prompt, n=2, size="128x64", response_format="b64_json")
    tokens = len(reference.tokenizer_2(prompt).input_ids)  # FluxPipeline's T5 count
    image_tokens = 2 * (128 // 16) * (64 // 16)  # FLUX's latent patches, 16x16 pixels each
    usage = response.usage
    assert usage.input_tokens == usage.input_tokens_details.text_tokens == tokens
    assert usage.output_tokens == image_tokens
    assert usage.total_tokens == tokens + image_tokens


def test_a_stream_sends_previews_then_the_image_it_would_have_sent_whole(client):
    events = list(generate(client, stream=True, partial_images=3, seed=11, num_inference_steps=8))
    kinds = [event.type for event in events]
    assert kinds == ["image_generation.partial_image"] * 3 + ["image_generation.completed"]
    assert [event.partial_image_index for event in events[:3]] == [0, 1, 2]
    for event in events:
        assert (event.size, event.output_format, event.background) == ("64x64", "png", "opaque")
    final = decode(base64.b64decode(events[-1].b64_json))
    whole = generate(client, seed=11, num_inference_steps=8, response_format="b64_json")
    assert np.array_equal(final, b64_images(whole)[0])
    counts = lambda usage: (usage.input_tokens, usage.output_tokens)  # noqa: E731
    assert counts(events[-1].usage) == counts(whole.usage)
    # each preview is nearer the image than the one before
    previews = [decode(base64.b64decode(event.b64_json)) for event in events[:3]]
    gaps = [np.abs(preview.astype(int) - final).mean() for preview in previews]
    assert gaps[0] > gaps[1] > gaps[2] > 0, gaps


def sse_events(text: str) -> list[tuple[str | None, str]]:
    """(event name, data) of each event of an SSE body, its comments (pings) left out."""
    events = []
    for block in re.split(r"\r?\n\r?\n", text.strip()):
        lines = [line for line in re.split(r"\r?\n", block) if not line.startswith(":")]
        name = next((line[7:] for line in lines if line.startswith("event: ")), None)
        data = "\n".join(line[6:] for line in lines if line.startswith("data: "))
        if lines:
            events.append((name, data))
    return events


def test_a_stream_without_previews_is_the_image_in_one_event(http, reference):
    body = {"model": IMAGE_MODEL, "prompt": "a bowl of ramen", "stream": True, "seed": 3}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"].startswith("text/event-stream")
    events = sse_events(response.text)
    assert [name for name, _ in events] == ["image_generation.completed", None]
    assert events[-1][1] == "[DONE]"
    completed = ImageStreamEvent.model_validate_json(events[0][1])  # the documented shape
    assert (completed.type, completed.seed) == ("image_generation.completed", 3)
    image = decode(base64.b64decode(completed.b64_json))
    assert np.array_equal(image, diffusers_image(reference, "a bowl of ramen", 3))
    body |= {"stream": False, "response_format": "b64_json"}
    whole = ImagesResponse.model_validate_json(http.post("/v1/images/generations", json=body).text)
    assert whole.data[0].b64_json == completed.b64_json
    assert whole.usage == completed.usage


def test_previews_from_a_pipeline_that_makes_none_are_refused():
    request = ImageGenerationRequest(prompt="a fox", stream=True, partial_images=2)
    settings = ImageSettings(default_size="64x64", max_size="64x64")
    with pytest.raises(APIError) as info:
        request.worker_fields(settings, accepts=["guidance_scale"])  # e.g. FLUX with cpu_offload
    assert (info.value.status, info.value.param) == (400, "partial_images")
    unstreamed = ImageGenerationRequest(prompt="a fox", partial_images=2)  # OpenAI ignores it
    assert unstreamed.worker_fields(settings, accepts=[])["partial_images"] == 0


@pytest.mark.parametrize(
    ("steps", "count", "after"),
    [(4, 3, [1, 2, 3]), (8, 3, [2, 4, 6]), (28, 1, [14]), (2, 3, [1]), (1, 2, []), (4, 0, [])],
)
def test_previews_spread_over_the_steps_and_never_after_the_last(steps, count, after):
    assert preview_steps(steps, count) == after


def test_a_preview_is_the_models_prediction_of_the_image_at_its_step(flux_dir):
    """A preview decodes x - sigma * v, the image the transformer's velocity v points at from
    the step's input x; batched with an image that wants none, and leaving both images as they
    are without previews."""
    pipeline = ImagePipeline(ImageModelConfig(str(flux_dir), device="cpu", dtype="float32"))
    steps = []  # the transformer's input and output at each step

    def keep(module, args, kwargs, output) -> None:
        steps.append((kwargs["hidden_states"].clone(), output[0].clone()))

    shape = BatchShape(64, 64, 4, GUIDANCE)
    jobs = [ImageJob("a fox", 1), ImageJob("a cat", 2, partial_images=3)]
    previews = []
    hook = pipeline.pipe.transformer.register_forward_hook(keep, with_kwargs=True)
    try:
        pictures = pipeline.run(shape, jobs, lambda: False, lambda *p: previews.append(p))
    finally:
        hook.remove()
    assert [(position, index) for position, index, _ in previews] == [(1, 0), (1, 1), (1, 2)]
    sigmas = pipeline.pipe.scheduler.sigmas
    for (_, _, picture), after in zip(previews, preview_steps(4, 3)):
        x, velocity = steps[after - 1]
        predicted = x[1:2] - float(sigmas[after - 1]) * velocity[1:2]
        expected = np.asarray(pipeline.decode_flux(predicted, shape), dtype=int)
        assert np.abs(np.asarray(picture, dtype=int) - expected).max() <= 1
    alone = pipeline.run(shape, [ImageJob("a fox", 1), ImageJob("a cat", 2)], lambda: False)
    assert all(np.array_equal(np.asarray(a), np.asarray(b)) for a, b in zip(pictures, alone))


# --- bad input ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("change", "param"),
    [
        ({"prompt": ""}, "prompt"),
        ({"prompt": "   "}, "prompt"),
        ({"prompt": "x" * 32001}, "prompt"),
        ({"prompt": None}, "prompt"),
        ({"n": 0}, "n"),
        ({"n": 11}, "n"),
        ({"n": "two"}, "n"),
        ({"size": "64"}, "size"),
        ({"size": "64x"}, "size"),
        ({"size": "sixtyxfour"}, "size"),
        ({"size": "60x64"}, "size"),
        ({"size": "0x64"}, "size"),
        ({"size": "512x64"}, "size"),  # wider than max_size
        ({"size": "256x256"}, "size"),  # within max_size, beyond max_pixels
        ({"num_inference_steps": 9}, "num_inference_steps"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"response_format": "gif"}, "response_format"),
        ({"output_format": "bmp"}, "output_format"),
        ({"output_compression": 101}, "output_compression"),
        ({"quality": "ultra"}, "quality"),
        ({"style": "cartoon"}, "style"),
        ({"seed": -1}, "seed"),
        ({"seed": 2**63 - 2, "n": 3}, "seed"),  # image 2 would need 2**63
        ({"guidance_scale": -1}, "guidance_scale"),
        ({"stream": True, "n": 2}, "n"),  # a stream's events carry no image index
        ({"stream": True, "response_format": "url"}, "response_format"),
        ({"stream": True, "partial_images": 4}, "partial_images"),
        ({"stream": True, "partial_images": -1}, "partial_images"),
        ({"stream": "yes please"}, "stream"),
        ({"background": "transparent"}, "background"),
        ({"model": CHAT_MODEL}, "model"),
    ],
)
def test_bad_image_requests(http, change, param):
    body = {"model": IMAGE_MODEL, "prompt": "a fox", **change}
    response = http.post("/v1/images/generations", json=body)
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error"
    assert error["param"] == param, error
    assert error["message"]


def test_prompt_beyond_the_models_token_limit(client, http, server):
    with pytest.raises(openai.BadRequestError) as info:
        generate(client, prompt="many words " * 40)
    assert "at most 64" in str(info.value)
    # streamed too: the worker's check comes before the 200 (it was an error event after it)
    for field in ("prompt", "negative_prompt"):
        body = {"model": IMAGE_MODEL, "prompt": "a fox", "stream": True, "true_cfg_scale": 2}
        body[field] = "many words " * 40
        response = http.post("/v1/images/generations", json=body)
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert (error["param"], error["code"]) == (field, "prompt_too_long")
    assert metric(httpx.get(f"{server.url}/metrics").text, "pagoda:image_queue_length") == 0
    events = list(client.images.generate(model=IMAGE_MODEL, prompt="a fox", stream=True))
    assert events[-1].type == "image_generation.completed"


def test_prompt_at_the_token_limit_is_served_and_one_token_more_refused(client, reference):
    def counted(prompt: str) -> int:  # as FluxPipeline's T5 tokenizer counts it (end included)
        return len(reference.tokenizer_2(prompt).input_ids)

    at_limit = "fox"
    while counted(at_limit) < MAX_SEQUENCE_LENGTH:
        at_limit += " fox"
    assert counted(at_limit) == MAX_SEQUENCE_LENGTH
    assert len(generate(client, prompt=at_limit, response_format="b64_json").data) == 1
    beyond = at_limit + " fox"
    with pytest.raises(openai.BadRequestError) as info:
        generate(client, prompt=beyond)
    assert f"{counted(beyond)} tokens long" in str(info.value)


def test_unknown_model_is_404(client):
    with pytest.raises(openai.NotFoundError):
        generate(client, model="no-such-model")


@pytest.mark.filterwarnings("ignore:deprecated:DeprecationWarning")  # create_variation
def test_edits_and_variations_say_they_are_not_served(client):
    png = io.BytesIO()
    Image.new("RGB", (64, 64)).save(png, format="PNG")
    image = ("a.png", png.getvalue(), "image/png")
    calls = {
        "/v1/images/edits": lambda: client.images.edit(model=IMAGE_MODEL, image=image, prompt="x"),
        "/v1/images/variations": lambda: client.images.create_variation(image=image),
    }
    for path, call in calls.items():
        with pytest.raises(openai.NotFoundError) as info:
            call()
        message = info.value.body["message"]
        assert path in message and "/v1/images/generations" in message, message


def test_image_model_asked_for_chat(client):
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(
            model=IMAGE_MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    assert "/v1/images/generations" in str(info.value)


def test_the_key_is_required_for_generation(server):
    response = httpx.post(
        f"{server.url}/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "a fox"}
    )
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "invalid_api_key"


# --- operations --------------------------------------------------------------------------


def post_in_background(http, body: dict) -> threading.Thread:
    thread = threading.Thread(
        target=http.post, args=("/v1/images/generations",), kwargs={"json": body}
    )
    thread.start()
    return thread


def wait_for_queue(server, length: float, timeout: float = 60, poll: float = 0.05) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        text = httpx.get(f"{server.url}/metrics").text
        if metric(text, "pagoda:image_queue_length") == length:
            return
        time.sleep(poll)
    raise TimeoutError(f"the image queue never reached {length}")


def test_full_queue_answers_429_with_retry_after(server, http):
    big = {"model": IMAGE_MODEL, "prompt": "slow", "n": 10, "size": "128x128"}
    big["num_inference_steps"] = 8
    worker = threading.Thread(
        target=http.post, args=("/v1/images/generations",), kwargs={"json": big}
    )
    worker.start()
    wait_for_queue(server, 10)
    response = http.post(
        "/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "x", "n": 3}
    )
    worker.join()
    assert response.status_code == 429
    assert int(response.headers["retry-after"]) >= 1
    assert response.json()["error"]["code"] == "rate_limit_exceeded"


def test_disconnect_frees_the_batch(server, http):
    """A client that leaves: its queued images are dropped and its running batch stops
    between two denoising steps."""
    generated = "pagoda:images_generated_total"
    http.post("/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "first"})
    before = metric(httpx.get(f"{server.url}/metrics").text, generated)
    body = json.dumps(
        {"model": IMAGE_MODEL, "prompt": "abandoned", "n": 10, "size": "256x128"}
        | {"num_inference_steps": 8}
    ).encode()
    head = (
        f"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
        f"Authorization: Bearer {KEY}\r\nContent-Type: application/json\r\n"
        f"Content-Length: {len(body)}\r\n\r\n"
    ).encode()
    # the tiny pipeline makes these 10 images in a few tenths of a second on a quiet machine:
    # leave as soon as they are admitted, not after a fixed time
    with socket.create_connection(("127.0.0.1", server.port)) as connection:
        connection.sendall(head + body)
        wait_for_queue(server, 10, poll=0.002)
    wait_for_queue(server, 0)
    deadline = time.monotonic() + 60
    while "interrupted a batch" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "interrupted a batch of" in server.log()
    assert metric(httpx.get(f"{server.url}/metrics").text, generated) - before < 10
    # the worker is free again
    response = http.post("/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "next"})
    assert response.status_code == 200


def test_a_stream_whose_client_leaves_frees_its_place(server, http):
    """The client leaves at the first of three previews: the worker reads the abort when the
    second one wakes its loop, and stops the image before its last steps."""
    body = {"model": IMAGE_MODEL, "prompt": "left", "stream": True, "partial_images": 3}
    body |= {"num_inference_steps": 8, "size": "256x128"}
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if line.startswith("data: "):  # the first preview, after 2 of the 8 steps
                break
    wait_for_queue(server, 0)
    deadline = time.monotonic() + 60
    while "interrupted a batch of 1 images" not in server.log() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert "interrupted a batch of 1 images" in server.log()
    response = http.post("/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "next"})
    assert response.status_code == 200


def test_a_stream_whose_worker_dies_ends_with_an_error_event_and_the_worker_returns(server, http):
    def health() -> httpx.Response:
        return httpx.get(f"{server.url}/health", params={"model": IMAGE_MODEL}, timeout=5)

    pid = health().json()["pid"]
    body = {"model": IMAGE_MODEL, "prompt": "doomed", "stream": True, "partial_images": 3}
    body |= {"num_inference_steps": 8, "size": "256x128"}
    data = []
    with http.stream("POST", "/v1/images/generations", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: "):
                data.append(line[6:])
                if len(data) == 1:  # the first preview, 6 steps before the image
                    os.kill(pid, signal.SIGKILL)
    assert json.loads(data[0])["type"] == "image_generation.partial_image"
    assert data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert error["type"] == "service_unavailable" and "stopped" in error["message"], error
    wait_for_queue(server, 0)
    deadline = time.monotonic() + 120
    while health().status_code != 200 and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health().json()["restarts"] == 1
    response = http.post("/v1/images/generations", json={"model": IMAGE_MODEL, "prompt": "next"})
    assert response.status_code == 200


def test_a_streamed_image_counts_in_the_metrics_as_one_image(server, client):
    before = httpx.get(f"{server.url}/metrics").text
    events = list(generate(client, stream=True, partial_images=1, seed=5))
    assert len(events) == 2  # a preview and the image
    after = httpx.get(f"{server.url}/metrics").text
    for name, grew in (("images_generated_total", 1), ("image_steps_total", STEPS)):
        assert metric(after, f"pagoda:{name}") == metric(before, f"pagoda:{name}") + grew
    assert metric(after, "pagoda:image_queue_length") == 0


def test_metrics_and_startup_log(server, client):
    before = httpx.get(f"{server.url}/metrics").text
    generate(client, n=2, seed=1)
    after = httpx.get(f"{server.url}/metrics").text
    generated = "pagoda:images_generated_total"
    assert metric(after, generated) == metric(before, generated) + 2
    steps = "pagoda:image_steps_total"
    assert metric(after, steps) == metric(before, steps) + 2 * STEPS
    latency = "pagoda:image_request_latency_seconds_count"
    assert metric(after, latency) == metric(before, latency) + 1
    # both images came from one pipeline call, which took part of the request's time
    pipeline = "pagoda:image_pipeline_seconds"
    assert metric(after, f"{pipeline}_count") == metric(before, f"{pipeline}_count") + 2
    call = (metric(after, f"{pipeline}_sum") - metric(before, f"{pipeline}_sum")) / 2
    request = metric(after, "pagoda:image_request_latency_seconds_sum") - metric(
        before, "pagoda:image_request_latency_seconds_sum"
    )
    assert 0 < call < request
    assert metric(after, "pagoda:image_queue_length") == 0
    # the worker's own gauges, as a chat model's: images in its batch and queued (its stats
    # come at most a second late, during a batch)
    assert metric(after, "pagoda:num_requests_running") in (0, 1, 2)
    assert metric(after, "pagoda:num_requests_waiting") == 0
    assert re.search(
        rf"serving {IMAGE_MODEL}: FluxPipeline on cpu \(float32\), loaded in", server.log()
    )


def test_image_stats_feed_the_running_and_waiting_gauges():
    metrics = Metrics(dict, lambda: {IMAGE_MODEL: {"running": 2, "waiting": 3}})
    text = metrics.render().decode()
    assert metric(text, "pagoda:num_requests_running") == 2
    assert metric(text, "pagoda:num_requests_waiting") == 3
    assert "pagoda:kv_cache_usage_perc{" not in text  # a chat engine's gauge only


def test_public_url_names_the_proxy(catalog, tmp_path):
    args = ["--catalog", str(catalog), "--image-dir", str(tmp_path), "--image-url-ttl", "600"]
    srv = Server([*args, "--public-url", "https://images.example.com/pagoda/"]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        url = generate(client, seed=2).data[0].url
        prefix = "https://images.example.com/pagoda/v1/images/files/"
        assert url.startswith(prefix)
        name = url.removeprefix(prefix)
        assert (tmp_path / name).is_file()
        assert httpx.get(f"{srv.url}/v1/images/files/{name}").status_code == 200
    finally:
        assert srv.stop() == 0, srv.log()


def test_image_urls_stay_served_while_the_server_drains(catalog, tmp_path):
    """SIGTERM with a request in flight: the server drains, refusing new work with a 503 (the
    balancer sends it elsewhere), but a URL it gave out still serves its image, which no other
    server has (it answered 503 'retry on another one')."""
    srv = Server(["--catalog", str(catalog), "--image-dir", str(tmp_path)]).wait_ready()
    try:
        client = openai.OpenAI(base_url=f"{srv.url}/v1", api_key="none", max_retries=0)
        url = generate(client, seed=4).data[0].url
        # a request in flight for the drain to wait on: its body is still coming
        with socket.create_connection(("127.0.0.1", srv.port)) as in_flight:
            in_flight.sendall(
                b"POST /v1/images/generations HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{"
            )
            time.sleep(0.5)  # its headers reach the app
            srv.process.send_signal(signal.SIGTERM)
            deadline = time.monotonic() + 30
            while httpx.get(f"{srv.url}/health").status_code != 503:
                assert time.monotonic() < deadline, srv.log()
                time.sleep(0.05)
            assert "1 requests in flight" in srv.log()
            fetched = httpx.get(url)
            assert fetched.status_code == 200, fetched.text
            assert decode(fetched.content).shape == (64, 64, 3)
            late = httpx.post(f"{srv.url}/v1/images/generations", json={"prompt": "late"})
            assert late.status_code == 503
    finally:
        assert srv.stop() == 0, srv.log()


def test_a_second_server_on_the_same_image_dir_fails_at_once(server, catalog):
    second = Server(["--catalog", str(catalog), "--image-dir", str(server.image_dir)])
    try:
        assert second.process.wait(timeout=60) == 1
    finally:
        second.stop()  # if it started after all
    log = second.log()
    assert "is in use by another pagoda server: give each server its own --image-dir" in log
    assert "serving" not in log and "Traceback" not in log  # no model was loaded


# -- the worker itself, in this process --------------------------------------------------------


@pytest.fixture
def worker(flux_dir) -> ImageWorker:
    return ImageWorker(ImageModelConfig(str(flux_dir), device="cpu", dtype="float32"))


def add(worker: ImageWorker, request_id: str, n: int, seed: int) -> None:
    fields = {"prompt": "a red fox", "n": n, "height": 64, "width": 64, "steps": STEPS}
    worker.add(request_id, {**fields, "guidance_scale": GUIDANCE, "seed": seed})


def finish(worker: ImageWorker) -> list[list]:
    outputs = []
    while worker.has_work():
        outputs += worker.step()
    return outputs


def test_a_batch_waits_for_the_last_batchs_clients_not_for_a_single_one(worker):
    worker.gather.max_s, worker.gather.share = 60.0, 1e6  # long enough on a busy machine
    add(worker, "four", 4, seed=0)
    assert [output[5] for output in finish(worker)] == [4] * 4
    add(worker, "first-back", 1, seed=10)  # one of the four clients is back
    assert worker.step() == [] and worker.running is None  # it waits for the other three
    add(worker, "the-others", 3, seed=20)
    assert [output[5] for output in finish(worker)] == [4] * 4
    worker.gather.max_s = 0.0  # no one else comes back
    add(worker, "alone", 1, seed=30)
    assert [output[5] for output in finish(worker)] == [1]
    worker.gather.max_s = 60.0
    add(worker, "alone-again", 1, seed=31)  # one client: its next batch starts at once
    worker.step()
    assert not worker.waiting  # its batch has started (or even finished)


def test_images_that_waited_through_a_batch_count_beside_its_returning_clients(worker):
    worker.gather.max_s, worker.gather.share = 60.0, 1e6
    add(worker, "three", 3, seed=0)
    worker.step()  # the batch of three starts
    add(worker, "fourth", 1, seed=10)  # a fourth client's request arrives while it runs
    outputs = []
    while not outputs:
        outputs = worker.step()
    assert [output[5] for output in outputs] == [3] * 3
    add(worker, "two-back", 2, seed=20)  # two of the three clients are back: three wait
    assert worker.step() == [] and worker.running is None  # it waits for the third as well
    add(worker, "third-back", 1, seed=30)
    assert [output[5] for output in finish(worker)] == [4] * 4


def test_the_thread_governor_reaches_the_pipeline_thread(worker):
    if worker.governor is None:
        pytest.skip("one CPU thread: no governor")
    worker.governor.threads = 1  # what it decides while other processes keep a core busy
    add(worker, "busy", 1, seed=0)
    finish(worker)
    assert worker._executor.submit(torch.get_num_threads).result() == 1


LONG_PROMPT_RUN = """
import sys
from pagoda.engine.image_pipeline import BatchShape, ImageJob, ImageModelConfig, ImagePipeline
from pagoda.logs import LogSettings, setup_logging
setup_logging(LogSettings(format="json"))  # as an image worker's process starts
pipeline = ImagePipeline(ImageModelConfig(sys.argv[1], device="cpu", dtype="float32"))
pipeline.run(BatchShape(64, 64, 1, 3.5), [ImageJob(sys.argv[2], 0)], lambda: False)
"""


def test_diffusers_logs_in_the_servers_format_without_the_prompts_words(flux_dir):
    """FLUX's CLIP encoder takes 77 tokens of a prompt that T5 takes whole; diffusers warns with
    the words it cut. That warning came through diffusers' own handler: a plain line in a JSON
    log, with the prompt's words in it (prompts are logged only with --log-requests)."""
    prompt = "a lighthouse at dusk " * 8 + "hiddentail"  # about 170 CLIP tokens, under T5's 512
    run = [sys.executable, "-c", LONG_PROMPT_RUN, str(flux_dir), prompt]
    done = subprocess.run(run, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    lines = [json.loads(line) for line in done.stderr.splitlines()]  # each one a JSON object
    cut = [line for line in lines if "truncated because CLIP" in line["message"]]
    assert len(cut) == 1 and cut[0]["level"] == "WARNING", lines
    assert "hiddentail" not in done.stderr and "lighthouse" not in done.stderr
    assert "Loading pipeline components" not in done.stderr  # no bar where no terminal is


def test_the_worker_loads_its_pipeline_in_the_thread_that_runs_it(flux_dir, monkeypatch):
    """All of an image worker's torch work in one thread: libgomp keeps an OpenMP pool per thread
    that ran a parallel region, and with two its threads outnumber two cores and sleep between
    regions (a large model's load has parallel regions)."""
    loaded_in = []

    class RecordingPipeline(ImagePipeline):
        def __init__(self, config: ImageModelConfig) -> None:
            loaded_in.append(threading.get_ident())
            super().__init__(config)

    monkeypatch.setattr(image_worker, "ImagePipeline", RecordingPipeline)
    worker = ImageWorker(ImageModelConfig(str(flux_dir), device="cpu", dtype="float32"))
    add(worker, "one", 1, seed=0)
    assert len(finish(worker)) == 1
    assert loaded_in == [worker._executor.submit(threading.get_ident).result()]


def test_each_images_previews_come_before_it_in_order_and_only_for_streams(worker, monkeypatch):
    """Two streamed requests with previews batched with one without: a slow preview encoder
    (the pipeline's next steps do not wait for it) still delivers them all, each before its
    image, in index order."""
    encode = image_worker.encode_request_image

    def slow_encode(picture, request):
        time.sleep(0.05)
        return encode(picture, request)

    worker.gather.max_s = 0.0
    fields = {"prompt": "a red fox", "n": 1, "height": 64, "width": 64, "steps": 8}
    fields |= {"guidance_scale": GUIDANCE}
    for request_id, partial_images, seed in (("a", 3, 1), ("plain", 0, 2), ("b", 2, 3)):
        worker.add(request_id, fields | {"seed": seed, "partial_images": partial_images})
    monkeypatch.setattr(image_worker, "encode_request_image", slow_encode)
    outputs = finish(worker)
    order = [(output[0], output[7]) for output in outputs]
    for request_id, previews in (("a", [0, 1, 2]), ("b", [0, 1])):
        mine = [index for rid, index in order if rid == request_id]
        assert mine == [*previews, None], order
    assert [index for rid, index in order if rid == "plain"] == [None]
    assert {output[5] for output in outputs} == {3}  # one batch


def test_a_batch_that_fails_after_a_preview_sends_the_preview_then_the_error(worker, monkeypatch):
    """Out of memory midway, say: the preview already made goes out, then the image's error;
    the worker serves the next request."""
    run = worker.pipeline.run

    def failing_run(shape, jobs, stop, on_partial=None):
        on_partial(0, 0, Image.new("RGB", (shape.width, shape.height)))
        raise RuntimeError("out of memory")

    worker.gather.max_s = 0.0
    fields = {"prompt": "a red fox", "n": 1, "height": 64, "width": 64, "steps": 4}
    fields |= {"guidance_scale": GUIDANCE, "seed": 1, "partial_images": 1}
    worker.add("failed", fields)
    monkeypatch.setattr(worker.pipeline, "run", failing_run)
    preview, failure = finish(worker)
    assert (preview[0], preview[4], preview[7]) == ("failed", None, 0)
    assert decode(preview[3]).shape == (64, 64, 3)
    assert failure[0] == "failed" and failure[3] is None and "out of memory" in failure[4]
    monkeypatch.setattr(worker.pipeline, "run", run)
    worker.add("next", fields | {"partial_images": 0})
    (image,) = finish(worker)
    assert (image[0], image[4], image[7]) == ("next", None, None)
