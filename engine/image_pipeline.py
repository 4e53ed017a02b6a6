"""A diffusers text-to-image pipeline on its device, run on batches of images that share their
size, steps and guidance, with one seeded generator per image."""

from __future__ import annotations

import contextlib
import inspect
import logging
from collections.abc import Callable
from dataclasses import dataclass
from types import MethodType
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from PIL.Image import Image

from pagoda.engine.config import DTYPES
from pagoda.engine.worker import Rejected
from pagoda.logs import route_diffusers_logs

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline

logger = logging.getLogger(__name__)

# FluxPipeline refuses longer T5 prompts; other pipelines truncate theirs (CLIP's 77 tokens).
FLUX_MAX_SEQUENCE_LENGTH = 512
# request fields that only some pipelines' __call__ take
OPTIONAL_FIELDS = {"guidance_scale", "negative_prompt", "true_cfg_scale"}


@dataclass
class ImageModelConfig:
    model: str  # a hub id or a local diffusers folder
    revision: str | None = None  # a hub id's commit (server/catalog.py resolve_revision)
    device: str = "auto"
    dtype: str = "auto"  # auto: bfloat16 on a GPU, float32 on a CPU
    cpu_offload: bool = False  # enable_model_cpu_offload: one component on the GPU at a time
    vae_tiling: bool = False  # decode large images tile by tile
    max_batch_size: int = 4  # images per pipeline call
    max_sequence_length: int | None = None  # FLUX's T5 prompt tokens (default: 512)
    # CPU threads; None: torch's default, fewer while other processes keep cores busy
    cpu_threads: int | None = None

    def resolve_device(self) -> torch.device:
        if self.device == "auto":
            return torch.device("cuda" if torch.cuda.is_available() else "cpu")
        return torch.device(self.device)

    def resolve_dtype(self, device: torch.device) -> torch.dtype:
        if self.dtype == "auto":
            return torch.float32 if device.type == "cpu" else torch.bfloat16
        if self.dtype not in DTYPES:
            raise ValueError(f"dtype must be 'auto' or one of {sorted(DTYPES)}, got {self.dtype!r}")
        return DTYPES[self.dtype]


@dataclass(slots=True)
class BatchShape:
    """What the images of one pipeline call must share."""

    height: int
    width: int
    steps: int
    guidance_scale: float
    true_cfg_scale: float | None = None
    negative: bool = False  # every image of the batch has a negative prompt, or none has


@dataclass(slots=True)
class ImageJob:
    prompt: str
    seed: int
    negative_prompt: str | None = None
    partial_images: int = 0  # previews to decode on the way (0-3)


StepCallback = Callable[[], bool]  # called after every denoising step; True: stop the batch
# a preview: the job's position in the batch, the preview's index, the picture
PartialCallback = Callable[[int, int, Image], None]


