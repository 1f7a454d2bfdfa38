"""Pieces every guided pipeline shares: the ``guidance=`` argument, the output record, label sets, and the thin
text-to-image call (:class:`GuidedTextToImageMixin`: the parent's own ``__call__`` with the rule attached)."""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import BaseOutput

from guidance.base import Guidance
from guidance.cfg import CFG
from guidance.registry import guidance_class, parse_guidance, resolve_guidance, scale_parameter
from pipelines.attach import Attachment, GuidancePipelineMixin
from pipelines.families import family_of
from pipelines.run import RunReport


@dataclass
class GuidedPipelineOutput(BaseOutput):
    """Images plus what the guidance cost: ``nfe`` network evaluations per image (``nfe_per_sample`` each; rows of
    every network), ``model_calls`` batched forwards, ``trace`` (the branches evaluated at every model evaluation)
    and ``nfe_per_network`` (evaluations per image of each network: ``"main"``, plus e.g. Autoguidance's
    ``"guiding"``)."""

    images: list[PIL.Image.Image] | np.ndarray | torch.Tensor
    nfe: int | float
    nfe_per_sample: list[int]
    model_calls: int
    trace: list[dict[str, Any]]
    nsfw_content_detected: list[bool] | None = None
    nfe_per_network: dict[str, int | float] | None = None

    @classmethod
    def from_loop(cls, images: Any, result: RunReport, nsfw: list[bool] | None = None) -> GuidedPipelineOutput:
        return cls(
            images, result.nfe, result.nfe_per_sample, result.model_calls, result.trace, nsfw, result.nfe_per_network
        )


def pipeline_guidance(
    guidance: Any, guidance_scale: float | None, guidance_rescale: float = 0.0, default_scale: float = 7.5
) -> Guidance:
    """The :class:`Guidance` for a pipeline call.

    ``guidance=None`` is diffusers' own CFG with ``guidance_scale`` and ``guidance_rescale`` (so the parent's arguments
    keep their meaning). A guidance string (a registered name, ``a+b`` compositions, ``name@key=value`` terms) is built
    with ``guidance_scale`` as the strength of the rules that have one (:attr:`Guidance.scale_argument`: CFG's w,
    GFCG's lambda). A module, config dict, JSON or list is used as given and
    carries its own scale: passing ``guidance_scale`` too is an error.
    """
    scale = default_scale if guidance_scale is None else guidance_scale
    if guidance is None:
        return CFG(scale, guidance_rescale)
    if guidance_rescale:
        if guidance == "cfg":
            return CFG(scale, guidance_rescale)
        raise ValueError("guidance_rescale applies to plain CFG only; configure it on the guidance module instead")
    if isinstance(guidance, str) and not guidance.lstrip().startswith(("{", "[")):
        _, config = parse_guidance(guidance, scale)
        names = [part["name"] for part in (config if isinstance(config, list) else [config])]
        if guidance_scale is not None and not any(scale_parameter(guidance_class(name)) for name in names):
            raise ValueError(f"guidance {guidance!r} takes no guidance_scale (no rule in it has a strength to set); "
                             f"got guidance_scale={guidance_scale}")
        return resolve_guidance(guidance, guidance_scale=scale)
    if guidance_scale is not None:
        raise ValueError(
            "guidance_scale was given together with a configured guidance module; set the scale on the module"
        )
    return resolve_guidance(guidance)


def label_targets(target_labels: Sequence[int] | None, num_labels: int, batch: int, per_prompt: int) -> torch.Tensor:
    """The label id of every image, given one id per prompt (repeated for ``num_images_per_prompt``)."""
    if target_labels is None:
        raise ValueError("label_prompts needs target_labels: the label index of each prompt")
    ids = list(target_labels)
    if len(ids) != batch:
        raise ValueError(f"target_labels must have one entry per prompt ({batch}), got {len(ids)}")
    for label in ids:
        if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < num_labels:
            raise ValueError(f"target_labels must be ints in [0, {num_labels - 1}], got {label!r}")
    return torch.tensor(ids).repeat_interleave(per_prompt)


def label_condition(
    label_prompts: Sequence[str] | None,
    target_labels: Sequence[int] | None,
    batch: int,
    per_prompt: int,
    encode: Callable[[list[str]], Mapping[str, Any]],
    device: torch.device,
) -> tuple[Mapping[str, Any] | None, torch.Tensor | None]:
    """A text-to-image label set for labelled reference branches (``ref``, GFCG) and each image's label id.

    ``encode(prompts)`` returns the network keywords with one row per label prompt (no negative branch); it runs once
    per call. Without ``label_prompts`` there is no label set (``target_labels`` alone is an error).
    """
    if label_prompts is None:
        if target_labels is not None:
            raise ValueError("target_labels needs label_prompts: the prompt of every label")
        return None, None
    if isinstance(label_prompts, str) or not all(isinstance(p, str) for p in label_prompts) or not label_prompts:
        raise ValueError(f"label_prompts must be a non-empty list of strings, got {label_prompts!r}")
    targets = label_targets(target_labels, len(label_prompts), batch, per_prompt).to(device)
    return encode(list(label_prompts)), targets




