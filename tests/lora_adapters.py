"""PEFT LoRA adapters for the tiny models of tests/tiny_models.py, and transformers + peft as
their reference."""

from __future__ import annotations

from pathlib import Path

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

ALL_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def build_adapter(
    base_folder: Path,
    folder: Path,
    *,
    seed: int,
    rank: int = 8,
    alpha: int = 16,
    targets: tuple[str, ...] = ALL_TARGETS,
    **config,
) -> Path:
    """A LoRA adapter of random A and B (peft's zero B would change nothing) saved as
    `save_pretrained` writes it: adapter_config.json and adapter_model.safetensors."""
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    lora = LoraConfig(
        r=rank, lora_alpha=alpha, target_modules=list(targets), init_lora_weights=False, **config
    )
    get_peft_model(model, lora).save_pretrained(folder)
    return folder


def reference_model(base_folder: Path, adapter: Path | None) -> torch.nn.Module:
    """transformers' model with peft's adapter applied (not merged: as served)."""
    model = AutoModelForCausalLM.from_pretrained(base_folder, dtype=torch.float32)
    if adapter is not None:
        model = PeftModel.from_pretrained(model, adapter)
    return model.eval()
