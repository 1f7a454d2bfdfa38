"""Pieces every guided pipeline shares: the ``guidance=`` argument, the output record, the loop call."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from guidance.base import Guidance
from guidance.cfg import CFG
from guidance.registry import guidance_class, resolve_guidance
from pipelines.loop import LoopResult


@dataclass
class GuidedPipelineOutput(BaseOutput):
    """Images plus what the guidance cost: ``nfe`` network evaluations per image (``nfe_per_sample`` each),
    ``model_calls`` batched forwards, and ``trace`` (the branches evaluated at every model evaluation)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int | float
    nfe_per_sample: list[int]
    model_calls: int
    trace: list[dict[str, Any]]
    nsfw_content_detected: list[bool] | None = None

    @classmethod
    def from_loop(cls, images: Any, result: LoopResult, nsfw: list[bool] | None = None) -> GuidedPipelineOutput:
        return cls(images, result.nfe, result.nfe_per_sample, result.model_calls, result.trace, nsfw)


def pipeline_guidance(
    guidance: Any, guidance_scale: float | None, guidance_rescale: float = 0.0, default_scale: float = 7.5
) -> Guidance:
    """The :class:`Guidance` for a pipeline call.

    ``guidance=None`` is diffusers' own CFG with ``guidance_scale`` and ``guidance_rescale`` (so the parent's arguments
    keep their meaning). A registered name is built with ``guidance_scale`` when its constructor takes one. A module,
    config dict or list is used as given and carries its own scale: passing ``guidance_scale`` too is an error.
    """
    scale = default_scale if guidance_scale is None else guidance_scale
    if guidance is None:
        return CFG(scale, guidance_rescale)
    if guidance_rescale:
        if guidance == "cfg":
            return CFG(scale, guidance_rescale)
        raise ValueError("guidance_rescale applies to plain CFG only; configure it on the guidance module instead")
    if isinstance(guidance, str) and not guidance.lstrip().startswith(("{", "[")):
        cls = guidance_class(guidance)
        if "guidance_scale" in inspect.signature(cls.__init__).parameters:
            return cls(guidance_scale=scale)
        if guidance_scale is not None:
            raise ValueError(f"guidance {guidance!r} takes no guidance_scale; got guidance_scale={guidance_scale}")
        return cls()
    if guidance_scale is not None:
        raise ValueError(
            "guidance_scale was given together with a configured guidance module; set the scale on the module"
        )
    return resolve_guidance(guidance)


def check_steps(num_inference_steps: object) -> int:
    """``num_inference_steps`` must be a positive int."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    return num_inference_steps


def scheduler_step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """``generator`` and ``eta`` for ``scheduler.step`` where its signature takes them (as diffusers pipelines do)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs
