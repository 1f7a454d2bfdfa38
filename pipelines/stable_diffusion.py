"""``StableDiffusionPipeline`` with ``guidance=``: the parent's own ``__call__``, with the rule attached for the call."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from diffusers import StableDiffusionPipeline

from pipelines.common import GuidedPipelineOutput, GuidedTextToImageMixin


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

    def __call__(
        self,
        *args: Any,
        guidance: Any = None,
        label_prompts: Sequence[str] | None = None,
        target_labels: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        """The parent's ``__call__`` (every argument of ``StableDiffusionPipeline.__call__``), guided by ``guidance``.

        Args:
            guidance: a :class:`guidance.Guidance`, a registered name (built with ``guidance_scale`` when it takes
                one), a config dict / JSON, or a list composed in order; ``None`` is CFG at ``guidance_scale``
                (default 7.5) with ``guidance_rescale``. A configured module carries its own scale.
            label_prompts: the prompts of a label set for labelled reference branches (GFCG's ``ref``), encoded
                once per call; with ``target_labels``: the label index of each prompt.
            check_finite: (keyword) raise ``FloatingPointError`` when the network returns NaN / inf (default
                ``True``; read back every 10 evaluations, so no host synchronisation per step).

        Returns a :class:`~pipelines.common.GuidedPipelineOutput`: ``images``, ``nsfw_content_detected`` and the cost
        (``nfe`` per image, ``nfe_per_sample``, ``model_calls``, ``trace``); with ``return_dict=False`` the
        parent's tuple.
        """
        return self._guided_call(super().__call__, args, kwargs, guidance, label_prompts, target_labels)

