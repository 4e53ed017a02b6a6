"""An image model that is not FLUX: a tiny random Stable Diffusion pipeline, loaded by
`DiffusionPipeline.from_pretrained` in its worker, served by a real `pagoda serve` and checked
against diffusers' own pipeline on the same weights and seeds."""

from __future__ import annotations

import base64
import io
from pathlib import Path

import numpy as np
import openai
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)
from PIL import Image

from tests.serving import Server
from tests.tiny_flux import WIDTH, clip_tokenizer, tiny_clip_encoder, tiny_vae

MODEL = "test-org/tiny-sd"
STEPS = 3


def build_tiny_sd(folder: Path, seed: int = 0) -> Path:
    """A random StableDiffusionPipeline saved as a diffusers folder: CLIP of width 32, a UNet of
    two blocks, a VAE with 4 latent channels and 8x downsampling (sizes: multiples of 16)."""
    torch.manual_seed(seed)
    tokenizer = clip_tokenizer()
    text_encoder = tiny_clip_encoder(tokenizer)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=1,
        block_out_channels=(8, 16),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=WIDTH,
        attention_head_dim=4,
        norm_num_groups=4,
    )
    vae = tiny_vae(latent_channels=4)
    pipeline = StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def sd_dir(tmp_path_factory) -> Path:
    return build_tiny_sd(tmp_path_factory.mktemp("tiny_sd") / "sd")


@pytest.fixture(scope="module")
def server(sd_dir, tmp_path_factory):
    catalog = tmp_path_factory.mktemp("sd_catalog") / "models.yaml"
    catalog.write_text(
        f"models:\n  - id: {MODEL}\n    kind: image\n    source: {sd_dir}\n"
        "    engine:\n      dtype: float32\n      device: cpu\n"
        f"    image:\n      default_size: 64x64\n      max_size: 128x128\n"
        f"      default_steps: {STEPS}\n      max_steps: 8\n      default_guidance: 1.0\n"
    )
    srv = Server(["--catalog", str(catalog)]).wait_ready()
    yield srv
    assert srv.stop() == 0, srv.log()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference(sd_dir) -> StableDiffusionPipeline:
    pipe = StableDiffusionPipeline.from_pretrained(sd_dir, dtype=torch.float32)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def decode(b64: str) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(base64.b64decode(b64))).convert("RGB"))


def generate(client: openai.OpenAI, **extensions) -> openai.types.ImagesResponse:
    prompt = "a lighthouse at dusk"
    return client.images.generate(
        model=MODEL, prompt=prompt, response_format="b64_json", extra_body=extensions
    )


def test_served_by_its_own_pipeline_class(server):
    assert f"serving {MODEL}: StableDiffusionPipeline on cpu (float32)" in server.log()


def test_the_image_equals_diffusers_on_the_same_seed(client, reference):
    served = decode(generate(client, seed=7).data[0].b64_json)
    expected = reference(
        "a lighthouse at dusk",
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=1.0,  # no classifier-free guidance: one row a step, as in the server
        generator=torch.Generator("cpu").manual_seed(7),
    ).images[0]
    assert np.array_equal(served, np.asarray(expected))


def test_its_pipeline_takes_a_negative_prompt_and_guidance(client):
    plain = decode(generate(client, seed=3, guidance_scale=5.0).data[0].b64_json)
    negative = generate(client, seed=3, guidance_scale=5.0, negative_prompt="fog")
    assert not np.array_equal(plain, decode(negative.data[0].b64_json))
    assert negative.usage.input_tokens == negative.usage.output_tokens == 0  # FLUX only


def test_what_only_flux_takes_is_refused(client):
    with pytest.raises(openai.BadRequestError) as refused:
        generate(client, true_cfg_scale=2.0)
    assert refused.value.body["param"] == "true_cfg_scale"
    with pytest.raises(openai.BadRequestError) as refused:
        client.images.generate(model=MODEL, prompt="a fox", stream=True, partial_images=2)
    assert refused.value.body["param"] == "partial_images"


def test_it_streams_its_image_in_one_event(client):
    stream = client.images.generate(
        model=MODEL, prompt="a lighthouse at dusk", stream=True, extra_body={"seed": 5}
    )
    events = list(stream)
    assert [event.type for event in events] == ["image_generation.completed"]
    whole = decode(generate(client, seed=5).data[0].b64_json)
    assert np.array_equal(decode(events[0].b64_json), whole)


def test_a_prompt_beyond_clips_77_tokens_is_cut_as_diffusers_cuts_it(client, reference):
    prompt = "fox " * 100
    served = client.images.generate(
        model=MODEL, prompt=prompt, response_format="b64_json", extra_body={"seed": 1}
    )
    expected = reference(
        prompt,
        height=64,
        width=64,
        num_inference_steps=STEPS,
        guidance_scale=1.0,
        generator=torch.Generator("cpu").manual_seed(1),
    ).images[0]
    assert np.array_equal(decode(served.data[0].b64_json), np.asarray(expected))
