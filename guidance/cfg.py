"""Classifier-free guidance (Ho & Salimans 2022), in diffusers' convention: ``w = 1`` means no guidance.

    out = out_u + w * (out_c - out_u)

optionally followed by the std rescale of Lin et al. 2023 (arXiv 2305.08891, §3.4), applied, as diffusers does, in
the model's output space:

    out = phi * out * std(out_c) / std(out) + (1 - phi) * out      (std per sample over all non-batch dims)

A sample whose guided output has zero std (a constant) has nothing to rescale: its ratio is 1, where diffusers'
``rescale_noise_cfg`` returns NaN (0/0).

CFG is affine in the predictions, so it gives the same step in every prediction space (spaces.md §5).
"""

from __future__ import annotations

import torch

from guidance._validate import check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.registry import register
from guidance.spaces import batch_dims


def classifier_free_guidance(cond: torch.Tensor, uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """``uncond + scale * (cond - uncond)``."""
    return uncond + scale * (cond - uncond)


def rescale_guidance(guided: torch.Tensor, cond: torch.Tensor, factor: float) -> torch.Tensor:
    """Lin et al.'s rescale: blend ``guided`` with a copy whose per-sample std matches ``cond``'s by ``factor``
    (ratio 1 for a sample whose guided std is zero)."""
    dims = batch_dims(guided)
    std_cond = cond.std(dim=dims, keepdim=True)
    std_guided = guided.std(dim=dims, keepdim=True)
    ratio = torch.where(std_guided > 0, std_cond / std_guided, torch.ones_like(std_guided))
    rescaled = guided * ratio
    return factor * rescaled + (1 - factor) * guided


@register("cfg")
class CFG(Guidance):
    """Classifier-free guidance: ``out_u + guidance_scale * (out_c - out_u)`` (see the module docstring).

    Args:
        guidance_scale: w >= 0; 1 evaluates the conditional branch only (1 NFE per step), as diffusers does.
        guidance_rescale: phi in [0, 1] of Lin et al.; 0 turns it off.
    """

    scale_low = 0.0

    required_branches = frozenset({"cond", "uncond"})

    def __init__(self, guidance_scale: float = 7.5, guidance_rescale: float = 0.0) -> None:
        self.guidance_scale = check_number("guidance_scale", guidance_scale, low=0.0)
        self.guidance_rescale = check_number("guidance_rescale", guidance_rescale, low=0.0, high=1.0)

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        if self.guidance_scale == 1.0:
            return [Branch("cond")]
        return [Branch("uncond"), Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        guided = classifier_free_guidance(cond, preds["uncond"], self.guidance_scale)
        if self.guidance_rescale > 0:
            guided = rescale_guidance(guided, cond, self.guidance_rescale)
        return guided
