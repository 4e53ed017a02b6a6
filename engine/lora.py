"""LoRA adapters in PEFT's format, served beside their base model, any mix of them in one batch.

Every adapter is loaded at start and keeps a slot (0, 1, ...) for the engine's life; a
sequence runs under one slot, or -1 for the base model. Each projection an adapter targets
becomes a `LoraLinear`: the base layer plus every slot's low-rank update, in two matmuls
over the whole batch:

    x [T, in] @ A [in, S*R]       every slot's rank-R down-projection (S slots)
    * onehot(token's slot) [T, S] each token keeps its own slot's R columns, the others zeroed
    @ B [S*R, out]                the up-projections (scaled by alpha / r), summed: the update

A fused projection (q/k/v, gate/up) gives each part R = max_lora_rank columns of its own
within a slot, and B maps them to that part's rows alone. The batch's slots are one tensor the
runner fills each step (`LoraBatch`), so a CUDA graph captures the whole thing, and no step
loops over adapters. The price: every token pays S*R*(in + out) multiply-adds per projection,
all slots' whether it uses them or not (with 4 adapters of rank 16 on a 4096-wide projection,
about 3% of its own cost per part).
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from pagoda.engine import tensor_parallel
from pagoda.logs import describe_error

# PEFT's key of one LoRA matrix: base_model.model.model.layers.{i}.{block}.{proj}.lora_{A|B}.weight
KEY = re.compile(
    r"^base_model\.model\.model\.layers\.(\d+)\.(self_attn|mlp)\.(\w+)\.lora_([AB])\.weight$"
)
# checkpoint projection -> (the model's module below a decoder layer, part of its fused output)
TARGETS = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
ROW_PARALLEL = {"o_proj", "down_proj"}  # tensor parallelism splits their inputs, so their A


@dataclass(slots=True)
class Adapter:
    name: str
    folder: Path
    rank: int  # the largest of its modules' ranks
    # (layer, projection name) -> (A [r, in], B [out, r] scaled by alpha / r)
    weights: dict[tuple[int, str], tuple[torch.Tensor, torch.Tensor]]


def load_adapters(
    lora_modules: dict[str, str], max_rank: int | None, num_layers: int
) -> tuple[list[Adapter], int]:
    """Every adapter (slot i is the i-th), and the rank each slot is given."""
    adapters = [
        load_adapter(name, adapter_folder(name, source), num_layers)
        for name, source in lora_modules.items()
    ]
    largest = max(adapter.rank for adapter in adapters)
    if max_rank is not None and largest > max_rank:
        adapter = next(a for a in adapters if a.rank == largest)
        raise ValueError(
            f"LoRA adapter {adapter.name!r} has rank {largest}, above max_lora_rank={max_rank}"
        )
    return adapters, max_rank or largest


def adapter_folder(name: str, source: str) -> Path:
    """A local folder as it is; anything else is a hub id, downloaded (or found in the cache)."""
    path = Path(source).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download

    try:
        return Path(snapshot_download(source, allow_patterns=["adapter_*"]))
    except Exception as exc:  # offline, unknown repository, gated, ...
        raise ValueError(
            f"LoRA adapter {name!r}: {source!r} is neither a folder nor a downloadable hub id "
            f"({describe_error(exc)})"
        ) from exc


def load_adapter(name: str, folder: Path, num_layers: int) -> Adapter:
    """Read a PEFT LoRA adapter; refuse, naming it, anything this engine would not apply
    exactly as peft does."""
    folder = Path(folder)
    config = _read_config(name, folder)
    tensors = _read_tensors(name, folder)
    pairs: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in tensors.items():
        match = KEY.match(key)
        if match is None or match[3] not in TARGETS:
            raise ValueError(
                f"LoRA adapter {name!r}: {key!r} is not a LoRA matrix of an attention or MLP "
                f"projection ({', '.join(TARGETS)}), the only ones served"
            )
        layer = int(match[1])
        if layer >= num_layers:
            raise ValueError(f"LoRA adapter {name!r}: {key!r} names a layer the model lacks")
        pairs.setdefault((layer, match[3]), {})[match[4]] = tensor
    alpha, rslora = float(config["lora_alpha"]), bool(config.get("use_rslora"))
    weights = {}
    for (layer, proj), pair in pairs.items():
        if set(pair) != {"A", "B"} or pair["A"].shape[0] != pair["B"].shape[1]:
            raise ValueError(f"LoRA adapter {name!r}: layer {layer} {proj} lacks a matching A, B")
        rank = pair["A"].shape[0]
        scale = alpha / math.sqrt(rank) if rslora else alpha / rank
        weights[layer, proj] = (pair["A"].float(), pair["B"].float() * scale)
    if not weights:
        raise ValueError(f"LoRA adapter {name!r}: no LoRA weights in {folder}")
    rank = max(a.shape[0] for a, _ in weights.values())
    return Adapter(name, folder, rank, weights)


def _read_config(name: str, folder: Path) -> dict:
    path = folder / "adapter_config.json"
    if not path.is_file():
        raise ValueError(f"LoRA adapter {name!r}: no adapter_config.json in {folder}")
    config = json.loads(path.read_text())
    refused = {
        "peft_type": config.get("peft_type", "LORA") != "LORA",
        "use_dora": bool(config.get("use_dora")),
        "bias": config.get("bias", "none") != "none" or bool(config.get("lora_bias")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "alpha_pattern": bool(config.get("alpha_pattern")),
        "trainable_token_indices": bool(config.get("trainable_token_indices")),
    }
    for field, is_refused in refused.items():
        if is_refused:
            raise ValueError(
                f"LoRA adapter {name!r}: {field}={config.get(field)!r} is not served "
                "(plain LoRA on the attention and MLP projections only)"
            )
    return config


def _read_tensors(name: str, folder: Path) -> dict[str, torch.Tensor]:
    if (folder / "adapter_model.safetensors").is_file():
        return load_file(folder / "adapter_model.safetensors")
    if (folder / "adapter_model.bin").is_file():
        return torch.load(folder / "adapter_model.bin", map_location="cpu", weights_only=True)
    raise ValueError(f"LoRA adapter {name!r}: no adapter_model.safetensors or .bin in {folder}")


class LoraBatch:
    """Which slot each token of the step runs under, as a mask [tokens, slots, 1] (a token of
    the base model: all zeros), filled by the runner before the forward pass. One for the
    whole model, read by every LoraLinear; a static buffer, so that CUDA graphs read it too."""

    def __init__(
        self, num_slots: int, max_tokens: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.mask = torch.zeros(max_tokens, num_slots, 1, dtype=dtype, device=device)
        self.slot_ids = torch.arange(num_slots, device=device)
        # False: no token of this step runs under an adapter, and eager passes skip the update
        # (a captured CUDA graph always computes it)
        self.active = True

    @property
    def num_slots(self) -> int:
        return self.mask.shape[1]

    def set(self, token_slots: torch.Tensor, active: bool) -> None:
        self.mask[: len(token_slots), :, 0] = token_slots[:, None] == self.slot_ids
        self.active = active


class LoraLinear(nn.Module):
    """A projection plus its adapters' updates; `base` stays whatever layer it was (nn.Linear,
    or a CPU kernel's packed one)."""

    def __init__(
        self, base: nn.Module, lora_a: torch.Tensor, lora_b: torch.Tensor, batch: LoraBatch
    ) -> None:
        super().__init__()
        self.base = base
        self.register_buffer("lora_a", lora_a)  # [in, S*R]
        self.register_buffer("lora_b", lora_b)  # [S*R, out]
        self.batch = batch

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.batch.active:
            return y
        rows, slots = x.shape[0], self.batch.num_slots
        down = (x.to(self.lora_a.dtype) @ self.lora_a).view(rows, slots, -1)
        down = (down * self.batch.mask[:rows]).view(rows, -1)
        if y.dtype == down.dtype:
            return y.addmm_(down, self.lora_b)
        return y + (down @ self.lora_b).to(y.dtype)


