"""``StableDiffusionPipeline`` with ``guidance=``: the parent's own ``__call__``, with the rule attached for the call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import StableDiffusionPipeline

from pipelines.common import GuidedTextToImageMixin


class GuidedStableDiffusionPipeline(GuidedTextToImageMixin, StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with ``guidance=`` (a module, a registered name, or a list of them).

    Everything is the parent's: this is :func:`pipelines.attach.attach` for one call, plus the cost report. With
    ``guidance=None`` it is diffusers' CFG at ``guidance_scale`` (and ``guidance_rescale``) and gives the parent's
    images.
    """

    default_guidance_scale = 7.5

    def encode_labels(self, prompts: list[str], arguments: Mapping[str, Any]) -> Mapping[str, Any]:
        embeds, _ = self.encode_prompt(
            prompts, self._execution_device, 1, False, lora_scale=self._lora_scale(arguments),
            clip_skip=arguments.get("clip_skip"),
        )
        return {"encoder_hidden_states": embeds}

