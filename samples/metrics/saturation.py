"""Saturation of generated images, the over-saturation measure of the APG paper.

Sadat, Hilliges, Weber, *Eliminating Oversaturation and Artifacts of High Guidance Scales in Diffusion Models*
(ICLR 2025) report "saturation" for RGB images; we use the standard HSV definition for it. For one RGB pixel with
channels in [0, 1],

    S = (max(r, g, b) - min(r, g, b)) / max(r, g, b)        (S = 0 where max = 0, i.e. black),

averaged over the pixels of an image (then over images). A grayscale image has S = 0 everywhere, so for
single-channel images we report instead the *clipped fraction*: the fraction of decoded pixel values outside
[-1, 1] *before* the final clamp, i.e. how much of the image the sampler pushed past the valid range (high
guidance scales do exactly that). Both are per-image values; :func:`saturation` picks the one that fits the
number of channels and says which one it is.
"""

from __future__ import annotations

import torch

HSV = "hsv"
#: margin of the "overshoot" fraction: pixel values more than this outside [-1, 1]
OVERSHOOT_MARGIN = 0.1
CLIPPED = "clipped-fraction"

DEFINITIONS = {
    HSV: "mean HSV saturation (max-min)/max of RGB pixels in [0,1] after the clamp (0 for black pixels)",
    CLIPPED: "fraction of decoded pixel values outside [-1,1] before the clamp (grayscale images)",
}


def hsv_saturation(images: torch.Tensor) -> torch.Tensor:
    """Mean HSV saturation per image, ``[B]`` float64, of RGB images ``[B, 3, H, W]`` with values in [0, 1]."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"hsv_saturation needs RGB images [B, 3, H, W], got shape {tuple(images.shape)}")
    pixels = images.double()
    high = pixels.amax(dim=1)
    low = pixels.amin(dim=1)
    sat = torch.where(high > 0, (high - low) / high.clamp_min(torch.finfo(torch.float64).tiny), torch.zeros_like(high))
    return sat.flatten(1).mean(dim=1)


def clipped_fraction(pixels: torch.Tensor, margin: float = 0.0) -> torch.Tensor:
    """Fraction of values outside ``[-1 - margin, 1 + margin]`` per image, ``[B]`` float64, of unclamped decoded
    pixels ``[B, ...]``. ``margin = 0`` is the clipped fraction; a margin such as :data:`OVERSHOOT_MARGIN` counts only
    clear overshoots (a model whose data sit exactly at -1, like the digits' background, overshoots by tiny amounts
    even without guidance)."""
    if pixels.ndim < 2:
        raise ValueError(f"clipped_fraction needs a batch [B, ...], got shape {tuple(pixels.shape)}")
    return (pixels.abs() > 1 + margin).flatten(1).double().mean(dim=1)


def saturation_kind(channels: int) -> str:
    """Which saturation :func:`saturation` reports for images with ``channels`` channels."""
    if channels == 3:
        return HSV
    if channels == 1:
        return CLIPPED
    raise ValueError(f"saturation is defined for 1- or 3-channel images, got {channels} channels")


def saturation(pixels: torch.Tensor) -> torch.Tensor:
    """Per-image saturation ``[B]`` of unclamped decoded pixels ``[B, C, H, W]`` in (nominally) [-1, 1].

    RGB: :func:`hsv_saturation` of ``clamp((x + 1) / 2, 0, 1)``; grayscale: :func:`clipped_fraction` of ``x``.
    """
    if pixels.ndim != 4:
        raise ValueError(f"saturation needs images [B, C, H, W], got shape {tuple(pixels.shape)}")
    if saturation_kind(pixels.shape[1]) == HSV:
        return hsv_saturation(((pixels.double() + 1) / 2).clamp(0, 1))
    return clipped_fraction(pixels)
