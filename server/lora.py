"""LoRA adapters (vLLM's --lora-modules): each one's folder, found as a model's weights are,
for the engine that serves it under a model id of its own."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pagoda.logs import describe_error
from pagoda.server.arg_types import LoraFlag
from pagoda.server.catalog import CatalogEntry, entry_error, hub_commit, resolve_path

# what `peft`'s save_pretrained writes (older versions: a .bin instead of safetensors)
ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors", "adapter_model.bin")


@dataclass(frozen=True)
class LoraAdapter:
    name: str  # the model id clients send
    source: str  # an absolute folder or a hub id: the card's `root`
    folder: str  # where the engine loads it from


def adapter_folder(source: str, revision: str | None) -> str:
    """The adapter's folder: `source` itself where it is one (an absolute path), else the hub
    id's adapter files at `revision` (default: its default branch), downloaded, or found in
    the hub cache offline (HF_HUB_OFFLINE)."""
    if Path(source).is_absolute() and not Path(source).exists():
        raise ValueError(f"{source} does not exist")
    commit = hub_commit(source, revision)  # None for a folder
    if commit is None:
        return source
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(source, revision=commit, allow_patterns=list(ADAPTER_FILES))
    except Exception as exc:  # offline and not cached, a network error, ...
        raise ValueError(f"cannot download {source!r}: {describe_error(exc)}") from None


def catalog_adapters(entry: CatalogEntry) -> list[LoraAdapter]:
    """The entry's lora_modules, found; an error names the entry and the adapter's field."""
    adapters = []
    for index, module in enumerate(entry.lora_modules or []):
        field = f"lora_modules[{index}]"
        source = resolve_path(entry, module.source, f"{field}.source")
        try:
            folder = adapter_folder(source, module.revision)
        except ValueError as exc:
            where = f"{field}.revision" if module.revision else f"{field}.source"
            raise entry_error(entry, str(exc), where) from None
        adapters.append(LoraAdapter(module.id, source, folder))
    return adapters


def flag_adapters(modules: list[LoraFlag], served_name: str) -> list[LoraAdapter]:
    """--lora-modules: each path from the working folder, or a hub id; an error names the flag
    and the adapter."""
    adapters: list[LoraAdapter] = []
    for module in modules:
        name = module.name
        if name == served_name:
            raise ValueError(f"--lora-modules: {name!r} is the name --model is served under")
        if any(adapter.name == name for adapter in adapters):
            raise ValueError(f"--lora-modules: {name!r} names two adapters")
        if module.base_model_name not in (None, served_name):
            raise ValueError(
                f"--lora-modules: adapter {name!r}: base_model_name "
                f"{module.base_model_name!r} is not the model served ({served_name!r})"
            )
        local = Path(module.path).expanduser()
        source = str(local.resolve()) if local.exists() else module.path
        try:
            adapters.append(LoraAdapter(name, source, adapter_folder(source, None)))
        except ValueError as exc:
            raise ValueError(f"--lora-modules: adapter {name!r}: {exc}") from None
    return adapters
