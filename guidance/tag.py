"""Tangential Amplifying Guidance (Cho et al., arXiv 2510.04533, ICML 2026): TAG and TAG_cfg.

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

**TAG_cfg** (Eqs. 24-26, adaptive Eq. 28) replaces CFG's combination, on predictions at the pre-step input ``x``:

    g      = m_c - m_u,    g_perp = P_perp(x) g
    g_al   = <m_c, g_perp> / ||g_perp||^2 * g_perp          (projection of m_c onto span(g_perp))
    adaptive: g_al <- ||g|| / (||g_al|| + delta) * g_al
    m~     = m_u + w * (m_c - m_u) + eta * g_al

``eta = 0`` is exactly CFG. Every conversion between prediction spaces is ``a * x + b * eps`` (spaces.md §2) and
``P_perp(x)`` removes the ``a * x`` offset, so the same formula on eps, v, x0 or flow velocity gives the same step
(tag.md §3); it is computed on the model output directly, which also stays defined at flow ``s = 1`` where the eps
route is 0/0.
"""

from __future__ import annotations

from collections.abc import Sequence
import torch

from guidance._validate import check_bool, check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.cfg import classifier_free_guidance
from guidance.registry import register
from guidance.spaces import compute_dtype, per_sample_dot, per_sample_norm

#: the eps of the paper's unit vector ``x / (||x|| + eps)`` (App. D)
NORM_EPS = 1e-8
#: floor of a norm we divide by where an additive eps would bias the result (a zero vector stays zero)
TINY = 1e-30


def radial_unit(x: torch.Tensor) -> torch.Tensor:
    """``x / (||x|| + 1e-8)`` per sample over all non-batch dims (in ``x``'s dtype: pass float32 or better)."""
    return x / (per_sample_norm(x) + NORM_EPS)


def tangential_part(v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``P_perp v = v - <v, unit> unit`` per sample, for a unit vector ``unit`` (e.g. from :func:`radial_unit`)."""
    return v - per_sample_dot(v, unit) * unit


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
        if not self.active(step.timestep):
            return after
        return tangential_amplify(before, after, self.eta)


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


def tangential_cfg(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sample: torch.Tensor,
    guidance_scale: float,
    eta: float,
    adaptive: bool = False,
    delta: float = 1e-4,
) -> torch.Tensor:
    """TAG_cfg (Eq. 26): ``m_u + w (m_c - m_u) + eta * g_al`` with ``g_al`` of Eq. 25 (Eq. 28 when ``adaptive``).

    ``sample`` is the model input x the predictions were made at. The projection runs in float64 (float32 on MPS)
    with the exact unit vector of x: a residual parallel to x then has a tangential part at rounding level (an eps
    guard on ``x / (||x|| + eps)`` would leave an ``eps``-sized part along x, whose direction Eq. 25 then amplifies).
    The unit vector of ``g_perp`` is guarded as in Alg. 3 (``||g_perp|| + 1e-8``), so ``g_perp = 0`` gives
    ``g_al = 0`` (CFG), never NaN. ``eta = 0`` returns exactly :func:`~guidance.cfg.classifier_free_guidance`.
    """
    guided = classifier_free_guidance(cond, uncond, guidance_scale)
    if eta == 0:
        return guided
    dtype = torch.float32 if cond.device.type == "mps" else torch.float64
    c, x = cond.to(dtype), sample.to(dtype)
    residual = c - uncond.to(dtype)
    perp = tangential_part(residual, x / per_sample_norm(x).clamp_min(TINY))
    direction = perp / (per_sample_norm(perp) + NORM_EPS)
    aligned = per_sample_dot(c, direction) * direction
    if adaptive:
        aligned = aligned * (per_sample_norm(residual) / (per_sample_norm(aligned) + delta))
    return (guided.to(dtype) + eta * aligned).to(cond.dtype)


@register("tag-cfg")
class TAGCFG(Guidance):
    """TAG_cfg as a ``combine`` rule (C-TAG in the paper's v1; see the module docstring); CFG's 2 NFE per step.

    Args:
        guidance_scale: w >= 0, diffusers' CFG scale (w = 1 with eta = 0 evaluates the conditional branch only).
        eta: additive weight of the aligned tangential residual, >= 0 (0 is exactly CFG). The paper's Table 12 uses
            1-3 (fixed or adaptive); v1 used 2.5 with w = 2.5.
        adaptive: rescale ``g_al`` to the per-sample norm of the CFG residual (Eq. 28), so eta is relative to it.
        delta: the small constant of Eq. 28, > 0, in the model output's units per sample [unverified in the paper:
            configurable].
    """

    scale_low = 0.0

    required_branches = frozenset({"cond", "uncond"})

    def __init__(
        self, guidance_scale: float = 7.5, eta: float = 1.0, adaptive: bool = False, delta: float = 1e-4
    ) -> None:
        self.guidance_scale = check_number("guidance_scale", guidance_scale, low=0.0)
        self.eta = check_number("eta", eta, low=0.0)
        self.adaptive = check_bool("adaptive", adaptive)
        self.delta = check_number("delta", delta, low=0.0, low_open=True)

    def branches(self, step: Step, preds: Predictions) -> list[Branch]:
        if self.guidance_scale == 1.0 and self.eta == 0:
            return [Branch("cond")]
        return [Branch("uncond"), Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        return tangential_cfg(
            cond, preds["uncond"], step.sample, self.guidance_scale, self.eta, self.adaptive, self.delta
        )