def prompt_batch(arguments: Mapping[str, Any]) -> int:
    """The number of prompts of a text-to-image call (``prompt`` or ``prompt_embeds``)."""
    prompt = arguments.get("prompt")
    if isinstance(prompt, str):
        return 1
    if prompt is not None:
        return len(prompt)
    embeds = arguments.get("prompt_embeds")
    return 1 if embeds is None else int(embeds.shape[0])


class GuidedTextToImageMixin(GuidancePipelineMixin):
    """``guidance=`` on a diffusers text-to-image pipeline: the parent's ``__call__`` runs with the rule attached
    for the call (:class:`pipelines.attach.Attachment`), and the output reports what the guidance cost.

    A subclass names its default CFG scale and encodes label prompts (:meth:`encode_labels`).
    """

    #: the parent's own CFG default, used by ``guidance=None`` and registered names without ``guidance_scale``
    default_guidance_scale: float = 7.5
    #: this class keeps its parent's denoising loop (checked by :func:`pipelines.families.family_of`)
    _guidance_thin_call = True

    def encode_labels(self, prompts: list[str], arguments: Mapping[str, Any]) -> Mapping[str, Any]:
        """The label set's keyword tensors, one row per prompt, overlaid on the ``cond`` rows of labelled branches."""
        raise NotImplementedError

    def __call__(
        self,
        *args: Any,
        guidance: Any = None,
        label_prompts: Sequence[str] | None = None,
        target_labels: Sequence[int] | None = None,
        **kwargs: Any,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        """The parent pipeline's ``__call__`` (every argument of it), guided by ``guidance``.

        Args:
            guidance: a :class:`guidance.Guidance`, a guidance string (a registered name, ``a+b`` compositions,
                ``name@key=value`` terms: built with ``guidance_scale`` where a constructor takes one), a config dict
                / JSON, or a list composed in order; ``None`` is CFG at ``guidance_scale`` (default
                :attr:`default_guidance_scale`: 7.5 for SD, 5.0 for SDXL, 7.0 for SD3) with ``guidance_rescale``. A
                configured module carries its own scale.
            label_prompts: the prompts of a label set for labelled reference branches (GFCG's ``ref``), encoded
                once per call; with ``target_labels``: the label index of each prompt.
            check_finite: (keyword) raise ``FloatingPointError`` when the network returns NaN / inf (default
                ``True``; read back every 10 evaluations, so no host synchronisation per step).

        Returns a :class:`~pipelines.common.GuidedPipelineOutput`: ``images``, ``nsfw_content_detected`` (SD) and
        the cost (``nfe`` per image, ``nfe_per_sample``, ``model_calls``, ``trace``); with ``return_dict=False`` the
        parent's tuple.
        """
        return self._guided_call(super().__call__, args, kwargs, guidance, label_prompts, target_labels)

    def _lora_scale(self, arguments: Mapping[str, Any]) -> float | None:
        attention = arguments.get("cross_attention_kwargs") or arguments.get("joint_attention_kwargs") or {}
        return attention.get("scale")

    def _guided_call(
        self,
        parent_call: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        guidance: Any,
        label_prompts: Sequence[str] | None,
        target_labels: Sequence[int] | None,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        check_finite = kwargs.pop("check_finite", True)
        signature = inspect.signature(parent_call)
        arguments = dict(signature.bind_partial(*args, **kwargs).arguments)
        for name, param in signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        rule = pipeline_guidance(
            guidance, arguments.pop("guidance_scale", None), arguments.pop("guidance_rescale", 0.0),
            self.default_guidance_scale,
        )
        return_dict = arguments.pop("return_dict", True)
        device = self._execution_device
        with torch.no_grad():
            label_set, targets = label_condition(
                label_prompts, target_labels, prompt_batch(arguments), arguments.get("num_images_per_prompt", 1),
                lambda prompts: self.encode_labels(prompts, arguments), device,
            )
        attachment = Attachment(self, rule, family_of(self), check_finite)
        self.__dict__["_guidance"] = attachment
        try:
            output = attachment.run(parent_call, (), arguments, label_set, targets)
        finally:
            del self.__dict__["_guidance"]
        nsfw = getattr(output, "nsfw_content_detected", None)
        if not return_dict:
            return (output.images, nsfw) if hasattr(output, "nsfw_content_detected") else (output.images,)
        return GuidedPipelineOutput.from_loop(output.images, attachment.last_run, nsfw)
