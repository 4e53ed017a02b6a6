"""The body of /v1/images/generations (OpenAI's images API plus the extensions image servers
offer), and its resolution against an image model's catalog settings into the worker's fields.

Every malformed body becomes an `APIError` 400 naming the field to blame (protocol.parse_body).
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)

from pagoda.server.catalog import ImageSettings, parse_image_size
from pagoda.server.errors import invalid
from pagoda.server.protocol import drop_nulls

MAX_IMAGES = 10  # n, as OpenAI's API allows
MAX_PROMPT_CHARS = 32000  # gpt-image-1's limit; the model's own token limit is checked too
SEED_MAX = 2**63 - 1


class ImageGenerationRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    prompt: str = Field(max_length=MAX_PROMPT_CHARS)
    model: str | None = None  # None: the server's first image model
    n: int = Field(1, ge=1, le=MAX_IMAGES)
    size: str = "auto"
    quality: Literal["auto", "standard", "hd", "low", "medium", "high"] = "auto"
    style: Literal["vivid", "natural"] | None = None  # accepted, no effect
    response_format: Literal["url", "b64_json"] = "url"
    output_format: Literal["png", "jpeg", "webp"] = "png"
    output_compression: int = Field(100, ge=0, le=100)  # jpeg and webp quality
    background: Literal["auto", "opaque", "transparent"] = "auto"
    moderation: Literal["auto", "low"] = "auto"  # accepted, no effect
    stream: bool = False
    partial_images: int = Field(0, ge=0, le=3)  # previews a stream sends before its image
    user: str | None = None
    # extensions (diffusers' names)
    seed: int | None = Field(None, ge=0, le=SEED_MAX)
    num_inference_steps: int | None = Field(None, ge=1)
    guidance_scale: float | None = Field(None, ge=0, le=100)
    negative_prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS)
    true_cfg_scale: float | None = Field(None, ge=1, le=100)

    @model_validator(mode="before")
    @classmethod
    def _null_means_default(cls, data: Any) -> Any:
        return drop_nulls(cls, data)

    @field_validator("prompt")
    @classmethod
    def _prompt(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must not be empty")
        return value

    @field_validator("size")
    @classmethod
    def _size(cls, value: str) -> str:
        if value != "auto":
            parse_image_size(value)
        return value

    @field_validator("seed")
    @classmethod
    def _seed(cls, value: int | None, info: ValidationInfo) -> int | None:
        n = info.data.get("n", 1)
        if value is not None and value + n - 1 > SEED_MAX:  # image i uses seed + i
            raise ValueError(
                f"must be at most {SEED_MAX - n + 1} with n={n} (image i uses seed + i)"
            )
        return value

    @field_validator("background")
    @classmethod
    def _opaque(cls, value: str) -> str:
        if value == "transparent":
            raise ValueError("transparent backgrounds are not supported")
        return value

    def steps(self, settings: ImageSettings) -> int:
        """num_inference_steps, else the quality's: low halves the model's default steps,
        high and hd double them (up to max_steps), the others keep them."""
        if self.num_inference_steps is not None:
            return self.num_inference_steps
        default = settings.default_steps
        if self.quality == "low":
            return max(1, default // 2)
        if self.quality in ("high", "hd"):
            return min(2 * default, settings.max_steps)
        return default

    @property
    def quality_used(self) -> str:
        """What the response reports: the quality asked for, in OpenAI's response values."""
        return {"low": "low", "high": "high", "hd": "high"}.get(self.quality, "medium")

    def worker_fields(self, settings: ImageSettings, accepts: list[str]) -> dict[str, Any]:
        """The image worker's request (engine.image_worker.ImageRequest), checked against the
        model's limits and what its pipeline takes."""
        size = settings.default_size if self.size == "auto" else self.size
        width, height = parse_image_size(size)
        if not settings.allows_size(width, height):
            raise invalid(
                f"size: {size} is beyond this model's limit (at most {settings.max_size}, "
                f"{settings.pixel_limit()} pixels)",
                param="size",
            )
        steps = self.steps(settings)
        if steps > settings.max_steps:
            raise invalid(
                f"num_inference_steps: at most {settings.max_steps} for this model, got {steps}",
                param="num_inference_steps",
            )
        for name in ("guidance_scale", "negative_prompt", "true_cfg_scale"):
            if getattr(self, name) is not None and name not in accepts:
                raise invalid(f"{name}: this model's pipeline does not take it", param=name)
        if self.stream:
            self._check_stream(accepts)
        guidance = settings.default_guidance if self.guidance_scale is None else self.guidance_scale
        negative = self.negative_prompt
        if negative is None and self.true_cfg_scale is not None and self.true_cfg_scale > 1:
            # guided against the empty prompt, as classifier-free guidance is: diffusers would
            # drop true CFG without a negative prompt, and the field would do nothing
            negative = ""
        return {
            "prompt": self.prompt,
            "n": self.n,
            "height": height,
            "width": width,
            "steps": steps,
            "guidance_scale": guidance,
            "seed": self.seed,
            "negative_prompt": negative,
            "true_cfg_scale": self.true_cfg_scale,
            "output_format": self.output_format,
            "output_compression": self.output_compression,
            "partial_images": self.partial_images if self.stream else 0,
        }

    def _check_stream(self, accepts: list[str]) -> None:
        if self.n > 1:  # the stream's events carry no image index
            raise invalid(f"n: a streamed request makes one image, got {self.n}", param="n")
        if self.response_format == "url" and "response_format" in self.model_fields_set:
            raise invalid(
                "response_format: streamed images come as b64_json, not url",
                param="response_format",
            )
        if self.partial_images and "partial_images" not in accepts:
            raise invalid(
                "partial_images: this model's pipeline does not make previews (FLUX does, "
                "without cpu_offload)",
                param="partial_images",
            )
