"""vLLM's `GET /tokenizer_info`: the served tokenizer's configuration as tokenizer_config.json
would hold it (lm-eval's remote tokenizer reads the special tokens and the chat template)."""

from __future__ import annotations

from typing import Any

# init_kwargs that say where the tokenizer was read from, not what it does
LOCATION_KEYS = (
    "vocab_file",
    "merges_file",
    "tokenizer_file",
    "name_or_path",
    "is_local",
    "local_files_only",
    "backend",
)


def tokenizer_info(tokenizer: Any, max_model_len: int) -> dict[str, Any]:
    """vLLM's shape: the tokenizer's init kwargs (tokens as strings, no file paths) with
    `tokenizer_class`, plus the chat template and context length this server applies."""
    info = {k: _plain(v) for k, v in tokenizer.init_kwargs.items() if k not in LOCATION_KEYS}
    info.update(_plain(tokenizer.special_tokens_map))
    info["tokenizer_class"] = type(tokenizer).__name__
    info["model_max_length"] = max_model_len
    if tokenizer.chat_template is not None:
        info["chat_template"] = tokenizer.chat_template
    return info


def _plain(value: Any) -> Any:
    """JSON-ready: an AddedToken becomes its text, as vLLM does."""
    if hasattr(value, "content"):
        return value.content
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)
