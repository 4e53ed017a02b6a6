"""Finding a model (hub id, folder or .gguf file) and loading its config, tokenizer and weights."""

from __future__ import annotations

import json
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PretrainedConfig

from pagoda.engine import distributed, lora, tensor_parallel
from pagoda.engine.config import EngineConfig
from pagoda.engine.cuda_graphs import CAPTURE_SIZES
from pagoda.engine.gguf_weights import gguf_config, gguf_index, gguf_tokenizer, iter_gguf_weights
from pagoda.engine.model_folder import gguf_file_of
from pagoda.engine.models import model_class
from pagoda.kernels import backends, cpu_native, linear_bf16, linear_cpu
from pagoda.logs import describe_error, progress

logger = logging.getLogger(__name__)

HUB_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.txt", "*.jinja"]


@dataclass
class ModelSource:
    folder: Path
    gguf_file: str | None = None  # file name inside `folder`
    commit: str | None = None  # a hub id's: the commit its snapshot folder is of

    @property
    def gguf_path(self) -> str:
        return str(self.folder / self.gguf_file)


def resolve_source(model: str, revision: str | None = None) -> ModelSource:
    """Where the model is (a hub id at `revision`: its snapshot, downloaded); a GGUF file's
    header is read (and kept in the cache) here, so that a damaged file or an unsupported
    architecture fails before anything starts."""
    refuse_revision_of_path(model, revision, "revision")
    path = Path(model).expanduser()
    if path.is_file():
        if path.suffix != ".gguf":
            raise ValueError(f"model file {model!r} is not a .gguf file")
        gguf_index(str(path))
        return ModelSource(path.parent, path.name)
    folder = path if path.is_dir() else Path(_download(model, revision))
    gguf_file = gguf_file_of(folder)
    if gguf_file is not None:
        gguf_index(str(folder / gguf_file))
    # a hub id's folder is the hub cache's snapshots/<commit>
    return ModelSource(folder, gguf_file, commit=None if path.is_dir() else folder.name)


def refuse_revision_of_path(name: str, revision: str | None, field: str) -> None:
    """A revision pins a hub repository's files: given for a local path, it would mean nothing."""
    if revision is not None and Path(name).expanduser().exists():
        raise ValueError(
            f"{field} {revision!r} is for a hub id, and {name!r} is a local path (a revision "
            "pins the files of a hub repository)"
        )


def _download(repo_id: str, revision: str | None) -> str:
    from huggingface_hub import snapshot_download

    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
        if not _weight_files(Path(folder), SAFETENSORS):  # an older repository: .bin weights
            folder = snapshot_download(
                repo_id, revision=revision, allow_patterns=[PYTORCH_BIN.pattern]
            )
        return folder
    except Exception as exc:  # offline, unknown repo or revision, gated repo, ...
        if revision is None:
            what = f"model {repo_id!r} is neither a local path nor a downloadable hub id"
        else:
            what = f"model {repo_id!r} at revision {revision!r} cannot be downloaded"
        raise ValueError(f"{what}: {describe_error(exc)}") from exc


def load_config(source: ModelSource) -> PretrainedConfig:
    if source.gguf_file:
        return gguf_config(source.gguf_path)
    # a model of its own code never runs (resolve_source refused it): transformers is told so
    return AutoConfig.from_pretrained(source.folder, trust_remote_code=False)


def load_tokenizer(source: ModelSource, tokenizer: str | None = None, revision: str | None = None):
    """The model's own tokenizer, or `tokenizer`'s (a hub id at `revision`, or a folder)."""
    if tokenizer is not None:
        refuse_revision_of_path(tokenizer, revision, "tokenizer_revision")
        try:
            return AutoTokenizer.from_pretrained(
                tokenizer, revision=revision, trust_remote_code=False
            )
        except OSError as exc:  # transformers' message names neither the tokenizer nor revision
            at = f" at revision {revision!r}" if revision else ""
            raise ValueError(
                f"tokenizer {tokenizer!r}{at} cannot be loaded: {describe_error(exc)}"
            ) from exc
    if source.gguf_file:
        return gguf_tokenizer(source.gguf_path)
    return AutoTokenizer.from_pretrained(source.folder, trust_remote_code=False)


def eos_token_ids(source: ModelSource, config: PretrainedConfig, tokenizer) -> frozenset[int]:
    """EOS ids from generation_config.json, else the model config, else the tokenizer."""
    candidates = []
    if not source.gguf_file and (source.folder / "generation_config.json").exists():
        candidates.append(GenerationConfig.from_pretrained(source.folder).eos_token_id)
    candidates += [getattr(config, "eos_token_id", None), getattr(tokenizer, "eos_token_id", None)]
    for ids in candidates:
        if ids is not None:
            return frozenset([ids] if isinstance(ids, int) else ids)
    return frozenset()


def checkpoint_dtype(config: PretrainedConfig) -> torch.dtype | None:
    dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype, None)
    return dtype if isinstance(dtype, torch.dtype) else None