class ImagePipeline:
    def __init__(self, config: ImageModelConfig) -> None:
        self.config = config
        self.device = config.resolve_device()
        self.dtype = config.resolve_dtype(self.device)
        pipeline_class = _pipeline_class(config.model, config.revision)
        self.pipe = pipeline_class.from_pretrained(
            config.model, revision=config.revision, dtype=self.dtype
        )
        if self.device.type == "cpu":
            make_batch_invariant(self.pipe)
        if config.cpu_offload and self.device.type != "cpu":
            self.pipe.enable_model_cpu_offload(device=self.device)
        else:
            self.pipe.to(self.device)
        if config.vae_tiling:
            self.pipe.vae.enable_tiling()
        self.pipe.set_progress_bar_config(disable=True)
        # read once: diffusers finds it by walking every module of every component (1-2 ms a
        # call on the tiny test pipeline, 6% of its 64x64 image), and it does not change
        self.generator_device = self.pipe._execution_device
        self.is_flux = pipeline_class.__name__ == "FluxPipeline"
        self.call_params = set(inspect.signature(self.pipe.__call__).parameters)
        self.max_sequence_length = config.max_sequence_length
        if self.is_flux and self.max_sequence_length is None:
            self.max_sequence_length = FLUX_MAX_SEQUENCE_LENGTH

    def info(self) -> dict:
        return {
            "pipeline": type(self.pipe).__name__,
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "max_batch_size": self.config.max_batch_size,
            "max_sequence_length": self.max_sequence_length,
            # the request fields this pipeline's __call__ takes beyond the ones all take
            "accepts": sorted(
                self.call_params & {"guidance_scale", "negative_prompt", "true_cfg_scale"}
            )
            + (["partial_images"] if self.makes_previews else []),
        }

    @property
    def makes_previews(self) -> bool:
        """FLUX only: its previews come from its flow's velocity (see PartialImages). Not
        with model CPU offload, where each preview's VAE decode would swap the transformer
        out of the GPU and back."""
        return self.is_flux and not (self.config.cpu_offload and self.device.type != "cpu")

    def image_tokens(self, shape: BatchShape) -> int:
        """The image tokens the denoiser makes for one image: FLUX's latent patches (one per
        16x16 pixels); 0 for other pipelines, whose denoisers do not work on tokens."""
        if not self.is_flux:
            return 0
        patch = 2 * self.pipe.vae_scale_factor
        return (shape.height // patch) * (shape.width // patch)

    def check_prompt(self, prompt: str, param: str) -> int:
        """The prompt's tokens in FLUX's T5 encoder (0 for other pipelines, which truncate),
        or Rejected where T5 would have to cut it."""
        if not self.is_flux:
            return 0
        tokenizer = self.pipe.tokenizer_2
        # a fast tokenizer's own encoder: one call, where transformers' wrapper around it took
        # twice as long (0.25 ms against 0.12 right after a pipeline call, on the request's way)
        backend = getattr(tokenizer, "backend_tokenizer", None)
        ids = backend.encode(prompt).ids if backend is not None else tokenizer(prompt).input_ids
        count = len(ids)
        if count > self.max_sequence_length:
            raise Rejected(
                f"{param}: {count} tokens long; this model takes at most "
                f"{self.max_sequence_length}",
                code="prompt_too_long",
                param=param,
            )
        return count

    def run(
        self,
        shape: BatchShape,
        jobs: list[ImageJob],
        stop: StepCallback,
        on_partial: PartialCallback | None = None,
    ) -> list[Image]:
        """One pipeline call: the images in the order of `jobs` (or fewer, if `stop` said so).
        `on_partial` gets the previews the jobs ask for, as they are made."""
        kwargs = {
            "prompt": [job.prompt for job in jobs],
            "height": shape.height,
            "width": shape.width,
            "num_inference_steps": shape.steps,
            "generator": [torch.Generator(self.generator_device).manual_seed(j.seed) for j in jobs],
            "output_type": "pil",
        }
        if "guidance_scale" in self.call_params:
            kwargs["guidance_scale"] = shape.guidance_scale
        if shape.negative:
            kwargs["negative_prompt"] = [job.negative_prompt for job in jobs]
        if shape.true_cfg_scale is not None:
            kwargs["true_cfg_scale"] = shape.true_cfg_scale
        if self.is_flux:
            kwargs["max_sequence_length"] = self.max_sequence_length
        previews = None
        if on_partial is not None and self.makes_previews and any(j.partial_images for j in jobs):
            previews = PartialImages(self, shape, jobs, on_partial)
        if "callback_on_step_end" in self.call_params:
            kwargs["callback_on_step_end"] = _step_callback(stop, previews)
        with torch.inference_mode(), previews or contextlib.nullcontext():
            return self.pipe(**kwargs).images

    @torch.inference_mode()
    def decode_flux(self, latents: torch.Tensor, shape: BatchShape) -> Image:
        """One image's packed FLUX latents to a picture, as FluxPipeline decodes its output."""
        pipe, vae = self.pipe, self.pipe.vae
        latents = pipe._unpack_latents(latents, shape.height, shape.width, pipe.vae_scale_factor)
        latents = latents / vae.config.scaling_factor + vae.config.shift_factor
        image = vae.decode(latents.to(vae.dtype), return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type="pil")[0]


def preview_steps(steps: int, count: int) -> list[int]:
    """After how many of `steps` denoising steps each of `count` previews is decoded: evenly
    spread, none after the last step (that is the image itself). Fewer when the steps are
    fewer (OpenAI's API says the final image may come before all the partial ones)."""
    after = {steps * (k + 1) // (count + 1) for k in range(count)}
    return sorted(s for s in after if 1 <= s < steps)


class PartialImages:
    """FLUX's previews during one pipeline call, as the context of that call.

    FLUX's flow runs from noise (sigma 1) to the image (sigma 0): x = (1 - sigma) x0 +
    sigma noise, and the transformer predicts the velocity v = noise - x0, so x0 = x - sigma v.
    A step moves x by (sigma_next - sigma) v. The step's input (the transformer's hidden
    states, kept by a forward pre-hook) and its output (the step callback's latents) give v,
    and so the image the model sees at that point: far sharper than decoding the noisy
    latents. Nothing here writes to the pipeline's tensors: the final images stay the same."""

    def __init__(
        self,
        pipeline: ImagePipeline,
        shape: BatchShape,
        jobs: list[ImageJob],
        emit: PartialCallback,
    ) -> None:
        self.pipeline, self.shape, self.emit = pipeline, shape, emit
        self.wanted = {  # job position -> the step counts after which it gets a preview
            i: preview_steps(shape.steps, job.partial_images)
            for i, job in enumerate(jobs)
            if job.partial_images
        }
        self.step_input: torch.Tensor | None = None
        self._hook = None

    def __enter__(self) -> PartialImages:
        transformer = self.pipeline.pipe.transformer
        self._hook = transformer.register_forward_pre_hook(self._keep_input, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        self._hook.remove()

    def _keep_input(self, module, args, kwargs) -> None:
        self.step_input = kwargs["hidden_states"]

    def after_step(self, done: int, latents: torch.Tensor) -> None:
        """`done` steps are done; `latents` is the batch's state after them."""
        due = [(i, steps.index(done)) for i, steps in self.wanted.items() if done in steps]
        if not due or self.step_input is None:
            return
        sigmas = self.pipeline.pipe.scheduler.sigmas
        sigma, sigma_next = float(sigmas[done - 1]), float(sigmas[done])
        x_next = latents.float()
        velocity = (x_next - self.step_input.float()) / (sigma_next - sigma)
        for i, index in due:
            x0 = x_next[i : i + 1] - sigma_next * velocity[i : i + 1]
            self.emit(i, index, self.pipeline.decode_flux(x0, self.shape))


def make_batch_invariant(pipe: DiffusionPipeline) -> None:
    """Make every image of a batch come out as it would alone, bit for bit (on CPU, fp32).

    Batched, two computations differ in the last bits from a batch of one: the linears on
    per-image vectors (timestep, guidance and pooled-text embeddings, AdaLN modulations),
    where one row takes BLAS's matrix-vector path and several its matrix-matrix one; and the
    VAE's convolutions, whose kernels depend on the batch. Rounded to 8 bits a pixel then
    flips now and then. Those linears are tiny (one row per image), so running them row by
    row costs nothing; the VAE decodes one image at a time (its slicing mode)."""
    for component in pipe.components.values():
        if isinstance(component, torch.nn.Module):
            for module in component.modules():
                if isinstance(module, torch.nn.Linear):
                    module.forward = MethodType(_row_by_row_linear, module)
    vae = getattr(pipe, "vae", None)
    if vae is not None and hasattr(vae, "enable_slicing"):
        vae.enable_slicing()


def _row_by_row_linear(self: torch.nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if x.dim() == 2 and x.shape[0] > 1:
        return torch.cat([F.linear(row, self.weight, self.bias) for row in x.split(1)])
    return F.linear(x, self.weight, self.bias)


def _pipeline_class(model: str, revision: str | None) -> type[DiffusionPipeline]:
    """FluxPipeline for FLUX.1 folders, whatever DiffusionPipeline picks for the others."""
    # imported here, in the worker: the server process never needs diffusers (seconds of
    # imports, and transformers' warnings before logging is set up)
    from diffusers import DiffusionPipeline, FluxPipeline

    route_diffusers_logs()
    name = DiffusionPipeline.load_config(model, revision=revision).get("_class_name")
    return FluxPipeline if name == "FluxPipeline" else DiffusionPipeline


def _step_callback(stop: StepCallback, previews: PartialImages | None):
    def callback(pipe, step: int, timestep, callback_kwargs: dict) -> dict:
        if stop():
            pipe._interrupt = True  # the pipeline skips the remaining steps
        elif previews is not None:
            previews.after_step(step + 1, callback_kwargs["latents"])
        return callback_kwargs

    return callback
