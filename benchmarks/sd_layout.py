"""A diffusers ``StableDiffusionPipeline`` of the SD-1.5 layout with random weights, for speed benchmarks (no download).

The UNet has SD-1.5's structure (4 levels, 2 layers per block, cross attention in the first three, 8 attention
heads) at any base width (SD-1.5: 320, cross attention 768, 64x64 latents for 512 px); the text encoder is a 2-layer
CLIP of the cross-attention width with a byte-level tokenizer written to a folder; the VAE has SD's 8x downsampling
and 4 latent channels at small widths.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

PROMPTS = ["a photograph of an astronaut riding a horse", "a watercolor of a lighthouse"]
SCALE = 7.5


def unet(width: int, size: int, cross_attention_dim: int) -> UNet2DConditionModel:
    """The SD-1.5 UNet layout at ``width`` base channels on ``size`` x ``size`` latents."""
    torch.manual_seed(0)
    return UNet2DConditionModel(
        sample_size=size, in_channels=4, out_channels=4, layers_per_block=2,
        block_out_channels=(width, 2 * width, 4 * width, 4 * width),
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=8, norm_num_groups=32,
    ).eval()


def tokenizer(directory: Path) -> CLIPTokenizer:
    """A byte-level CLIP tokenizer written to ``directory`` (514 tokens, no merges, 77 positions)."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(b for b in range(256) if b not in printable)})
    symbols = [mapping[b] for b in range(256)]
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + 256 for i, s in enumerate(symbols)})
    vocab.update({"<|startoftext|>": 512, "<|endoftext|>": 513})
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=77)


def pipeline(width: int, size: int, directory: Path, cross_attention_dim: int = 768) -> StableDiffusionPipeline:
    """The whole pipeline (DDIM with SD's schedule), progress bar off."""
    torch.manual_seed(0)
    encoder = CLIPTextModel(CLIPTextConfig(
        vocab_size=514, hidden_size=cross_attention_dim, intermediate_size=2 * cross_attention_dim,
        num_attention_heads=4, num_hidden_layers=2, max_position_embeddings=77, bos_token_id=512, eos_token_id=513,
        pad_token_id=513,
    )).eval()
    vae = AutoencoderKL(
        block_out_channels=(8, 16, 16, 16), latent_channels=4, norm_num_groups=8,
        down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    ).eval()
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    pipe = StableDiffusionPipeline(
        unet=unet(width, size, cross_attention_dim), vae=vae, text_encoder=encoder, tokenizer=tokenizer(directory),
        scheduler=scheduler, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe
