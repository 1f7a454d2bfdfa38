"""Guidance in a limited interval of noise levels (Kynkaanniemi et al., NeurIPS 2024, arXiv 2404.07724).

The paper applies CFG only where the noise level lies in a middle interval and samples conditionally elsewhere:
guidance at high noise drives samples towards a few modes (less diversity), and at low noise it does little. With the
noise level ``s`` of the current model evaluation (:attr:`guidance.base.Step.noise_level`: ``sigma / alpha`` for VP
and VE models, which is EDM's sigma; the flow sigma for flow models),

    out = base(out_c, out_u, ...)      if low < s <= high
    out = out_c                        otherwise (the unconditional and any other branch is not evaluated: 1 NFE)

The paper's EDM2 setting is ``(0.28, 5.42]`` (its default here). Any combine rule can be limited: CFG, APG, TAG-cfg,
GFCG, Adaptive Guidance. The decision is taken per model evaluation, so the two evaluations of a Heun step follow their
own noise levels. The wrapped rule sees only the evaluations inside the interval (its per-evaluation state, e.g. APG's
momentum, advances only there).

**With Adaptive Guidance** the two orders are the same rule: ``AdaptiveGuidance(GuidanceInterval(CFG(w)))`` and
``GuidanceInterval(AdaptiveGuidance(CFG(w)))`` both guide an evaluation exactly when it is inside the interval and AG
has not latched, and AG measures its statistic only on guided evaluations (tested bit for bit).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from guidance._validate import check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.registry import register, scale_of
from guidance.wrap import resolve_base

#: the paper's interval for EDM2 (sigma in (0.28, 5.42])
EDM2_SIGMA_RANGE = (0.28, 5.42)


def check_sigma_range(name: str, value: object) -> tuple[float, float]:
    """``(low, high)`` with ``0 <= low <= high <= inf`` (``high = inf``: unbounded above; ``low == high``: empty)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence) or len(value) != 2:
        raise ValueError(f"{name} must be a pair (low, high) of noise levels with 0 <= low <= high, got {value!r}")
    low = check_number(f"{name}[0]", value[0], low=0.0)
    high = value[1]
    if not (isinstance(high, (int, float)) and not isinstance(high, bool) and math.isinf(high) and high > 0):
        high = check_number(f"{name}[1]", high, low=0.0)
    if high < low:
        raise ValueError(f"{name} is inverted: low={low:g} > high={high:g}; it must satisfy 0 <= low <= high")
    return (low, float(high))


def in_sigma_range(noise_level: float, sigma_range: tuple[float, float]) -> bool:
    """Whether ``low < noise_level <= high``."""
    low, high = sigma_range
    return low < noise_level <= high


@register("interval")
class GuidanceInterval(Guidance):
    """The wrapped rule inside ``low < noise level <= high``, conditional-only outside (see the module docstring).

    Args:
        base: the guidance to limit: a module (``CFG(3)``, ``APG(...)``, ``AdaptiveGuidance(...)``), a registered name
            or a config dict (default ``"cfg"``).
        sigma_range: ``(low, high)`` noise levels, ``0 <= low <= high``; ``high`` may be ``float("inf")``. ``(0, inf)``
            is every evaluation (the base rule exactly); ``low == high`` is empty (conditional sampling). Default:
            the paper's EDM2 interval (0.28, 5.42].
        guidance_scale: builds ``base`` when it is a name; otherwise only checked against the base's own scale.

    Diagnostics, reset at every generation: ``guided_evaluations`` (the evaluation indices inside the interval).
    """

    def __init__(
        self,
        base: Guidance | str | dict[str, Any] = "cfg",
        sigma_range: Sequence[float] = EDM2_SIGMA_RANGE,
        guidance_scale: float | None = None,
    ) -> None:
        if guidance_scale is not None:
            check_number("guidance_scale", guidance_scale, low=0.0)
        self.base = resolve_base(base, guidance_scale, "GuidanceInterval")
        self.sigma_range = check_sigma_range("sigma_range", sigma_range)
        self.guidance_scale = scale_of(self.base)
        self.required_branches = self.base.required_branches
        self.reset()

    def reset(self) -> None:
        self.base.reset()
        self.guided_evaluations: list[int] = []

    def inside(self, step: Step) -> bool:
        """Whether the evaluation of ``step`` is guided."""
        return in_sigma_range(step.noise_level, self.sigma_range)

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        return self.base.branches(preds, step) if self.inside(step) else [Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        if not self.inside(step):
            return preds["cond"]
        self.guided_evaluations.append(step.evaluation)
        return self.base.combine(preds, step)