def attach(
    model: nn.Module,
    adapters: list[Adapter],
    max_rank: int,
    max_tokens: int,
    layout: tensor_parallel.Layout | None = None,
) -> LoraBatch:
    """Wrap every projection an adapter targets in a LoraLinear holding all adapters'
    matrices, slot i being adapters[i], and give the model the batch they read their slots
    from (`model.lora_batch`). Before the CPU kernels pack the model's linears: a LoraLinear's
    base is packed in its place."""
    device = next(model.parameters()).device
    dtype = next(model.parameters()).dtype
    batch = LoraBatch(len(adapters), max_tokens, device, dtype)
    targeted = {(layer, proj) for adapter in adapters for layer, proj in adapter.weights}
    for layer, module_name in sorted({(layer, TARGETS[proj][0]) for layer, proj in targeted}):
        parent_name, child = module_name.rsplit(".", 1)
        parent = model.layers[layer].get_submodule(parent_name)
        base: nn.Linear = getattr(parent, child)
        lora_a, lora_b = _stack(adapters, layer, module_name, base, max_rank, layout)
        setattr(
            parent,
            child,
            LoraLinear(base, lora_a.to(device, dtype), lora_b.to(device, dtype), batch),
        )
    model.lora_batch = batch
    return batch


def _stack(
    adapters: list[Adapter],
    layer: int,
    module_name: str,
    base: nn.Linear,
    max_rank: int,
    layout: tensor_parallel.Layout | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's A [in, S*P*R] and B [S*P*R, out] over S slots of P parts of R columns."""
    parts = getattr(base, "shard_sizes", None) or (base.out_features,)
    projections = [p for p, (module, _) in TARGETS.items() if module == module_name]
    width = len(parts) * max_rank
    a_all = torch.zeros(len(adapters), width, base.in_features)
    b_all = torch.zeros(len(adapters), base.out_features, width)
    for slot, adapter in enumerate(adapters):
        for proj in projections:
            if (layer, proj) not in adapter.weights:
                continue
            a, b = adapter.weights[layer, proj]
            if layout is not None:  # this rank's part, as tensor_parallel cuts the weight
                name = f"model.layers.{layer}.{module_name.split('.')[0]}.{proj}.weight"
                if proj in ROW_PARALLEL:
                    a = tensor_parallel.shard_tensor(name, a, layout)
                else:
                    b = tensor_parallel.shard_tensor(name, b, layout)
            part = TARGETS[proj][1]
            rank, first_row = a.shape[0], sum(parts[:part])
            if a.shape[1] != base.in_features or b.shape[0] != parts[part]:
                raise ValueError(
                    f"LoRA adapter {adapter.name!r}: layer {layer} {proj} maps "
                    f"{a.shape[1]} to {b.shape[0]} features, the model's {base.in_features} to "
                    f"{parts[part]}: an adapter of another model"
                )
            columns = slice(part * max_rank, part * max_rank + rank)
            a_all[slot, columns] = a
            b_all[slot, first_row : first_row + parts[part], columns] = b
    lora_a = a_all.reshape(-1, base.in_features).t().contiguous()
    lora_b = b_all.transpose(1, 2).reshape(-1, base.out_features).contiguous()
    return lora_a, lora_b
