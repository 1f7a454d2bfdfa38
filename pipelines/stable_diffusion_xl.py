"""``StableDiffusionXLPipeline`` with ``guidance=``: the parent's own ``__call__``, with the rule attached for the
call."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from diffusers import StableDiffusionXLPipeline

from pipelines.common import GuidedTextToImageMixin


class GuidedStableDiffusionXLPipeline(GuidedTextToImageMixin, StableDiffusionXLPipeline):
    """Stable Diffusion XL with ``guidance=`` (a module, a registered name, or a list of them).

    Each branch carries SDXL's full conditioning as the parent builds it: ``cond`` the prompt embeddings, pooled
    embeddings and micro-conditioning time ids; ``uncond`` the negative ones (zeroed embeddings for an empty negative
    prompt when ``force_zeros_for_empty_prompt``, ``negative_original_size`` / ``negative_crops_coords_top_left`` /
    ``negative_target_size`` time ids, paired with the uncond rows of every image). With ``guidance=None`` it is
    diffusers' CFG at ``guidance_scale`` (default 5.0) and ``guidance_rescale``, and gives the parent's images. A label
    set (``label_prompts``) replaces the prompt and pooled embeddings of labelled rows; their time ids are the
    positive ones.
    """

    default_guidance_scale = 5.0

    def encode_labels(self, prompts: list[str], arguments: Mapping[str, Any]) -> Mapping[str, Any]:
        embeds, _, pooled, _ = self.encode_prompt(
            prompts, device=self._execution_device, num_images_per_prompt=1, do_classifier_free_guidance=False,
            lora_scale=self._lora_scale(arguments), clip_skip=arguments.get("clip_skip"),
        )
        return {"encoder_hidden_states": embeds, "added_cond_kwargs": {"text_embeds": pooled}}
