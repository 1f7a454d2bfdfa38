"""Our own denoising loop, for models diffusers has no pipeline loop for (class-conditional ``UNet2DModel`` / DiT)
and as the reference loop the tests compare against. Text-to-image pipelines run diffusers' own loop through
:func:`pipelines.attach.attach`; both share :class:`pipelines.run.GuidedRun`.

Per model evaluation: ask the guidance which branches it needs (possibly in two phases), evaluate each phase in one
batched forward, combine, step the scheduler, and on every completed step apply ``after_step``. Before the loop,
``prepare_noise`` may refine the initial noise with evaluations at the schedule's first noise level.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from guidance.base import Guidance
from pipelines.conditioning import BranchConditioning
from pipelines.run import Generator, GuidedRun, ModelFn, NetworkFn, RunReport, check_branches


@dataclass
class LoopResult(RunReport):
    """Final scheduler sample, with the evaluation counts and trace of :class:`~pipelines.run.RunReport`."""

    latents: torch.Tensor | None = None


def denoise(
    *,
    model_fn: ModelFn,
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    guidance: Guidance,
    conditioning: BranchConditioning,
    num_inference_steps: int,
    generator: Generator = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Any = None,
    check_finite: bool = True,
    network_fn: NetworkFn | None = None,
) -> LoopResult:
    """Sample from ``latents`` (already multiplied by ``scheduler.init_noise_sigma``) with ``guidance``.

    Args:
        model_fn: ``model_fn(model_input, timestep, **branch_kwargs) -> output`` (learned-variance channels removed).
        timesteps: ``scheduler.timesteps`` after ``set_timesteps``.
        conditioning: the keyword tensors of every branch (:class:`BranchConditioning`).
        num_inference_steps: the number of sampling steps (``len(timesteps)`` differs for Heun-type schedulers).
        decode: maps a denoised estimate to pixels in [-1, 1] (for rules that read images, e.g. GFCG).
        on_step_end: ``on_step_end(i, t, latents) -> latents`` after every evaluation (diffusers' callback semantics).
        progress: anything with ``update()``, advanced once per completed step.
        check_finite: raise ``FloatingPointError`` when a network output holds NaN / inf (read back every 10
            evaluations and at the end, so no host synchronisation per evaluation); ``False`` skips it.
        network_fn: ``network_fn(network) -> model_fn`` for the rule's other denoisers (Autoguidance's guiding
            model), called with ``model_fn``'s convention; needed only by rules that declare one.
    """
    check_branches(guidance, conditioning)
    run = GuidedRun(guidance, scheduler, num_inference_steps, decode, generator, check_finite, network_fn)
    if guidance.uses("prepare_noise"):
        noise = latents / run.init_noise_sigma
        refined = run.prepare_noise(noise, 0, timesteps[0], model_fn, conditioning)
        latents = (refined * run.init_noise_sigma).to(latents.dtype)

    for i, t in enumerate(timesteps):
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        step = run.record(i, t, model_input, conditioning)
        guided = run.guide(step, model_fn, conditioning)
        run.begin_step(latents)
        completed = run.completed
        latents = run.end_step(scheduler.step(guided, t, latents, **(extra_step_kwargs or {}), return_dict=False)[0])
        if progress is not None and run.completed > completed:
            progress.update()
        if on_step_end is not None:
            latents = on_step_end(i, t, latents)

    run.check_finite()
    report = run.report()
    return LoopResult(report.nfe_per_sample, report.model_calls, report.trace, report.rows_per_network, latents)
