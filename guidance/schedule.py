"""Guidance-scale schedules: the wrapped rule's scale varies over the sampling steps.

With the base rule's scale ``w``, ``N`` sampling steps, the completed-step index ``i`` (:attr:`Step.index`; both
evaluations of a Heun step share it) and the step's position ``p = (i + 1/2) / N`` in (0, 1) (the midpoint of step i:
``p`` near 0 at the highest noise, near 1 at the lowest), the named schedules are

    "constant"   w_i = w
    "linear"     w_i = 1 + 2 (w - 1) p                 rises from ~1 to ~2w - 1
    "cosine"     w_i = 1 + (w - 1) (1 - cos(pi p))     rises from ~1 to ~2w - 1, flat at both ends
    "interval"   w_i = w if low < s <= high, else 1    s = the evaluation's noise level (Step.noise_level)

"linear" and "cosine" are *increasing* schedules, the family that Wang et al. ("Analysis of Classifier-Free Guidance
Weight Schedulers", TMLR 2024, arXiv 2404.13040) found to beat a constant scale; the parametrisation here is ours: the
midpoint positions make their mean over the steps exactly ``w`` (the same total guidance as the constant scale) and
keep every ``w_i`` above 1, so CFG evaluates the unconditional branch at every step (the same NFE as CFG). "interval"
is Kynkaanniemi et al.'s limited interval (arXiv 2404.07724) as a schedule: ``w_i = 1`` is the base rule's own "no
guidance", which for CFG and APG also skips the unconditional branch (see :class:`guidance.interval.GuidanceInterval`
for the form that does so for any rule).

A callable ``schedule(step_index, num_steps, sigma) -> scale`` receives ``Step.index``, ``Step.num_steps`` and
``Step.noise_level`` of every model evaluation.

**One meaning of scale.** A schedule never reinterprets the scale: at every evaluation it sets the base rule's own
strength (:attr:`~guidance.base.Guidance.scale_argument`: CFG's and APG's w ``guidance_scale``, GFCG's lambda
``confusion_scale``...) to ``w_i`` for the duration of the hook call and restores it afterwards (:func:`scale_set_to`),
so the rule computes exactly what ``Rule(guidance_scale=w_i)`` computes, with its
per-generation state (APG's momentum) intact. Rules opt in by declaring :attr:`guidance.base.Guidance.scale_low`, the
smallest scale they accept; every ``w_i`` is checked against it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch

from guidance._validate import check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.interval import check_sigma_range, in_sigma_range
from guidance.registry import register, scale_of
from guidance.wrap import resolve_base, wrapped_chain

Schedule = Callable[[int, int, float], float]


def position(step_index: int, num_steps: int) -> float:
    """``(i + 1/2) / N``: the midpoint of step ``i`` of ``N`` in (0, 1)."""
    return (step_index + 0.5) / num_steps


def constant_scale(scale: float, step_index: int, num_steps: int) -> float:
    """``w``."""
    return scale


def linear_scale(scale: float, step_index: int, num_steps: int) -> float:
    """``1 + 2 (w - 1) p``."""
    return 1.0 + 2.0 * (scale - 1.0) * position(step_index, num_steps)


def cosine_scale(scale: float, step_index: int, num_steps: int) -> float:
    """``1 + (w - 1) (1 - cos(pi p))``."""
    return 1.0 + (scale - 1.0) * (1.0 - math.cos(math.pi * position(step_index, num_steps)))


#: step-indexed schedules ``f(w, step_index, num_steps) -> w_i``; "interval" is handled by :class:`ScaleSchedule`
STEP_SCHEDULES: dict[str, Callable[[float, int, int], float]] = {
    "constant": constant_scale,
    "linear": linear_scale,
    "cosine": cosine_scale,
}
SCHEDULE_NAMES = (*STEP_SCHEDULES, "interval")


def scaled_rules(rule: Guidance) -> list[Guidance]:
    """The rules in ``rule``'s wrapper chain whose hooks read their strength (``scale_argument``) at call time
    (``scale_low`` is set)."""
    return [r for r in wrapped_chain(rule) if r.scale_low is not None]


@contextmanager
def scale_set_to(rule: Guidance, scale: float) -> Iterator[None]:
    """Set the strength (``scale_argument``: CFG's ``guidance_scale``, GFCG's ``confusion_scale``) of the scaled
    rules in ``rule``'s chain to ``scale`` inside the block, then restore it."""
    targets = scaled_rules(rule)
    saved = [getattr(r, r.scale_argument) for r in targets]
    for target in targets:
        setattr(target, target.scale_argument, scale)
    try:
        yield
    finally:
        for target, value in zip(targets, saved):
            setattr(target, target.scale_argument, value)


