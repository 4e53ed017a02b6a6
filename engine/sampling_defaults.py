"""The sampling parameters a request leaves unset: the ones the model's authors recommend in its
generation_config.json (Qwen3: temperature 0.6, top_p 0.95, top_k 20), as vLLM's
`--generation-config auto` does, else OpenAI's.

`generation_config` names where they come from: "auto" (the model's folder), "vllm" (nowhere:
OpenAI's defaults, vLLM's name for it) or a folder holding a generation_config.json.
`override_generation_config` sets or replaces single values, under Hugging Face's names.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from pagoda.engine.sampling_params import SamplingParams

# the request fields that take a default, named alike in a generation_config.json, where the
# output length is max_new_tokens (max_tokens here)
SAMPLING_FIELDS = (
    "temperature",
    "top_p",
    "top_k",
    "min_p",
    "repetition_penalty",
    "presence_penalty",
    "frequency_penalty",
)
OVERRIDABLE = (*SAMPLING_FIELDS, "max_new_tokens")


def sampling_defaults(
    model_folder: Path | None, generation_config: str, overrides: dict[str, Any] | None
) -> dict[str, Any]:
    """The request fields' defaults, under the request's names. `model_folder` is None where
    the model has no generation_config.json of its own (a .gguf file)."""
    _check_overrides(overrides)
    if generation_config == "vllm":
        values = {}
    elif generation_config == "auto":
        values = _read(model_folder) if model_folder is not None else {}
    else:
        values = _read(Path(generation_config))
        if not values:
            raise ValueError(
                f"generation_config {generation_config!r}: no generation_config.json there"
            )
    values.update(overrides or {})
    defaults = {name: values[name] for name in SAMPLING_FIELDS if values.get(name) is not None}
    if values.get("max_new_tokens") is not None:
        defaults["max_tokens"] = values["max_new_tokens"]
    try:
        SamplingParams(**defaults)
    except (TypeError, ValueError) as exc:
        raise ValueError(f"sampling defaults {defaults} from the generation config: {exc}") from exc
    return defaults


def max_tokens_cap(
    defaults: dict[str, Any], generation_config: str, overrides: dict[str, Any] | None
) -> int | None:
    """The most tokens a served request may have, whatever it asks, as vLLM caps them: the
    default max_tokens where an operator set it (an override's max_new_tokens, or that of a
    generation_config folder named); the model's own generation_config.json ("auto") sets a
    default only."""
    if "max_new_tokens" in (overrides or {}) or generation_config not in ("auto", "vllm"):
        return defaults.get("max_tokens")
    return None


def _check_overrides(overrides: dict[str, Any] | None) -> None:
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(OVERRIDABLE))
    if unknown:
        known = ", ".join(OVERRIDABLE)
        raise ValueError(f"override_generation_config: unknown {unknown}; known: {known}")
    if not all(type(value) in (int, float) for value in overrides.values()):
        raise ValueError(f"override_generation_config: numbers expected, got {overrides}")


def _read(folder: Path) -> dict[str, Any]:
    if not (folder / "generation_config.json").is_file():
        return {}
    return GenerationConfig.from_pretrained(folder).to_diff_dict()
