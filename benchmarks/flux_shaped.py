"""A FLUX.1 [schnell]-shaped pipeline with random weights, saved as a diffusers folder: the
real model's components at their real sizes (a 12B-parameter FluxTransformer2DModel of 19
double and 38 single blocks, T5-XXL's encoder, CLIP-L's text model, the 16-channel VAE), so
that a machine with no copy of the weights (a GPU node that reaches no hub) times the same
arithmetic. Its images are noise; their PNGs are as large as noise makes them.

The tokenizers are the tests' character-level ones (tests/tiny_flux.py): FLUX pads both
prompts to their fixed lengths (77 CLIP tokens, `max_sequence_length` T5 tokens), so the
encoders do the same work whatever the tokenizer.

    python benchmarks/flux_shaped.py /tmp/flux-shaped --device cuda   # about 34 GB in bf16
    python benchmarks/flux_shaped.py /tmp/flux-small --layers 1 --t5-layers 1  # a CPU smoke
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from diffusers import (
    AutoencoderKL,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.tiny_flux import CLIP_MAX_LENGTH, clip_tokenizer, t5_tokenizer  # noqa: E402


def build_flux_schnell_shaped(
    folder: Path,
    *,
    device: str = "cpu",
    dtype: torch.dtype = torch.bfloat16,
    layers: int | None = None,
    t5_layers: int = 24,
    seed: int = 0,
) -> Path:
    """Save the pipeline to `folder`; `layers` cuts the transformer to that many double and
    single blocks each (None: FLUX's 19 and 38)."""
    torch.manual_seed(seed)
    tokenizer, tokenizer_2 = clip_tokenizer(), t5_tokenizer()
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):  # random initialisation where the weights will live
            text_encoder = CLIPTextModel(
                CLIPTextConfig(
                    vocab_size=49408,
                    hidden_size=768,
                    intermediate_size=3072,
                    num_hidden_layers=12,
                    num_attention_heads=12,
                    max_position_embeddings=CLIP_MAX_LENGTH,
                    projection_dim=768,
                    hidden_act="quick_gelu",
                    bos_token_id=tokenizer.bos_token_id,
                    eos_token_id=tokenizer.eos_token_id,
                    pad_token_id=tokenizer.pad_token_id,
                )
            )
            text_encoder_2 = T5EncoderModel(
                T5Config(
                    vocab_size=32128,
                    d_model=4096,
                    d_kv=64,
                    d_ff=10240,
                    num_layers=t5_layers,
                    num_heads=64,
                    feed_forward_proj="gated-gelu",
                    tie_word_embeddings=False,
                    pad_token_id=tokenizer_2.pad_token_id,
                    eos_token_id=tokenizer_2.eos_token_id,
                    decoder_start_token_id=tokenizer_2.pad_token_id,
                )
            )
            transformer = FluxTransformer2DModel(
                patch_size=1,
                in_channels=64,
                num_layers=19 if layers is None else layers,
                num_single_layers=38 if layers is None else layers,
                attention_head_dim=128,
                num_attention_heads=24,
                joint_attention_dim=4096,
                pooled_projection_dim=768,
                guidance_embeds=False,  # schnell is guidance-distilled: no guidance input
                axes_dims_rope=(16, 56, 56),
            )
            vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                block_out_channels=(128, 256, 512, 512),
                layers_per_block=2,
                latent_channels=16,
                norm_num_groups=32,
                sample_size=1024,
                use_quant_conv=False,
                use_post_quant_conv=False,
                shift_factor=0.1159,
                scaling_factor=0.3611,
            )
    finally:
        torch.set_default_dtype(previous)
    pipeline = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0, use_dynamic_shifting=False),
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2,
        transformer=transformer,
    )
    pipeline.save_pretrained(folder, max_shard_size="20GB")
    return folder


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("folder", type=Path)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    p.add_argument("--layers", type=int, help="double and single blocks each (default 19, 38)")
    p.add_argument("--t5-layers", type=int, default=24)
    args = p.parse_args()
    start = time.perf_counter()
    build_flux_schnell_shaped(
        args.folder,
        device=args.device,
        dtype=getattr(torch, args.dtype),
        layers=args.layers,
        t5_layers=args.t5_layers,
    )
    size = sum(f.stat().st_size for f in args.folder.rglob("*") if f.is_file())
    print(f"{args.folder}: {size / 1e9:.1f} GB in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
