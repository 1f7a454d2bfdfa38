"""Noise-Level Guidance (Mannering, Huang, Prugel-Bennett, arXiv 2509.13936): refine the initial noise.

Before sampling, K iterations on the unit-variance initial noise n (official notebooks / ``refine_noise``, nlg.md §3),
each with one batched ``[uncond, cond]`` evaluation at the schedule's first noise level:

    d  = eps_c(n) - eps_u(n)                       ~ -sigma_T grad log p(y | n): ascent on log p(y | n)
    d  = d * min(1, tau / ||d||)                   per-sample clip (``max_norm`` = tau, eps units)
    n  = n - step_size * d + noise_std * z         z ~ N(0, I), a fresh draw every iteration
    n  = n * sqrt(D) / ||n||                       back to the Gaussian shell, per sample (D = elements per sample)

Sampling then runs unchanged with whatever combine rule is configured (the paper's main setting: no CFG). Cost: 2 NFE
per iteration and sample, counted by the loop.

The direction from other prediction types, at the same input x (spaces.md §2): v-prediction
``eps_c - eps_u = alpha (v_c - v_u)`` (the ``sigma x`` term cancels); x0-prediction
``-(alpha / sigma) (x0_c - x0_u)``. Flow matching (``x = (1 - s) x0 + s eps``, velocity ``u = eps - x0``): the eps
difference ``(1 - s)(u_c - u_u)`` vanishes at ``s = 1``, where flow schedules start, so the direction is the velocity
difference ``u_c - u_u = -(x0_c - x0_u) / s``, i.e. the eps difference divided by ``alpha = 1 - s`` (the same sign,
finite at ``s = 1``); ``max_norm`` is then in velocity units [reconstruction: the official code covers VP models only].
"""

from __future__ import annotations

import math

import torch

from guidance._validate import check_bool, check_int, check_number
from guidance.apg import clip_norm
from guidance.base import Branch, Guidance, NoiseContext, Step
from guidance.registry import register
from guidance.spaces import PREDICTION_TYPES, compute_dtype, per_sample_norm

#: the official noise *variance* lambda = 0.001 (``--noise_level``), as a standard deviation
DEFAULT_NOISE_STD = math.sqrt(1e-3)
#: the official clip tau = 0.5 and the latent size it was used at (SD2.1 at 768 px: 4x96x96, the README experiment)
REFERENCE_MAX_NORM = 0.5
REFERENCE_ELEMENTS = 4 * 96 * 96


def scaled_max_norm(elements: int) -> float:
    """The official clip ``0.5 * sqrt(elements / 36864)`` for ``elements`` per sample.

    ``max_norm`` is an absolute norm while the noise has norm sqrt(D), so the official 0.5 moves SD2.1's noise by at
    most 0.26 % of its norm per iteration but an 8x8 image's (D = 64) by 6 %. This keeps the relative step
    (0.0208 for the 8x8 digits, 0.333 for SD1.5's 4x64x64) [not in the paper: a transfer rule for other sizes].
    """
    return REFERENCE_MAX_NORM * math.sqrt(elements / REFERENCE_ELEMENTS)


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
    max_norm: float | None,
    perturbation: torch.Tensor | None,
    clamp: float | None = None,
    renormalize: bool = True,
) -> torch.Tensor:
    """One NLG iteration: clip ``direction`` to ``max_norm`` per sample, step against it, add ``perturbation``,
    optionally clamp to ``[-clamp, clamp]`` (the official "boundary control") and rescale each sample to norm sqrt(D)."""
    if max_norm is not None:
        direction = clip_norm(direction, max_norm)
    refined = noise - step_size * direction
    if perturbation is not None:
        refined = refined + perturbation
    if clamp is not None:
        refined = refined.clamp(-clamp, clamp)
    if renormalize:
        refined = refined * (math.sqrt(refined[0].numel()) / per_sample_norm(refined))
    return refined


@register("nlg")
class NLG(Guidance):
    """Noise-Level Guidance as a ``prepare_noise`` hook (see the module docstring); 2 NFE per iteration up front.

    Args:
        steps: refinement iterations K >= 0 (0: off, the noise is returned untouched).
        step_size: > 0, multiplies the clipped direction (official 1.0).
        max_norm: per-sample clip tau > 0 of the direction, in eps units (official 0.5, set for SD2.1 latents with
            D = 36,864; :func:`scaled_max_norm` keeps its relative size for other D); ``None``: no clip.
        noise_std: standard deviation >= 0 of the fresh Gaussian perturbation per iteration (0: none). The paper's
            code calls it a *variance*, lambda = 0.001, so the default is sqrt(0.001) ~ 0.0316.
        renormalize: rescale each sample to norm sqrt(D) after every iteration (official: on).
        clamp: clamp the noise to ``[-clamp, clamp]`` each iteration (official "boundary control", off by default;
            the code uses 3).
        frozen_noise: add the *same* draw z at every iteration, as the official ``core_experiments`` code
            accidentally does (nlg.md §6.1); default ``False`` draws fresh noise each iteration as the notebooks do.

    The model is evaluated at the schedule's first timestep (999 for ``trailing`` spacing, 981 for DDIM's ``leading``
    50-step schedule) with that evaluation's alpha, sigma. The perturbation follows the pipeline's ``generator``
    (per sample for a list) without consuming it, so a seed gives the same refined noise and the same sampling noise.
    """

    required_branches = frozenset({"cond", "uncond"})

    def __init__(
        self,
        steps: int = 20,
        step_size: float = 1.0,
        max_norm: float | None = 0.5,
        noise_std: float = DEFAULT_NOISE_STD,
        renormalize: bool = True,
        clamp: float | None = None,
        frozen_noise: bool = False,
    ) -> None:
        self.steps = check_int("steps", steps, low=0)
        self.step_size = check_number("step_size", step_size, low=0.0, low_open=True)
        self.max_norm = None if max_norm is None else check_number("max_norm", max_norm, low=0.0, low_open=True)
        self.noise_std = check_number("noise_std", noise_std, low=0.0)
        self.renormalize = check_bool("renormalize", renormalize)
        self.clamp = None if clamp is None else check_number("clamp", clamp, low=0.0, low_open=True)
        self.frozen_noise = check_bool("frozen_noise", frozen_noise)

    def uses(self, hook: str) -> bool:
        if hook == "prepare_noise":
            return self.steps > 0
        return super().uses(hook)

    def prepare_noise(self, noise: torch.Tensor, context: NoiseContext) -> torch.Tensor:
        if self.steps == 0:
            return noise
        refined = noise.to(compute_dtype(noise.dtype))
        for iteration in range(self.steps):
            step = context.step_for(refined)
            preds = context.evaluate(step, [Branch("uncond"), Branch("cond")])
            direction = noise_level_direction(preds["cond"], preds["uncond"], step)
            perturbation = None
            if self.noise_std > 0:
                salt = 0 if self.frozen_noise else iteration
                perturbation = self.noise_std * context.randn_like(refined, salt=salt)
            refined = refine_step(
                refined, direction, self.step_size, self.max_norm, perturbation, self.clamp, self.renormalize
            )
        return refined.to(noise.dtype)
