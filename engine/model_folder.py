"""What a folder of weights must hold for the engine to run it, read from its files alone (no
torch, no transformers): `pagoda serve` checks its chat models' folders with this before its
imports (server/chat_models.py), and the engine's loader checks every folder with it."""

from __future__ import annotations

import json
from pathlib import Path

# the `architectures` engine/models runs (tests/test_loading.py checks that both agree)
ARCHITECTURES = (
    "LlamaForCausalLM",
    "MistralForCausalLM",
    "MixtralForCausalLM",
    "Qwen2ForCausalLM",
    "Qwen3ForCausalLM",
    "Qwen3MoeForCausalLM",
)


def unsupported_architecture(architectures: list[str] | None) -> str:
    return f"unsupported model architecture {architectures}; supported: {', '.join(ARCHITECTURES)}"


def gguf_file_of(folder: Path) -> str | None:
    """The .gguf file a folder without config.json is served from; None for a folder with a
    config.json the engine runs. ValueError for a folder with neither, a config.json that is
    not JSON, or one of an architecture the engine does not run."""
    config = folder / "config.json"
    if not config.exists():
        ggufs = sorted(p.name for p in folder.glob("*.gguf"))
        if len(ggufs) == 1:
            return ggufs[0]
        raise ValueError(f"model folder {str(folder)!r} has no config.json (nor one .gguf file)")
    check_config(config)
    return None


def check_config(path: Path) -> None:
    """A config.json the engine runs. Left to transformers, a model of its own code would have
    it ask on the terminal whether to run that code, and an unknown model type would get its
    advice to pass trust_remote_code=True, an option pagoda does not have."""
    try:
        raw = json.loads(path.read_bytes())
    except ValueError as exc:  # JSONDecodeError, UnicodeDecodeError
        raise ValueError(f"{path} is not JSON: {exc}") from None
    if not isinstance(raw, dict):
        raise ValueError(f"{path} is not a JSON object")
    architectures = raw.get("architectures")
    if any(arch in ARCHITECTURES for arch in architectures or []):
        return
    own_code = " (its own code, config.json's auto_map, which pagoda never runs)"
    raise ValueError(
        f"{unsupported_architecture(architectures)}; model_type {raw.get('model_type')!r}"
        + (own_code if "auto_map" in raw else "")
    )
