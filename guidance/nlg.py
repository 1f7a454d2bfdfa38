"""Noise-Level Guidance (Mannering, Huang, Prugel-Bennett, arXiv 2509.13936): refine the initial noise.

Before sampling, K iterations on the unit-variance initial noise n (official notebooks / ``refine_noise``, nlg.md §3),
each with one batched ``[uncond, cond]`` evaluation at the schedule's highest noise level (t = T - 1 = 999, as the
official code does):

    d  = eps_c(n) - eps_u(n)                       ~ -sigma_T grad log p(y | n): ascent on log p(y | n)
    d  = d * min(1, tau / ||d||)                   per-sample clip (``norm_threshold`` = tau, eps units)
    n  = n - step_size * d + noise_std * z         z ~ N(0, I), a fresh draw every iteration
    n  = n * sqrt(D) / ||n||                       back to the Gaussian shell, per sample (D = elements per sample)

Sampling then runs unchanged with whatever combine rule is configured (the paper's main setting: no CFG). Cost: 2 NFE
per iteration and sample, counted by the loop.

The official clip tau = 0.5 is an absolute norm, while ``||d||`` grows like sqrt(D); the default therefore scales it
to the sample size, ``0.5 * sqrt(D / 36864)`` (:func:`scaled_norm_threshold`; 36,864 = 4x96x96, the latent shape of
the official experiments, SD 2.1 at 768 px; the convention of APG's default norm threshold); :meth:`NLG.official`
gives the literal official configuration.

The direction from other prediction types, at the same input x (spaces.md §2): v-prediction
``eps_c - eps_u = alpha (v_c - v_u)`` (the ``sigma x`` term cancels); x0-prediction
``-(alpha / sigma) (x0_c - x0_u)``. Flow matching (``x = (1 - s) x0 + s eps``, velocity ``u = eps - x0``): the eps
difference ``(1 - s)(u_c - u_u)`` vanishes at ``s = 1``, where flow schedules start, so the direction is the velocity
difference ``u_c - u_u = -(x0_c - x0_u) / s``, i.e. the eps difference divided by ``alpha = 1 - s`` (the same sign,
finite at ``s = 1``); ``norm_threshold`` is then in velocity units [reconstruction: the official code covers VP models only].
"""

from __future__ import annotations

import math
from typing import Any

import torch

from guidance._validate import check_bool, check_choice, check_int, check_number, renamed_arguments
from guidance.base import Branch, Guidance, NoiseContext, Step
from guidance.registry import register
from guidance.spaces import PREDICTION_TYPES, clip_norm, compute_dtype, per_sample_norm, size_scaled

#: the official noise *variance* lambda = 0.001 (``--noise_level``), as a standard deviation
DEFAULT_NOISE_STD = math.sqrt(1e-3)
#: the official clip tau = 0.5 and the latent size the default scales it from: SD 2.1 at 768 px (4x96x96), the model
#: of the official experiments (the README's experiment command; ``core_experiments`` hard-codes the latent shape
#: (4, 96, 96); nlg.md §4, §6.7). The SD-1.5 notebook uses the same 0.5 at 4x64x64, where the default is 1/3.
REFERENCE_MAX_NORM = 0.5
REFERENCE_ELEMENTS = 4 * 96 * 96
#: where the refinement evaluates the model: the schedule's highest noise level, or the first sampling timestep
TIMESTEPS = ("max", "first")


def scaled_norm_threshold(elements: int) -> float:
    """The default clip ``0.5 * sqrt(elements / 36864)`` for ``elements`` per sample (:func:`size_scaled`).

    ``norm_threshold`` is an absolute norm while the noise has norm sqrt(D), so the official 0.5 moves SD 2.1's
    768-px noise by at most 0.26 % of its norm per iteration but an 8x8 image's (D = 64) by 6 %. This keeps the
    official experiments' relative step (0.5 for SD 2.1 at 768 px, 1/3 for SD 1.5's 4x64x64, 2/3 for SDXL's
    4x128x128, 0.0208 for the 8x8 digits) [not in the paper: a transfer rule for other sizes].
    """
    return size_scaled(REFERENCE_MAX_NORM, elements, REFERENCE_ELEMENTS)