@register("schedule")
class ScaleSchedule(Guidance):
    """The base rule with its scale set per step by ``schedule`` (see the module docstring for the schedules).

    Args:
        base: a rule with a per-call scale (CFG, APG, TAG-cfg, GFCG, or a wrapper of one such as
            ``AdaptiveGuidance``): a module, a registered name or a config dict (default ``"cfg"``). Its
            ``guidance_scale`` is the ``w`` of the named schedules.
        schedule: ``"constant"``, ``"linear"`` (default), ``"cosine"``, ``"interval"``, or a callable
            ``(step_index, num_steps, sigma) -> scale``. A callable is kept as is in :meth:`config` (a dict round
            trip works; JSON needs a name).
        sigma_range: ``(low, high)`` noise levels of the ``"interval"`` schedule (required by it, refused otherwise).
        guidance_scale: builds ``base`` when it is a name; otherwise only checked against the base's own scale.

    Diagnostics, reset at every generation: ``scale_history``, one ``(step_index, evaluation, scale)`` per evaluation.
    """

    def __init__(
        self,
        base: Guidance | str | dict[str, Any] = "cfg",
        schedule: str | Schedule = "linear",
        sigma_range: Sequence[float] | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        if guidance_scale is not None:
            check_number("guidance_scale", guidance_scale, low=0.0)
        self.base = resolve_base(base, guidance_scale, "ScaleSchedule")
        targets = scaled_rules(self.base)
        if not targets:
            raise ValueError(
                f"ScaleSchedule needs a base whose hooks read guidance_scale at every call (CFG, APG, TAG-cfg, GFCG, "
                f"or a wrapper of one); got {self.base!r}"
            )
        if not callable(schedule) and schedule not in SCHEDULE_NAMES:
            raise ValueError(f"schedule must be one of {', '.join(map(repr, SCHEDULE_NAMES))} or a callable "
                             f"(step_index, num_steps, sigma) -> scale; got {schedule!r}")
        if schedule == "interval":
            if sigma_range is None:
                raise ValueError("schedule='interval' needs sigma_range=(low, high)")
            sigma_range = check_sigma_range("sigma_range", sigma_range)
        elif sigma_range is not None:
            raise ValueError(f"sigma_range is used by schedule='interval' only; got schedule={schedule!r}")
        self.schedule = schedule
        self.sigma_range = sigma_range
        self.guidance_scale = scale_of(targets[0])
        self._low = max(r.scale_low for r in targets)
        self.required_branches = self.base.required_branches
        self.reset()

    def reset(self) -> None:
        self.base.reset()
        self.scale_history: list[tuple[int, int, float]] = []
        self._current: tuple[int, float] | None = None  # (evaluation, scale) of the current evaluation

    def scale_at(self, step: Step) -> float:
        """The scale ``w_i`` of the evaluation ``step`` (checked against the base rule's smallest scale).

        Computed once per model evaluation (the schedule is called once even when the hooks run several times).
        """
        if self._current is not None and self._current[0] == step.evaluation:
            return self._current[1]
        if callable(self.schedule):
            value = self.schedule(step.index, step.num_steps, step.noise_level)
        elif self.schedule == "interval":
            value = self.guidance_scale if in_sigma_range(step.noise_level, self.sigma_range) else 1.0
        else:
            value = STEP_SCHEDULES[self.schedule](self.guidance_scale, step.index, step.num_steps)
        scale = check_number(f"schedule value at step {step.index}", value, low=self._low)
        self._current = (step.evaluation, scale)
        self.scale_history.append((step.index, step.evaluation, scale))
        return scale

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        with scale_set_to(self.base, self.scale_at(step)):
            return self.base.branches(preds, step)

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        with scale_set_to(self.base, self.scale_at(step)):
            return self.base.combine(preds, step)
