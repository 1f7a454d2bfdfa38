"""TAG_cfg (Cho et al., arXiv 2510.04533, ICML 2026, Eqs. 24-26; adaptive Eq. 28): CFG plus the aligned tangential
residual. The post-step TAG of the same paper is :mod:`guidance.tag`.

TAG_cfg replaces CFG's combination, on predictions at the pre-step input ``x``:

    g      = m_c - m_u,    g_perp = P_perp(x) g
    g_al   = <m_c, g_perp> / ||g_perp||^2 * g_perp          (projection of m_c onto span(g_perp))
    adaptive: g_al <- ||g|| / (||g_al|| + delta) * g_al
    m~     = m_u + w * (m_c - m_u) + tangential_weight * g_al      (the paper's eta, Eq. 26)

``tangential_weight = 0`` is exactly CFG. Every conversion between prediction spaces is ``a * x + b * eps``
(spaces.md §2) and ``P_perp(x)`` removes the ``a * x`` offset, so the same formula on eps, v, x0 or flow velocity gives
the same step (tag.md §3); it is computed on the model output directly, which also stays defined at flow ``s = 1``
where the eps route is 0/0.
"""

from __future__ import annotations

import torch

from typing import Any

from guidance._validate import check_bool, check_number, renamed_arguments
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.cfg import classifier_free_guidance
from guidance.registry import register
from guidance.spaces import NORM_EPS, TINY, per_sample_dot, per_sample_norm, tangential_part


def tangential_cfg(
    cond: torch.Tensor,
    uncond: torch.Tensor,
    sample: torch.Tensor,
    guidance_scale: float,
    tangential_weight: float,
    adaptive: bool = False,
    delta: float = 1e-4,
) -> torch.Tensor:
    """TAG_cfg (Eq. 26): ``m_u + w (m_c - m_u) + tangential_weight * g_al`` with ``g_al`` of Eq. 25 (Eq. 28 when
    ``adaptive``); ``tangential_weight`` is the paper's eta.

    ``sample`` is the model input x the predictions were made at. The projection runs in float64 (float32 on MPS)
    with the exact unit vector of x: a residual parallel to x then has a tangential part at rounding level (an eps
    guard on ``x / (||x|| + eps)`` would leave an ``eps``-sized part along x, whose direction Eq. 25 then amplifies).
    The unit vector of ``g_perp`` is guarded as in Alg. 3 (``||g_perp|| + 1e-8``), so ``g_perp = 0`` gives
    ``g_al = 0`` (CFG), never NaN. ``tangential_weight = 0`` returns exactly
    :func:`~guidance.cfg.classifier_free_guidance`.
    """
    guided = classifier_free_guidance(cond, uncond, guidance_scale)
    if tangential_weight == 0:
        return guided
    dtype = torch.float32 if cond.device.type == "mps" else torch.float64
    c, x = cond.to(dtype), sample.to(dtype)
    residual = c - uncond.to(dtype)
    perp = tangential_part(residual, x / per_sample_norm(x).clamp_min(TINY))
    direction = perp / (per_sample_norm(perp) + NORM_EPS)
    aligned = per_sample_dot(c, direction) * direction
    if adaptive:
        aligned = aligned * (per_sample_norm(residual) / (per_sample_norm(aligned) + delta))
    return (guided.to(dtype) + tangential_weight * aligned).to(cond.dtype)


@register("tag-cfg")
class TAGCFG(Guidance):
    """TAG_cfg as a ``combine`` rule (C-TAG in the paper's v1; see the module docstring); CFG's 2 NFE per step.

    Args:
        guidance_scale: w >= 0, diffusers' CFG scale (w = 1 with tangential_weight = 0 evaluates the conditional
            branch only).
        tangential_weight: the additive weight of the aligned tangential residual ``g_al``, >= 0 (the paper's eta,
            Eqs. 24-26; 0 is exactly CFG). The paper's Table 12 uses 1-3 (fixed or adaptive); v1 used 2.5 with
            w = 2.5. ``eta=`` is accepted as a deprecated alias.
        adaptive: rescale ``g_al`` to the per-sample norm of the CFG residual (Eq. 28), so the weight is relative to
            it.
        delta: the small constant of Eq. 28, > 0, in the model output's units per sample [unverified in the paper:
            configurable].
    """

    scale_low = 0.0
    renamed = {"eta": "tangential_weight"}

    required_branches = frozenset({"cond", "uncond"})

    def __init__(
        self,
        guidance_scale: float = 7.5,
        tangential_weight: float = 1.0,
        adaptive: bool = False,
        delta: float = 1e-4,
        **deprecated: Any,
    ) -> None:
        values, names = renamed_arguments(TAGCFG, deprecated, TAGCFG.renamed, tangential_weight=tangential_weight)
        self.guidance_scale = check_number("guidance_scale", guidance_scale, low=0.0)
        self.tangential_weight = check_number(names["tangential_weight"], values["tangential_weight"], low=0.0)
        self.adaptive = check_bool("adaptive", adaptive)
        self.delta = check_number("delta", delta, low=0.0, low_open=True)

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        if self.guidance_scale == 1.0 and self.tangential_weight == 0:
            return [Branch("cond")]
        return [Branch("uncond"), Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        return tangential_cfg(
            cond, preds["uncond"], step.sample, self.guidance_scale, self.tangential_weight, self.adaptive, self.delta
        )
