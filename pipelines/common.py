"""Pieces every guided pipeline shares: the ``guidance=`` argument, the output record, the loop call, label sets."""

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
from guidance.registry import guidance_class, resolve_guidance
from pipelines.conditioning import BranchConditioning
from pipelines.loop import LoopResult, denoise


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


def callback_tensor_names(callback: Any, names: Sequence[str]) -> list[str]:
    """The tensors a ``callback_on_step_end`` asks for (a diffusers ``PipelineCallback`` declares its own)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback.tensor_inputs)
    return list(names)


def run_guided_loop(
    pipe: Any,
    *,
    model_fn: Callable[..., torch.Tensor],
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    guidance: Guidance,
    conditioning: BranchConditioning,
    num_inference_steps: int,
    generator: Any,
    eta: float = 0.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    callback_tensors: Mapping[str, torch.Tensor] | None = None,
) -> LoopResult:
    """:func:`pipelines.loop.denoise` on ``pipe.scheduler`` with the pipeline's progress bar and callback.

    ``callback_on_step_end(pipe, i, t, tensors)`` runs after every model evaluation, as in diffusers; ``tensors``
    holds ``latents`` and the requested entries of ``callback_tensors`` (the pipeline's embeddings). Only a returned
    ``latents`` is used.
    """
    names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
    known = ["latents", *(callback_tensors or {})]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs must be among {known}, got {unknown}")

    def on_step_end(i: int, t: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if callback_on_step_end is None:
            return current
        available = {"latents": current, **(callback_tensors or {})}
        outputs = callback_on_step_end(pipe, i, t, {name: available[name] for name in names})
        return outputs.pop("latents", current)

    with pipe.progress_bar(total=num_inference_steps) as progress:
        return denoise(
            model_fn=model_fn,
            scheduler=pipe.scheduler,
            timesteps=timesteps,
            latents=latents,
            guidance=guidance,
            conditioning=conditioning,
            num_inference_steps=num_inference_steps,
            generator=generator,
            extra_step_kwargs=scheduler_step_kwargs(pipe.scheduler, generator, eta),
            decode=decode,
            on_step_end=on_step_end,
            progress=progress,
        )
