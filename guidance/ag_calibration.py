"""Calibrate Adaptive Guidance's threshold for one model, scheduler, step count and guidance scale.

gamma-bar is not portable (``../shared/methods/adaptive_guidance.md`` §6.1): it depends on the model, its
parameterisation, the scheduler, the number of steps, the scale and the negative-prompt policy. The helper runs the
pipeline a few times with an :class:`~guidance.adaptive.AdaptiveGuidance` in ``record_only`` mode (the base rule's
output at every step, gamma logged per sample and step) and proposes the threshold at which a sample that is
generated alone switches after the chosen fraction of the steps.

A sample switches after the first step k with ``gamma_k >= threshold``, i.e. once the running maximum
``M_k = max_{j <= k} gamma_j`` reaches the threshold; it then costs ``T + k + 1`` NFEs with a first-order scheduler
(``k + 1`` guided steps). Two proposals for a target fraction f of guided steps:

* ``target="mean"`` (default): the largest threshold whose *mean* guided fraction over the calibration samples is at
  most f, so AG's NFEs are at most ``(1 + f) / 2`` of CFG's on average (f = 0.5: -25%);
* ``target="quantile"``: the ``quantile`` over samples of ``M_{k*}`` at ``k* = ceil(f T) - 1``; with the median,
  half of the samples switch at or before k*. A higher quantile is more conservative (later switches).

The proposals assume samples switch alone (``reduce="per-sample"``, AG's default, or batches of one). With
``reduce="all"`` a batch waits for its slowest sample and switches later.

Usage (any pipeline of this library; ``run`` performs one call with the guidance it is given)::

    from guidance import CFG
    from guidance.ag_calibration import calibrate_threshold

    def run(guidance):
        pipe(class_labels=list(range(10)), guidance=guidance, num_inference_steps=30,
             generator=torch.Generator().manual_seed(0))

    result = calibrate_threshold(run, base=CFG(4.0), fraction=0.5)
    print(result.threshold, result.switch_steps, result.mean_nfe_fraction)
    rule = AdaptiveGuidance(CFG(4.0), threshold=result.threshold)
    pipe(class_labels=[3, 7], guidance=rule, num_inference_steps=30)
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guidance._validate import check_choice, check_number
from guidance.adaptive import AdaptiveGuidance
from guidance.base import Guidance

Run = Callable[[Guidance], Any]


def record_gammas(runs: Run | Sequence[Run], base: Guidance | str | dict[str, Any] = "cfg", space: str = "x0") -> torch.Tensor:
    """gamma per sample and step, float64 ``[N, T]``, from pipeline calls that run ``base`` at every step.

    Each run is called with a fresh record-only :class:`AdaptiveGuidance`; the samples of all runs are concatenated.
    """
    rows = []
    for run in [runs] if callable(runs) else list(runs):
        recorder = AdaptiveGuidance(base, threshold=1.0, space=space, record_only=True)
        run(recorder)
        if not recorder.gamma_history:
            raise ValueError("the run recorded no gamma: did it pass the guidance to a pipeline with an uncond branch?")
        rows.append(torch.stack(recorder.gamma_history, dim=1))
    lengths = {r.shape[1] for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"runs used different step counts {sorted(lengths)}; calibrate one configuration at a time")
    return torch.cat(rows)


def running_max(gammas: torch.Tensor) -> torch.Tensor:
    """``M_k = max_{j <= k} gamma_j`` per sample (NaN, an unmeasured step, counts as -inf)."""
    return torch.nan_to_num(gammas.double(), nan=-math.inf).cummax(dim=1).values


def switch_steps(gammas: torch.Tensor, threshold: float, reduce: str = "per-sample") -> torch.Tensor:
    """The last guided step per sample (long ``[N]``) that AG with ``threshold`` would take on these gamma curves.

    ``reduce="all"`` treats the N samples as one batch (switch when all of them reached the threshold at the same
    step). A sample that never switches gets ``T - 1``, which costs the same as never switching.
    """
    num_steps = gammas.shape[1]
    crossed = torch.nan_to_num(gammas.double(), nan=-math.inf) >= threshold
    if reduce == "all":
        crossed = crossed.all(dim=0, keepdim=True).expand_as(crossed)
    elif reduce != "per-sample":
        raise ValueError(f"reduce must be 'all' or 'per-sample', got {reduce!r}")
    first = crossed.double().argmax(dim=1)  # index of the first crossing (0 when there is none)
    return torch.where(crossed.any(dim=1), first, num_steps - 1).long()


def target_step(num_steps: int, fraction: float) -> int:
    """The last guided step ``k* = ceil(fraction * T) - 1`` for a target fraction of guided steps (at least 0)."""
    check_number("fraction", fraction, low=0.0, high=1.0, low_open=True)
    return max(math.ceil(fraction * num_steps - 1e-9) - 1, 0)


def mean_guided_fraction(gammas: torch.Tensor, threshold: float) -> float:
    """Mean over samples (each switching alone) of the fraction of steps that are guided, ``(k + 1) / T``."""
    return float((switch_steps(gammas, threshold) + 1).double().mean() / gammas.shape[1])


def propose_threshold(gammas: torch.Tensor, fraction: float = 0.5, target: str = "mean", quantile: float = 0.5) -> float:
    """A threshold that makes AG guide ``fraction`` of the steps on the calibration curves ``gammas`` ``[N, T]``.

    * ``target="mean"`` (default): the largest threshold whose mean guided fraction over the samples (each switching
      alone) is at most ``fraction``, i.e. the NFE target is met on average: ``NFE / NFE_CFG <= (1 + fraction) / 2``
      for first-order schedulers. Candidates are the observed running maxima of gamma.
    * ``target="quantile"``: the ``quantile`` over samples of the running maximum of gamma at
      ``k* = ceil(fraction T) - 1``; with the median, half of the samples switch at or before k*.

    The result is clamped into AG's allowed range (0, 1].
    """
    check_choice("target", target, ("mean", "quantile"))
    check_number("quantile", quantile, low=0.0, high=1.0)
    maxima = running_max(gammas)
    if target == "quantile":
        value = float(torch.quantile(maxima[:, target_step(gammas.shape[1], fraction)], quantile))
    else:
        check_number("fraction", fraction, low=0.0, high=1.0, low_open=True)
        candidates = torch.unique(maxima[torch.isfinite(maxima)]).tolist()  # ascending; guided fraction grows with it
        low, high = 0, len(candidates) - 1
        while low < high:  # the last candidate whose mean guided fraction is within the target (or the first one)
            middle = (low + high + 1) // 2
            if mean_guided_fraction(gammas, candidates[middle]) <= fraction:
                low = middle
            else:
                high = middle - 1
        value = candidates[low]
    return min(max(value, torch.finfo(torch.float64).tiny), 1.0)


@dataclass
class Calibration:
    """A proposed threshold and what it does on the calibration samples (first-order scheduler NFE accounting)."""

    threshold: float
    target_step: int
    gammas: torch.Tensor
    switch_steps: torch.Tensor

    @property
    def num_steps(self) -> int:
        return self.gammas.shape[1]

    @property
    def mean_nfe_fraction(self) -> float:
        """Mean of ``(T + k + 1) / 2T`` over samples generated alone: AG's NFEs relative to CFG's."""
        return float(((self.num_steps + self.switch_steps + 1) / (2 * self.num_steps)).double().mean())


def calibrate_threshold(
    runs: Run | Sequence[Run],
    base: Guidance | str | dict[str, Any] = "cfg",
    fraction: float = 0.5,
    target: str = "mean",
    quantile: float = 0.5,
    space: str = "x0",
) -> Calibration:
    """Record gamma on ``runs`` (:func:`record_gammas`) and propose a threshold (:func:`propose_threshold`)."""
    gammas = record_gammas(runs, base, space)
    threshold = propose_threshold(gammas, fraction, target, quantile)
    return Calibration(threshold, target_step(gammas.shape[1], fraction), gammas, switch_steps(gammas, threshold))
