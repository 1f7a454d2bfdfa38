"""Tiny random diffusers components for offline tests (no weights, no network).

The tokenizer is a byte-level CLIP tokenizer whose vocab (256 bytes, the same with ``</w>``, and the two special
tokens: 514 entries) and empty merges file are written to a temp dir and loaded with ``from_pretrained``
(transformers 5 ignores ``vocab_file=`` in the constructor). SD3's T5 tokenizer is a character-level Unigram model
built in memory with ``tokenizers`` (no sentencepiece file needed).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer


@pytest.fixture(scope="module")
def one_thread():
    """Run a module of tiny-model tests on one intra-op thread (restored afterwards).

    Tiny tensors gain nothing from a second thread, and on a loaded machine OpenMP's spinning threads make every
    forward several times slower. Use with ``pytestmark = pytest.mark.usefixtures("one_thread")`` after importing it.
    """
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


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


def tiny_vae(seed: int = 0, latent_channels: int = 4, **config):
    """A 2-level ``AutoencoderKL`` (x2 downsampling: 32 px images <-> 16x16 latents); ``config`` overrides."""
    from diffusers import AutoencoderKL

    torch.manual_seed(seed)
    return AutoencoderKL(
        block_out_channels=(8, 16), in_channels=3, out_channels=3, latent_channels=latent_channels,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"), norm_num_groups=8, sample_size=32, **config,
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


def tiny_sdxl_components(tmp: Path, scheduler=None) -> dict:
    """Components of a tiny SDXL pipeline: two CLIP encoders (32 + 32 = 64-dim cross attention, 32-dim pooled),
    ``text_time`` added conditioning (6 micro-conditioning ids x 8 + 32 = 80), 32 px images."""
    from diffusers import EulerDiscreteScheduler, UNet2DConditionModel

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=4, use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8,
    ).eval()
    if scheduler is None:
        scheduler = EulerDiscreteScheduler(
            beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
            timestep_spacing="leading",
        )
    return {
        "unet": unet, "scheduler": scheduler, "vae": tiny_vae(), "text_encoder": tiny_text_encoder(1),
        "tokenizer": tiny_tokenizer(tmp / "tokenizer"), "text_encoder_2": tiny_text_encoder(2, projection=True),
        "tokenizer_2": tiny_tokenizer(tmp / "tokenizer_2"), "image_encoder": None, "feature_extractor": None,
        "add_watermarker": False,
    }


def tiny_t5_tokenizer(directory: Path):
    """A character-level T5 tokenizer (``<pad>`` 0, ``</s>`` 1, ``<unk>`` 2, printable ASCII), saved and reloaded."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import T5TokenizerFast

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -1.0)]
    pieces += [(chr(c), -1.0) for c in range(32, 127)]
    backend = Tokenizer(models.Unigram(pieces, unk_id=2, byte_fallback=False))
    backend.pre_tokenizer = pre_tokenizers.Metaspace()
    backend.decoder = decoders.Metaspace()
    backend.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    tokenizer = T5TokenizerFast(
        tokenizer_object=backend, eos_token="</s>", unk_token="<unk>", pad_token="<pad>", extra_ids=0,
        model_max_length=16,
    )
    tokenizer.save_pretrained(str(directory))
    return T5TokenizerFast.from_pretrained(str(directory))


def tiny_t5_encoder(seed: int = 3, d_model: int = 64):
    """A 1-layer T5 encoder with random weights (vocab of :func:`tiny_t5_tokenizer`)."""
    from transformers import T5Config, T5EncoderModel

    torch.manual_seed(seed)
    config = T5Config(
        vocab_size=99, d_model=d_model, d_kv=8, d_ff=37, num_layers=1, num_heads=4, relative_attention_num_buckets=8,
        pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )
    return T5EncoderModel(config).eval()


def tiny_sd3_components(tmp: Path, t5: bool = True) -> dict:
    """Components of a tiny SD3 pipeline: an MMDiT (patch 2 on 16x16 latents), two CLIP encoders with projection
    (pooled 32 + 32 = 64), and a tiny T5 (64-dim, the joint attention width) or none (``t5=False``: SD3 then uses
    zeros for the T5 tokens)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel

    torch.manual_seed(0)
    transformer = SD3Transformer2DModel(
        sample_size=16, patch_size=2, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=16,
    ).eval()
    return {
        "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(shift=3.0),
        "vae": tiny_vae(shift_factor=0.0609, scaling_factor=1.5035, use_quant_conv=False, use_post_quant_conv=False),
        "text_encoder": tiny_text_encoder(1, projection=True), "tokenizer": tiny_tokenizer(tmp / "tokenizer"),
        "text_encoder_2": tiny_text_encoder(2, projection=True), "tokenizer_2": tiny_tokenizer(tmp / "tokenizer_2"),
        "text_encoder_3": tiny_t5_encoder() if t5 else None,
        "tokenizer_3": tiny_t5_tokenizer(tmp / "tokenizer_3") if t5 else None,
    }


def tiny_controlnet(seed: int = 1):
    """A ``ControlNetModel`` matching :func:`tiny_sd_components`' UNet (32 px control images -> 16x16 residuals)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(
        block_out_channels=(16, 32), layers_per_block=1, in_channels=4, cross_attention_dim=32,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), conditioning_embedding_out_channels=(16, 32),
        attention_head_dim=4, norm_num_groups=8,
    ).eval()


def tiny_sdxl_controlnet(seed: int = 1):
    """A ``ControlNetModel`` matching :func:`tiny_sdxl_components`' UNet (``text_time`` added conditioning)."""
    from diffusers import ControlNetModel

    torch.manual_seed(seed)
    return ControlNetModel(
        block_out_channels=(16, 32), layers_per_block=1, in_channels=4, down_block_types=("DownBlock2D",
        "CrossAttnDownBlock2D"), conditioning_embedding_out_channels=(16, 32), attention_head_dim=4,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80, cross_attention_dim=64, norm_num_groups=8,
    ).eval()


def tiny_inpainting_unet(seed: int = 2):
    """A 9-channel inpainting ``UNet2DConditionModel`` (latents, mask, masked-image latents) with 4 output channels."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=9, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8,
    ).eval()


def tiny_flux_components(tmp: Path) -> dict:
    """Components of a tiny Flux pipeline: a 1+1-layer Flux transformer on packed 1-channel latents, a CLIP encoder
    (pooled 32) and a tiny T5 (32-dim joint attention), and a one-level VAE (no downsampling)."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxTransformer2DModel

    torch.manual_seed(0)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8),
    ).eval()
    torch.manual_seed(0)
    vae = AutoencoderKL(
        sample_size=32, in_channels=3, out_channels=3, block_out_channels=(4,), layers_per_block=1, latent_channels=1,
        norm_num_groups=1, use_quant_conv=False, use_post_quant_conv=False, shift_factor=0.0609, scaling_factor=1.5035,
    ).eval()
    return {
        "transformer": transformer, "scheduler": FlowMatchEulerDiscreteScheduler(), "vae": vae,
        "text_encoder": tiny_text_encoder(1), "tokenizer": tiny_tokenizer(tmp / "tokenizer"),
        "text_encoder_2": tiny_t5_encoder(d_model=32), "tokenizer_2": tiny_t5_tokenizer(tmp / "tokenizer_2"),
        "image_encoder": None, "feature_extractor": None,
    }
