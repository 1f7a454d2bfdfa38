"""``StableDiffusion3Pipeline`` with ``guidance=``: the parent's own ``__call__``, with the rule attached for the
call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import StableDiffusion3Pipeline

from pipelines.common import GuidedTextToImageMixin


class GuidedStableDiffusion3Pipeline(GuidedTextToImageMixin, StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) with ``guidance=`` (a module, a registered name, or a list).

    Each branch carries the joint text embeddings (CLIP-L, CLIP-G, T5) and the pooled projections; ``uncond`` uses
    the parent's negative prompts. The transformer predicts the flow velocity, so rules that work on x0 (APG, GFCG)
    convert with ``x0 = x - s * u``. With ``guidance=None`` it is diffusers' CFG at ``guidance_scale`` (default 7.0)
    and gives the parent's images. Skip-layer guidance (``skip_guidance_layers``) is a guidance rule of its own and
    is refused.
    """

    default_guidance_scale = 7.0

    def encode_labels(self, prompts: list[str], arguments: Mapping[str, Any]) -> Mapping[str, Any]:
        embeds, _, pooled, _ = self.encode_prompt(
            prompts, None, None, device=self._execution_device, num_images_per_prompt=1,
            do_classifier_free_guidance=False, clip_skip=arguments.get("clip_skip"),
            max_sequence_length=arguments.get("max_sequence_length", 256), lora_scale=self._lora_scale(arguments),
        )
        return {"encoder_hidden_states": embeds, "pooled_projections": pooled}
