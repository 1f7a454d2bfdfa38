"""Tangential Amplifying Guidance (Cho et al., arXiv 2510.04533, ICML 2026): TAG, the post-step rule.

**TAG** (Eqs. 5-7, App. D Alg. 2) edits the solver state after every completed step. With the pre-step latent
``x = x_{k+1}``, the base solver's result ``x~ = x_k`` and the increment ``Delta = x~ - x``:

    u      = x / (||x|| + 1e-8)                       per sample, over all non-batch dims, in float32+
    x_TAG  = x + eta_r * P Delta + eta * P_perp Delta,     P = u u^T,  P_perp = I - u u^T

The normal (radial) part is kept (``eta_r = 1`` throughout the paper: amplifying it over-smooths, Fig. 5) and the
tangential part is scaled by ``eta``. Since ``P_perp x = 0`` this is ``x~ + (eta - 1) P_perp(x) x~``: only the part of
the *new* state orthogonal to the *old* one is amplified. For first-order deterministic steps that are affine in the
model output m (DDIM with ``clip_sample=False``, Euler, flow Euler) it equals stepping with
``m + (eta - 1) P_perp(x) m`` (paper Eq. 16); for multistep solvers (DPM-Solver++ 2M), second-order and stochastic
samplers it does not, and this module implements the paper's post-step form. On stochastic samplers (DDPM, Euler
ancestral) the post-step rule also amplifies the tangential part of the injected noise (tag.md §8.6); the paper
reports deterministic samplers only.

TAG_cfg, the paper's combine-rule variant, is :mod:`guidance.tag_cfg`.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from guidance._validate import check_number
from guidance.base import Guidance, Step
from guidance.registry import register
from guidance.spaces import compute_dtype, per_sample_dot, radial_unit

def tangential_amplify(
    before: torch.Tensor, after: torch.Tensor, eta: float, eta_r: float = 1.0
) -> torch.Tensor:
    """TAG's post-step rule (App. D Alg. 2): ``before + eta_r * P Delta + eta * P_perp Delta``, ``Delta = after - before``.

    ``P`` projects onto ``before`` per sample over all non-batch dims; reductions run in float32 (float64 stays
    float64) and the result has ``after``'s dtype. ``eta = eta_r = 1`` returns ``after`` itself (the base step).
    """
    if eta == 1.0 and eta_r == 1.0:
        return after
    dtype = compute_dtype(after.dtype)
    start, end = before.to(dtype), after.to(dtype)
    increment = end - start
    unit = radial_unit(start)
    radial = per_sample_dot(increment, unit) * unit
    return (start + eta_r * radial + eta * (increment - radial)).to(after.dtype)


#: the top of the 0-1000 timestep scale (flow models: ``t = 1000 s``)
MAX_TIMESTEP = 1000.0
#: per-family eta of the paper's unconditional runs (Table 16; 50 steps, whole schedule, eta_r = 1)
FAMILY_ETA: dict[str, float] = {"sd1.5": 1.15, "sd2.1": 1.15, "sdxl": 1.20, "sd3": 1.05}


@register("tag")
class TAG(Guidance):
    """Tangential Amplifying Guidance as an ``after_step`` hook (see the module docstring); 0 extra NFE.

    Args:
        eta: tangential scale, > 0 (1 is the base sampler, bitwise). Default 1.15, tuned on: SD1.5 and SD2.1
            (the paper's Table 16, unconditional, 50 steps); it is family-dependent (:meth:`for_family`: SDXL 1.20,
            SD3 1.05) but, a factor on the tangential part of each update rather than a norm, needs no scaling with
            the latent size.
        window: ``(t_start, t_end)`` with ``t_start > t_end >= 0`` on the scheduler's 0-1000 timestep scale (flow
            models: ``t = 1000 s``). A completed step is amplified when the timestep of the evaluation that began it
            satisfies ``t_end <= t <= t_start`` (both edges inclusive; Heun: its first stage). Default
            ``(1000, 0)``: the whole schedule; the paper's best SD1.5 window is ``(1000, 400)`` (Table 11).

    Compose it after any combine rule: ``[CFG(7.5), TAG(1.15)]``, ``[APG(...), TAG()]``.
    """

    def __init__(self, eta: float = 1.15, window: Sequence[float] = (1000.0, 0.0)) -> None:
        self.eta = check_number("eta", eta, low=0.0, low_open=True)
        self.window = check_window(window)

    @classmethod
    def for_family(cls, family: str, window: Sequence[float] = (1000.0, 0.0)) -> TAG:
        """TAG with the paper's eta for ``family`` (one of :data:`FAMILY_ETA`: sd1.5, sd2.1, sdxl, sd3)."""
        key = family.lower() if isinstance(family, str) else family
        if key not in FAMILY_ETA:
            raise ValueError(f"family must be one of {', '.join(repr(k) for k in FAMILY_ETA)}; got {family!r}")
        return cls(eta=FAMILY_ETA[key], window=window)

    def active(self, timestep: float) -> bool:
        """Whether a step that began at ``timestep`` lies in the window (both edges inclusive)."""
        t_start, t_end = self.window
        return t_end <= float(timestep) <= t_start

    def after_step(self, before: torch.Tensor, after: torch.Tensor, step: Step) -> torch.Tensor:
        amplified = tangential_amplify(before, after, self.eta)
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