def build_model(
    config: PretrainedConfig,
    source: ModelSource,
    engine_config: EngineConfig,
    device: torch.device,
    dtype: torch.dtype,
    max_model_len: int,
    lora_slots: tuple[list[lora.Adapter], int, int] = ([], 0, 0),
) -> nn.Module:
    """`lora_slots`: (adapters loaded at start, slots in all, their rank) for engine/lora.py."""
    cls = model_class(getattr(config, "architectures", None))
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    ops = backends.select(
        engine_config.kernel_backend, device, engine_config.block_size, dtype, head_dim
    )
    layout = None
    if distributed.world_size() > 1:
        layout = tensor_parallel.Layout.of(config, distributed.rank(), distributed.world_size())
    with torch.device("meta"):
        model = cls(config, ops)
        if layout is not None:
            tensor_parallel.shard_model(model, layout)
    # bf16 on a CPU with the C++ kernels: bf16 linear weights and KV cache, fp32 for the rest;
    # the linears multiply in bf16 with AMX or AVX512-BF16, else widen the weights to fp32
    cpu_bf16 = dtype == torch.bfloat16 and ops is backends.CPU
    native_bf16 = cpu_bf16 and linear_bf16.available()
    # Cast on the meta device, then allocate: built in fp32 and cast afterwards, the load would
    # peak at twice the model's bf16 size (and on a GPU leave that much in torch's cache).
    model.to(torch.float32 if cpu_bf16 else dtype)
    model.to_empty(device=device)
    if engine_config.load_format == "dummy":
        _fill_dummy(model, engine_config.seed)
    else:
        weights = _iter_weights(source, engine_config.load_format)
        if layout is not None:
            weights = tensor_parallel.shard_weights(weights, layout)
        model.load_weights(progress(weights, "Loading weights", "tensors"))
    model.init_rotary(device, max_model_len)
    adapters, num_slots, max_lora_rank = lora_slots
    if num_slots:
        max_tokens = max(engine_config.resolve_max_num_batched_tokens(device), CAPTURE_SIZES[-1])
        lora.attach(model, adapters, num_slots, max_lora_rank, max_tokens, layout)
    if native_bf16:
        # an adapter's update goes between gate_up and the activation: no fused kernel then
        packed = linear_bf16.pack_linears(model, fuse_gate_up=not num_slots)
        logger.info(
            "bf16 CPU path (%s): %d linear layers packed, bf16 KV cache, fp32 "
            "activations and accumulation; weights and KV cache on %s",
            linear_bf16.describe(),
            packed,
            "2 MiB pages"
            if cpu_native.huge_pages_enabled()
            else "4 KiB pages (transparent huge pages are off: decode runs slower)",
        )
    elif cpu_bf16:
        packed = linear_cpu.pack_linears(model, torch.bfloat16)
        logger.info(
            "bf16 CPU path (no AMX or AVX512-BF16: bf16 weights widened to fp32 in the CPU "
            "linear kernel): %d linear layers packed, bf16 KV cache, fp32 activations and "
            "arithmetic",
            packed,
        )
    elif ops is backends.CPU and dtype == torch.float32:
        packed = linear_cpu.pack_linears(model)
        if packed:
            logger.info("CPU linear kernel: %d fp32 layers packed", packed)
    elif device.type == "cpu" and dtype != torch.float32:
        logger.info("%s on a CPU without native bf16 (AMX, AVX512-BF16): torch ops", dtype)
    return model.eval()


def _iter_weights(source: ModelSource, load_format: str) -> Iterator[tuple[str, torch.Tensor]]:
    if source.gguf_file or load_format == "gguf":
        if not source.gguf_file:
            raise ValueError(f"load_format='gguf' but {source.folder} holds no .gguf file")
        yield from iter_gguf_weights(source.gguf_path)
        return
    files = _weight_files(source.folder, SAFETENSORS)
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 (safe_open is not a dict)
                    yield name, f.get_tensor(name)
        return
    files = [] if load_format == "safetensors" else _weight_files(source.folder, PYTORCH_BIN)
    if not files:
        kinds = "" if load_format == "safetensors" else " nor pytorch_model*.bin"
        raise ValueError(f"no .safetensors weights{kinds} in {source.folder}")
    for file in files:
        # weights_only: a pickle may name any Python callable; this reads tensors and nothing else
        yield from torch.load(file, map_location="cpu", weights_only=True, mmap=True).items()


@dataclass(frozen=True, slots=True)
class WeightFormat:
    index: str  # the index of a sharded checkpoint: which file holds each tensor
    pattern: str  # the files, where there is no index


SAFETENSORS = WeightFormat("model.safetensors.index.json", "*.safetensors")
# Hugging Face's names: a folder may hold other .bin files (training_args.bin, optimizer.bin)
PYTORCH_BIN = WeightFormat("pytorch_model.bin.index.json", "pytorch_model*.bin")


def _weight_files(folder: Path, weight_format: WeightFormat) -> list[Path]:
    index = folder / weight_format.index
    if not index.exists():
        return sorted(folder.glob(weight_format.pattern))
    files = [folder / n for n in sorted(set(json.loads(index.read_text())["weight_map"].values()))]
    missing = [f.name for f in files if not f.exists()]
    if missing:
        raise ValueError(
            f"{index} names {len(missing)} weight file(s) missing from {folder} (an unfinished "
            f"download or copy?): {', '.join(missing[:4])}"
        )
    return files


def _fill_dummy(model: nn.Module, seed: int) -> None:
    """Random weights from the config alone: the values do not matter for speed."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.uniform_(-0.05, 0.05, generator=generator)
