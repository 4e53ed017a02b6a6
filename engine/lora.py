"""LoRA adapters in PEFT's format, served beside their base model, any mix of them in one batch.

The engine has `max_loras` slots; each adapter it serves holds one (those given at start
first, others loaded and unloaded while it runs), and a sequence runs under one slot, or -1
for the base model. Each projection an adapter targets (every projection, where slots are left
for later) becomes a `LoraLinear`: the base layer plus every slot's low-rank update, in two
matmuls over the whole batch:

    x [T, in] @ A [in, S*R]       every slot's rank-R down-projection (S slots)
    * mask [T, S, 1]              each token keeps its own slot's R columns, the others zeroed
    @ B [S*R, out]                the up-projections (scaled by alpha / r), summed: the update

A fused projection (q/k/v, gate/up) gives each part R = max_lora_rank columns of its own
within a slot, and B maps them to that part's rows alone. The mask is a buffer the runner
fills each step (`LoraWeights.set_step`), so a CUDA graph captures the whole thing, and no step
loops over adapters. The price: every token pays S*R*(in + out) multiply-adds per projection,
all slots' whether it uses them or not (with 4 slots of rank 16 on a 4096-wide projection,
about 3% of its own cost per part). An eager step whose tokens all run under one adapter
multiplies that slot's columns alone; one of the base model alone skips the update.
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


@dataclass(frozen=True, slots=True)
class Loaded:
    """An adapter the engine serves: its slot, its id (unique to each adapter loaded, as a
    slot is reused: it keys the adapter's prefix cache) and where it came from."""

    slot: int
    id: int
    source: str


def load_adapters(lora_modules: dict[str, str], num_layers: int) -> list[Adapter]:
    return [
        load_adapter(name, adapter_folder(name, source), num_layers)
        for name, source in lora_modules.items()
    ]


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
    alpha, rslora = float(config.get("lora_alpha", 8)), bool(config.get("use_rslora"))  # peft's
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
        "bias": config.get("bias", "none") != "none",
        "lora_bias": bool(config.get("lora_bias")),
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


class LoraWeights:
    """A model's adapter slots: every LoraLinear, keyed by (layer, module), and the step's
    mask of which slot each token runs under ([tokens, slots, 1]; a token of the base model:
    all zeros), which the runner fills before the forward pass. The mask and the matrices are
    static buffers, updated in place, so that CUDA graphs read the new values."""

    def __init__(
        self,
        num_slots: int,
        max_rank: int,
        max_tokens: int,
        device: torch.device,
        dtype: torch.dtype,
        layout: tensor_parallel.Layout | None,
    ) -> None:
        self.max_rank = max_rank
        self.layout = layout
        self.linears: dict[tuple[int, str], LoraLinear] = {}
        self.mask = torch.zeros(max_tokens, num_slots, 1, dtype=dtype, device=device)
        self.slot_ids = torch.arange(num_slots, device=device)
        # what eager passes read (a captured CUDA graph always takes the masked path): False,
        # no token of this step runs under an adapter, and the update is skipped; a slot,
        # every token runs under that one, and its columns alone are multiplied
        self.active = True
        self.single_slot: int | None = None

    @property
    def num_slots(self) -> int:
        return self.mask.shape[1]

    def set_step(self, token_slots: torch.Tensor, used: set[int]) -> None:
        """`token_slots` on the device, and the set of them (-1: the base model)."""
        self.mask[: len(token_slots), :, 0] = token_slots[:, None] == self.slot_ids
        self.active = max(used) >= 0
        self.single_slot = next(iter(used)) if len(used) == 1 and self.active else None

    def for_graphs(self) -> None:
        """Before a CUDA graph's capture: the masked path, which replays then compute for any
        mix of slots (the flags an eager step left would be frozen into the graph)."""
        self.active, self.single_slot = True, None

    def write(self, slot: int, adapter: Adapter) -> None:
        """Put `adapter` in `slot` (zeros where it targets nothing); checked whole first, so
        that an adapter that does not fit leaves the slot as it was."""
        wrapped = {(layer, TARGETS[proj][0]) for layer, proj in adapter.weights}
        if missing := wrapped - set(self.linears):
            layer, module = min(missing)
            raise ValueError(
                f"LoRA adapter {adapter.name!r} targets layer {layer} {module}, which the "
                "adapters loaded at start do not: load it at start, or with max_loras above "
                "their number (every projection then takes adapters)"
            )
        if adapter.rank > self.max_rank:
            raise ValueError(
                f"LoRA adapter {adapter.name!r} has rank {adapter.rank}, above "
                f"max_lora_rank={self.max_rank}"
            )
        matrices = {
            key: _slot_matrices(adapter, *key, linear, self.max_rank, self.layout)
            for key, linear in self.linears.items()
        }
        for key, (a, b) in matrices.items():
            self.linears[key].write(slot, a, b)


class LoraLinear(nn.Module):
    """A projection plus its adapters' updates; `base` stays whatever layer it was (nn.Linear,
    or a CPU kernel's packed one)."""

    def __init__(self, base: nn.Linear, lora: LoraWeights) -> None:
        super().__init__()
        self.base = base
        self.in_features, self.out_features = base.in_features, base.out_features
        self.parts = getattr(base, "shard_sizes", None) or (base.out_features,)
        width = lora.num_slots * len(self.parts) * lora.max_rank
        device, dtype = base.weight.device, lora.mask.dtype
        self.register_buffer(
            "lora_a", torch.zeros(self.in_features, width, device=device, dtype=dtype)
        )
        self.register_buffer(
            "lora_b", torch.zeros(width, self.out_features, device=device, dtype=dtype)
        )
        self.lora = lora

    def write(self, slot: int, a: torch.Tensor, b: torch.Tensor) -> None:
        """One slot's A [P*R, in] and B [out, P*R]."""
        width = a.shape[0]
        columns = slice(slot * width, (slot + 1) * width)
        self.lora_a[:, columns] = a.t()
        self.lora_b[columns] = b.t()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if not self.lora.active:
            return y
        x = x.to(self.lora_a.dtype)
        if self.lora.single_slot is not None:  # one adapter's tokens only: its columns alone
            width = self.lora_b.shape[0] // self.lora.num_slots
            columns = slice(self.lora.single_slot * width, (self.lora.single_slot + 1) * width)
            down, up = x @ self.lora_a[:, columns], self.lora_b[columns]
        else:
            rows, slots = x.shape[0], self.lora.num_slots
            down = (x @ self.lora_a).view(rows, slots, -1)
            down, up = (down * self.lora.mask[:rows]).view(rows, -1), self.lora_b
        if y.dtype == down.dtype:
            return y.addmm_(down, up)
        return y + (down @ up).to(y.dtype)


def attach(
    model: nn.Module,
    adapters: list[Adapter],
    num_slots: int,
    max_rank: int,
    max_tokens: int,
    layout: tensor_parallel.Layout | None = None,
) -> LoraWeights:
    """Wrap projections in LoraLinears of `num_slots` slots, slot i holding adapters[i], and
    give the model their `LoraWeights` (`model.lora`). The projections: those the adapters
    target, or all of them where slots are left for adapters loaded later. Before the CPU
    kernels pack the model's linears: a LoraLinear's base is packed in its place."""
    param = next(model.parameters())
    lora = LoraWeights(num_slots, max_rank, max_tokens, param.device, param.dtype, layout)
    if num_slots > len(adapters):
        targeted = {(layer, proj) for layer in range(len(model.layers)) for proj in TARGETS}
    else:
        targeted = {(layer, proj) for adapter in adapters for layer, proj in adapter.weights}
    for layer, module_name in sorted({(layer, TARGETS[proj][0]) for layer, proj in targeted}):
        parent_name, child = module_name.rsplit(".", 1)
        parent = model.layers[layer].get_submodule(parent_name)
        base = getattr(parent, child, None)
        if isinstance(base, nn.Linear):  # a mixture of experts' MLP has no gate_up_proj
            lora.linears[layer, module_name] = LoraLinear(base, lora)
            setattr(parent, child, lora.linears[layer, module_name])
    for slot, adapter in enumerate(adapters):
        lora.write(slot, adapter)
    model.lora = lora
    return lora


def _slot_matrices(
    adapter: Adapter,
    layer: int,
    module_name: str,
    linear: LoraLinear,
    max_rank: int,
    layout: tensor_parallel.Layout | None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One module's A [P*R, in] and B [out, P*R] for one adapter: P parts of R columns."""
    parts = linear.parts
    width = len(parts) * max_rank
    a_all = torch.zeros(width, linear.in_features)
    b_all = torch.zeros(linear.out_features, width)
    for proj in [p for p, (module, _) in TARGETS.items() if module == module_name]:
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
        if a.shape[1] != linear.in_features or b.shape[0] != parts[part]:
            raise ValueError(
                f"LoRA adapter {adapter.name!r}: layer {layer} {proj} maps "
                f"{a.shape[1]} to {b.shape[0]} features, the model's {linear.in_features} to "
                f"{parts[part]}: an adapter of another model"
            )
        columns = slice(part * max_rank, part * max_rank + rank)
        a_all[columns] = a
        b_all[first_row : first_row + parts[part], columns] = b
    return a_all, b_all
