"""The diffusers pipelines :func:`pipelines.attach.attach` serves, and what it must know about each.

Two denoiser layouts occur:

* ``"batched"``: one denoiser call per evaluation on ``[uncond; cond]`` rows (``do_classifier_free_guidance``), then
  ``u + w (c - u)``: Stable Diffusion 1.x/2.x, SDXL and SD3 with their img2img, inpainting and ControlNet variants;
* ``"sequential"``: Flux's true CFG, two calls per evaluation (``cond``, then ``uncond`` under ``true_cfg_scale``).

A family also says whether its latents start as pure noise (only then may a rule refine the initial noise, NLG), how
its latents decode to pixels (for rules that read images), and any quirk of its batching.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import diffusers
import torch

Decoder = Callable[[Any, Mapping[str, Any], torch.Tensor], torch.Tensor]


def decode_float32(vae: torch.nn.Module, vae_latents: torch.Tensor) -> torch.Tensor:
    """``vae.decode(vae_latents)`` computed in float32 (or the VAE's wider dtype): pixels in [-1, 1], float32.

    A float16 or bfloat16 VAE is cast to float32 for the call and back afterwards (exact: every half-precision value is
    a float32 value; ``float()`` / ``half()`` / ``bfloat16()`` rather than ``to(dtype)``, which logs a warning per
    call in diffusers); a quantized VAE decodes as it is. This is the decode of the denoised estimate that guidance
    rules read (GFCG's classifier input): half-precision VAE decodes can overflow to inf/NaN.
    """
    restore = {torch.float16: vae.half, torch.bfloat16: vae.bfloat16}.get(vae.dtype)
    if getattr(vae, "is_quantized", False):
        restore = None
    if restore is not None:
        vae.float()
    try:
        return vae.decode(vae_latents.to(vae.dtype), return_dict=False)[0].float()
    finally:
        if restore is not None:
            restore()


def scaled_latents(vae: Any, latents: torch.Tensor) -> torch.Tensor:
    """The VAE's input for denoised ``latents``: SD's ``/ scaling_factor``, SDXL's latent mean/std when the VAE
    config has them, SD3's and Flux's ``shift_factor``."""
    config = vae.config
    if config.get("latents_mean") is not None and config.get("latents_std") is not None:
        mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
        return latents * std / config.scaling_factor + mean
    shift = config.get("shift_factor") or 0.0
    return latents / config.scaling_factor + shift


def decode_latents(pipe: Any, call: Mapping[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """Denoised 4-D latents -> pixels in [-1, 1], decoded in float32."""
    return decode_float32(pipe.vae, scaled_latents(pipe.vae, latents))


def decode_packed_latents(pipe: Any, call: Mapping[str, Any], latents: torch.Tensor) -> torch.Tensor:
    """Flux's packed ``[B, tokens, 64]`` latents -> pixels, at the call's height and width."""
    size = pipe.default_sample_size * pipe.vae_scale_factor
    height, width = call.get("height") or size, call.get("width") or size
    return decode_latents(pipe, call, pipe._unpack_latents(latents, height, width, pipe.vae_scale_factor))


@dataclass(frozen=True)
class Family:
    """What :func:`~pipelines.attach.attach` knows about one diffusers pipeline class (see the module docstring)."""

    pipeline: str
    layout: str
    starts_from_noise: bool
    decode: Decoder = decode_latents
    #: the batch-first keys of ``added_cond_kwargs`` whose ``[uncond, cond]`` pair diffusers repeats per image
    #: (``[n, p, n, p, ...]``) instead of per branch
    interleaved: tuple[str, ...] = ()
    #: top-level denoiser keywords that are never batch-first (Flux's 2-D position ids)
    shared_keywords: tuple[str, ...] = ()


FAMILIES: tuple[Family, ...] = (
    Family("StableDiffusionPipeline", "batched", True),
    Family("StableDiffusionImg2ImgPipeline", "batched", False),
    Family("StableDiffusionInpaintPipeline", "batched", False),
    Family("StableDiffusionControlNetPipeline", "batched", True),
    Family("StableDiffusionXLPipeline", "batched", True, interleaved=("time_ids",)),
    Family("StableDiffusionXLImg2ImgPipeline", "batched", False),
    Family("StableDiffusionXLInpaintPipeline", "batched", False),
    Family("StableDiffusionXLControlNetPipeline", "batched", True, interleaved=("time_ids",)),
    Family("StableDiffusion3Pipeline", "batched", True),
    Family("StableDiffusion3Img2ImgPipeline", "batched", False),
    Family("FluxPipeline", "sequential", True, decode=decode_packed_latents, shared_keywords=("img_ids", "txt_ids")),
)


def family_of(pipe: Any) -> Family:
    """The family of ``pipe``: its class or the nearest base class in :data:`FAMILIES` whose ``__call__`` it keeps.

    ``ValueError`` for any other pipeline (its denoising loop is unknown, so guidance could not be applied faithfully).
    """
    known = {family.pipeline: family for family in FAMILIES}
    for cls in type(pipe).__mro__:
        family = known.get(cls.__name__)
        if family is not None and getattr(diffusers, cls.__name__, None) is cls:
            if type(pipe).__call__ is not cls.__call__ and not getattr(type(pipe), "_guidance_thin_call", False):
                raise ValueError(
                    f"{type(pipe).__name__} overrides {cls.__name__}.__call__, so its denoising loop is unknown; "
                    "attach serves the diffusers pipelines listed in pipelines.families.FAMILIES as they are"
                )
            return family
    names = ", ".join(family.pipeline for family in FAMILIES)
    raise ValueError(f"attach cannot serve {type(pipe).__name__} (unknown denoiser layout); supported: {names}")
