"""Tangential Amplifying Guidance (Cho et al., arXiv 2510.04533, ICML 2026): TAG, the post-step rule.

**TAG** (Eqs. 5-7, App. D Alg. 2) edits the solver state after every completed step. With the pre-step latent
``x = x_{k+1}``, the base solver's result ``x~ = x_k`` and the increment ``Delta = x~ - x``:

    u      = x / (||x|| + 1e-8)                       per sample, over all non-batch dims, in float32+
    x_TAG  = x + r * P Delta + t * P_perp Delta,      P = u u^T,  P_perp = I - u u^T

with ``t = tangential_scale`` and ``r = radial_scale``, the paper's eta and eta_r. The normal (radial) part is kept
(``r = 1`` throughout the paper: amplifying it over-smooths, Fig. 5) and the tangential part is scaled by ``t``.
Since ``P_perp x = 0`` this is ``x~ + (t - 1) P_perp(x) x~``: only the part of the *new* state orthogonal to the *old*
one is amplified. For first-order deterministic steps that are affine in the model output m (DDIM with
``clip_sample=False``, Euler, flow Euler) it equals stepping with ``m + (t - 1) P_perp(x) m`` (paper Eq. 16); for
multistep solvers (DPM-Solver++ 2M), second-order and stochastic samplers it does not, and this module implements the
paper's post-step form. On stochastic samplers (DDPM, Euler ancestral) the post-step rule also amplifies the
tangential part of the injected noise (tag.md §8.6); the paper reports deterministic samplers only.

TAG_cfg, the paper's combine-rule variant, is :mod:`guidance.tag_cfg`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from guidance._validate import check_number, renamed_arguments
from guidance.base import Guidance, Step
from guidance.registry import register
from guidance.spaces import compute_dtype, per_sample_dot, radial_unit

def tangential_amplify(
    before: torch.Tensor, after: torch.Tensor, tangential_scale: float, radial_scale: float = 1.0
) -> torch.Tensor:
    """TAG's post-step rule (Eqs. 5-7, App. D Alg. 2): ``before + radial_scale * P Delta + tangential_scale *
    P_perp Delta``, ``Delta = after - before`` (the paper's eta_r and eta).

    ``P`` projects onto ``before`` per sample over all non-batch dims; reductions run in float32 (float64 stays
    float64) and the result has ``after``'s dtype. Both scales 1 return ``after`` itself (the base step).
    """
    if tangential_scale == 1.0 and radial_scale == 1.0:
        return after
    dtype = compute_dtype(after.dtype)
    start, end = before.to(dtype), after.to(dtype)
    increment = end - start
    unit = radial_unit(start)
    radial = per_sample_dot(increment, unit) * unit
    return (start + radial_scale * radial + tangential_scale * (increment - radial)).to(after.dtype)


#: the top of the 0-1000 timestep scale (flow models: ``t = 1000 s``)
MAX_TIMESTEP = 1000.0
#: per-family tangential scale (the paper's eta) of its unconditional runs (Table 16; 50 steps, whole schedule,
#: radial scale 1)
FAMILY_TANGENTIAL_SCALE: dict[str, float] = {"sd1.5": 1.15, "sd2.1": 1.15, "sdxl": 1.20, "sd3": 1.05}


@register("tag")
class TAG(Guidance):
    """Tangential Amplifying Guidance as an ``after_step`` hook (see the module docstring); 0 extra NFE.

    Args:
        tangential_scale: the multiplicative factor on the tangential part of each step, > 0 (the paper's eta,
            Eqs. 5-7; 1 is the base sampler, bitwise). Default 1.15, tuned on: SD1.5 and SD2.1 (the paper's Table 16,
            unconditional, 50 steps); it is family-dependent (:meth:`for_family`: SDXL 1.20, SD3 1.05) but, a factor
            on the tangential part of each update rather than a norm, needs no scaling with the latent size.
            ``eta=`` is accepted as a deprecated alias.
        window: ``(t_start, t_end)`` with ``t_start > t_end >= 0`` on the scheduler's 0-1000 timestep scale (flow
            models: ``t = 1000 s``). A completed step is amplified when the timestep of the evaluation that began it
            satisfies ``t_end <= t <= t_start`` (both edges inclusive; Heun: its first stage). Default
            ``(1000, 0)``: the whole schedule; the paper's best SD1.5 window is ``(1000, 400)`` (Table 11).

    Compose it after any combine rule: ``[CFG(7.5), TAG(1.15)]``, ``[APG(...), TAG()]``.
    """

    renamed = {"eta": "tangential_scale"}

    def __init__(
        self, tangential_scale: float = 1.15, window: Sequence[float] = (1000.0, 0.0), **deprecated: Any
    ) -> None:
        values, names = renamed_arguments(TAG, deprecated, TAG.renamed, tangential_scale=tangential_scale)
        self.tangential_scale = check_number(
            names["tangential_scale"], values["tangential_scale"], low=0.0, low_open=True
        )
        self.window = check_window(window)

    @classmethod
    def for_family(cls, family: str, window: Sequence[float] = (1000.0, 0.0)) -> TAG:
        """TAG with the paper's tangential scale for ``family`` (one of :data:`FAMILY_TANGENTIAL_SCALE`: sd1.5,
        sd2.1, sdxl, sd3)."""
        key = family.lower() if isinstance(family, str) else family
        if key not in FAMILY_TANGENTIAL_SCALE:
            choices = ", ".join(repr(k) for k in FAMILY_TANGENTIAL_SCALE)
            raise ValueError(f"family must be one of {choices}; got {family!r}")
        return cls(tangential_scale=FAMILY_TANGENTIAL_SCALE[key], window=window)

    def active(self, timestep: float) -> bool:
        """Whether a step that began at ``timestep`` lies in the window (both edges inclusive)."""
        t_start, t_end = self.window
        return t_end <= float(timestep) <= t_start

    def after_step(self, before: torch.Tensor, after: torch.Tensor, step: Step) -> torch.Tensor:
        amplified = tangential_amplify(before, after, self.tangential_scale)
        t_start, t_end = self.window
        if t_start >= MAX_TIMESTEP and t_end <= 0:
            return amplified  # the whole schedule
        # decided on the timestep's own device: no host synchronisation per step
        t = torch.as_tensor(step.timestep, device=after.device)
        return torch.where((t_end <= t) & (t <= t_start), amplified, after)


def check_window(window: object) -> tuple[float, float]:
    """``(t_start, t_end)`` as floats with ``t_start > t_end >= 0``; TypeError/ValueError naming ``window`` otherwise."""
    if isinstance(window, (str, bytes)) or not isinstance(window, Sequence):
        raise TypeError(f"window must be a pair (t_start, t_end), got {type(window).__name__} {window!r}")
    if len(window) != 2:
        raise ValueError(f"window must be a pair (t_start, t_end) on the 0-1000 timestep scale, got {window!r}")
    t_start = check_number("window[0] (t_start)", window[0], low=0.0)
    t_end = check_number("window[1] (t_end)", window[1], low=0.0)
    if t_start <= t_end:
        raise ValueError(
            f"window (t_start, t_end) must have t_start > t_end (sampling runs from high to low timesteps), "
            f"got {tuple(window)!r}; e.g. (1000, 0) for the whole schedule"
        )
    return t_start, t_end