def noise_level_direction(cond: torch.Tensor, uncond: torch.Tensor, step: Step) -> torch.Tensor:
    """The refinement direction ``eps_c - eps_u`` (float32+) from predictions of any type (module docstring)."""
    diff = cond.to(compute_dtype(cond.dtype)) - uncond.to(compute_dtype(uncond.dtype))
    kind = step.prediction_type
    if kind in ("epsilon", "flow"):
        return diff
    if kind == "v_prediction":
        return step.alpha * diff
    if kind == "sample":
        return (-step.alpha / step.sigma) * diff
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {kind!r}")


def refine_step(
    noise: torch.Tensor,
    direction: torch.Tensor,
    step_size: float,
    norm_threshold: float | None,
    perturbation: torch.Tensor | None,
    clamp: float | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """One NLG iteration: clip ``direction`` to ``norm_threshold`` per sample (``None``: no clip), step against it, add ``perturbation``,
    optionally clamp to ``[-clamp, clamp]`` (the official "boundary control") and rescale each sample to norm sqrt(D)."""
    if norm_threshold is not None:
        direction = clip_norm(direction, norm_threshold)
    refined = noise - step_size * direction
    if perturbation is not None:
        refined = refined + perturbation
    if clamp is not None:
        refined = refined.clamp(-clamp, clamp)
    if renormalize:  # a zero vector has no direction to rescale: it stays zero (no 0/0)
        norm = per_sample_norm(refined)
        refined = refined * torch.where(norm > 0, math.sqrt(refined[0].numel()) / norm, torch.ones_like(norm))
    return refined


@register("nlg")
class NLG(Guidance):
    """Noise-Level Guidance as a ``prepare_noise`` hook (see the module docstring); 2 NFE per iteration up front.

    Args:
        steps: refinement iterations K >= 0 (0: off, the noise is returned untouched).
        step_size: > 0, multiplies the clipped direction (official 1.0).
        norm_threshold: per-sample clip tau >= 0 of the direction, in eps units, absolute; 0 turns the clip off. ``None``
            (default) scales the official tau = 0.5 to the sample size, ``0.5 * sqrt(D / 36864)`` for D elements per
            sample (:func:`scaled_norm_threshold`; tuned on: SD 2.1 at 768 px, 4x96x96, the official experiments):
            0.5 for SD 2.1 at 768 px, 1/3 for SD 1.5 at 512 px, 2/3 for SDXL, 0.0208 for the 8x8 digits model. The same
            name and convention as APG's clip (``max_norm=`` is accepted as a deprecated alias).
        noise_std: standard deviation >= 0 of the fresh Gaussian perturbation per iteration (0: none). The paper's
            code calls it a *variance*, lambda = 0.001, so the default is sqrt(0.001) ~ 0.0316.
        renormalize: rescale each sample to norm sqrt(D) after every iteration (official: on; a zero vector stays
            zero).
        clamp: clamp the noise to ``[-clamp, clamp]`` each iteration (official "boundary control", off by default;
            the code uses 3).
        frozen_noise: add the *same* draw z at every iteration of a pipeline call (official ``core_experiments``,
            nlg.md §6.1); default ``False`` draws fresh noise each iteration as the notebooks do. z follows the
            call's generator (per sample for a list of generators), so different seeds get different z; the official
            code instead adds one z to every batch of the run (it restores numpy's RNG state around the draw), which
            this option does not reproduce.
        timestep: ``"max"`` (default, as the official code): evaluate the model at the highest training timestep
            t = num_train_timesteps - 1 (999) with that timestep's alpha, sigma, whatever the sampling schedule;
            ``"first"``: at the sampling schedule's first timestep (e.g. 981 for DDIM's ``leading`` 50-step
            schedule) with that evaluation's alpha, sigma. Flow schedules start at s = 1, their highest level, so
            both evaluate there.

    The perturbation follows the pipeline's ``generator`` (per sample for a list) without consuming it, so a seed gives
    the same refined noise and the same sampling noise.
    """

    required_branches = frozenset({"cond", "uncond"})
    renamed = {"max_norm": "norm_threshold"}

    def __init__(
        self,
        steps: int = 20,
        step_size: float = 1.0,
        norm_threshold: float | None = None,
        noise_std: float = DEFAULT_NOISE_STD,
        renormalize: bool = True,
        clamp: float | None = None,
        frozen_noise: bool = False,
        timestep: str = "max",
        **deprecated: Any,
    ) -> None:
        values, names = renamed_arguments(NLG, deprecated, NLG.renamed, norm_threshold=norm_threshold)
        norm_threshold = values["norm_threshold"]
        self.steps = check_int("steps", steps, low=0)
        self.step_size = check_number("step_size", step_size, low=0.0, low_open=True)
        self.norm_threshold = None if norm_threshold is None else check_number(names["norm_threshold"], norm_threshold, low=0.0)
        self.noise_std = check_number("noise_std", noise_std, low=0.0)
        self.renormalize = check_bool("renormalize", renormalize)
        self.clamp = None if clamp is None else check_number("clamp", clamp, low=0.0, low_open=True)
        self.frozen_noise = check_bool("frozen_noise", frozen_noise)
        self.timestep = check_choice("timestep", timestep, TIMESTEPS)

    @classmethod
    def official(cls) -> NLG:
        """The official code's configuration, literally (nlg.md §4): K = 20, step 1, the absolute clip tau = 0.5,
        noise variance 0.001 drawn fresh each iteration, renormalisation on, no clamp, t = 999."""
        return cls(steps=20, step_size=1.0, norm_threshold=REFERENCE_MAX_NORM, noise_std=DEFAULT_NOISE_STD,
                   renormalize=True, clamp=None, frozen_noise=False, timestep="max")

    def threshold_for(self, noise: torch.Tensor) -> float | None:
        """The clip tau for samples shaped like ``noise`` (see ``norm_threshold``); ``None`` when the clip is off."""
        if self.norm_threshold is None:
            return scaled_norm_threshold(noise[0].numel())
        return self.norm_threshold if self.norm_threshold > 0 else None

    def uses(self, hook: str) -> bool:
        if hook == "prepare_noise":
            return self.steps > 0
        return super().uses(hook)

    def prepare_noise(self, noise: torch.Tensor, context: NoiseContext) -> torch.Tensor:
        if self.steps == 0:
            return noise
        refined = noise.to(compute_dtype(noise.dtype))
        threshold = self.threshold_for(refined)
        timestep = self._timestep(context, refined)
        for iteration in range(self.steps):
            step = context.step_for(refined, timestep=timestep)
            preds = context.evaluate(step, [Branch("uncond"), Branch("cond")])
            direction = noise_level_direction(preds["cond"], preds["uncond"], step)
            perturbation = None
            if self.noise_std > 0:
                salt = 0 if self.frozen_noise else iteration
                perturbation = self.noise_std * context.randn_like(refined, salt=salt)
            refined = refine_step(
                refined, direction, self.step_size, threshold, perturbation, self.clamp, self.renormalize
            )
        return refined.to(noise.dtype)

    def _timestep(self, context: NoiseContext, noise: torch.Tensor) -> int | None:
        """The training timestep to evaluate at (``None``: the schedule's first); see ``timestep``."""
        first = context.step_for(noise)
        if self.timestep == "first" or first.prediction_type == "flow":
            return None
        return int(first.scheduler.config.num_train_timesteps) - 1
