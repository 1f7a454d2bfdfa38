"""Tiny random diffusers components for offline tests (no weights, no network).

The tokenizer is a byte-level CLIP tokenizer whose vocab (256 bytes, the same with ``</w>``, and the two special
tokens: 514 entries) and empty merges file are written to a temp dir and loaded with ``from_pretrained``
(transformers 5 ignores ``vocab_file=`` in the constructor).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


def byte_symbols() -> list[str]:
    """The 256 printable stand-ins byte-level BPE uses for bytes (printable ASCII/Latin-1 as is, the rest shifted)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1), *range(ord("\xae"), 256)]
    shifted = [b for b in range(256) if b not in printable]
    mapping = {b: chr(b) for b in printable}
    mapping.update({b: chr(256 + i) for i, b in enumerate(shifted)})
    return [mapping[b] for b in range(256)]


def tiny_tokenizer(directory: Path) -> CLIPTokenizer:
    """A 514-token byte-level CLIP tokenizer saved under ``directory`` and loaded from it."""
    directory.mkdir(parents=True, exist_ok=True)
    symbols = byte_symbols()
    vocab = {s: i for i, s in enumerate(symbols)}
    vocab.update({s + "</w>": i + len(symbols) for i, s in enumerate(symbols)})
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (directory / "vocab.json").write_text(json.dumps(vocab))
    (directory / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer.from_pretrained(str(directory), model_max_length=16)


def tiny_text_encoder(seed: int, projection: bool = False, hidden: int = 32) -> CLIPTextModel:
    """A 2-layer CLIP text encoder with random weights (vocab of :func:`tiny_tokenizer`)."""
    torch.manual_seed(seed)
    config = CLIPTextConfig(
        vocab_size=514, hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513, projection_dim=hidden,
    )
    model = CLIPTextModelWithProjection(config) if projection else CLIPTextModel(config)
    return model.eval()


def tiny_vae(seed: int = 0, latent_channels: int = 4):
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32,
    ).eval()


def tiny_sd_components(tmp: Path, scheduler=None, prediction_type: str = "epsilon") -> dict:
    """Components of a tiny Stable Diffusion 1.x pipeline (32 px images, 16x16 latents)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()
    if scheduler is None:
        scheduler = DDIMScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
            set_alpha_to_one=False, steps_offset=1, prediction_type=prediction_type,
        )
    return {
        "unet": unet, "scheduler": scheduler, "vae": tiny_vae(), "text_encoder": tiny_text_encoder(1),
        "tokenizer": tiny_tokenizer(tmp / "tokenizer"), "safety_checker": None, "feature_extractor": None,
        "image_encoder": None, "requires_safety_checker": False,
    }
