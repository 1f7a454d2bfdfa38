"""Adaptive Guidance (Castillo et al., arXiv 2312.12487): stop evaluating the unconditional branch once it stops mattering.

At every CFG step k the rule measures, per sample, the cosine similarity of the conditional and unconditional
predictions over all non-batch elements (in float32 or better),

    gamma_k = <p_c, p_u> / (||p_c|| ||p_u||),          p = x0 prediction (``space="x0"``, default) or raw output,

and runs the wrapped rule (CFG, APG, ...) unchanged while ``gamma_k < threshold``. Once ``gamma_k >= threshold``
(sample by sample with ``reduce="per-sample"``, the default; for every sample at once with ``reduce="all"``, which
makes a sample's switch, image and NFE depend on its batch-mates) a one-way latch switches the
remaining steps ``k+1 ... T-1`` to conditional-only steps (``out = out_c``, 1 NFE per sample): a switch after step k
costs ``T + k + 1`` network evaluations instead of ``2T``.

Decisions are made only at step boundaries: ``gamma`` is measured on the first evaluation of a step and the latch
takes effect from the next *completed* step (``Step.index``), so both evaluations of a Heun step use one policy.

The statistic is computed on x0 predictions by default: for epsilon models ``cos(eps_c, eps_u)`` is ~1 from the
first step (``eps ~ x / sigma`` at high noise), so a threshold such as the paper's 0.991 would switch at step 0 there
(``../shared/methods/adaptive_guidance.md`` §6.1). The threshold is not portable across models, schedulers, step
counts or spaces: calibrate it (:mod:`guidance.ag_calibration`). Where x0 is undefined (an epsilon model at
``alpha = 0``, the first step of a zero-terminal-SNR schedule) gamma is not measured at that step (recorded as NaN,
no switch).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

import torch

from guidance._validate import check_bool, check_choice, check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.registry import register, scale_of
from guidance.spaces import MIN_COEFFICIENT, batch_dims, compute_dtype
from guidance.wrap import resolve_base

SPACES = ("x0", "output")
REDUCTIONS = ("all", "per-sample")
_NEVER = torch.iinfo(torch.long).max


def cosine_per_sample(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of ``a`` and ``b`` per sample over all non-batch dims, shape ``[B]`` (float32 or float64).

    A zero vector has cosine 0 with anything.
    """
    dtype = compute_dtype(torch.promote_types(a.dtype, b.dtype))
    a, b = a.to(dtype), b.to(dtype)
    dims = batch_dims(a)
    dot = (a * b).sum(dim=dims)
    norms = torch.linalg.vector_norm(a, dim=dims) * torch.linalg.vector_norm(b, dim=dims)
    return dot / norms.clamp_min(torch.finfo(dtype).tiny)


def _resolve_base(base: Any, guidance_scale: float | None) -> Guidance:
    """The wrapped rule (:func:`guidance.wrap.resolve_base`); it must use the unconditional branch."""
    rule = resolve_base(base, guidance_scale, "AdaptiveGuidance")
    if "uncond" not in rule.required_branches:
        raise ValueError(f"base must be a rule that uses the unconditional branch (CFG, APG, ...), got {rule!r}")
    return rule


@register("ag")
class AdaptiveGuidance(Guidance):
    """Adaptive Guidance: the wrapped rule until gamma reaches ``threshold``, then conditional-only steps.

    See the module docstring for the statistic and the latch.

    Args:
        base: the rule to run before the switch: a module (``CFG(5)``, ``APG(...)``), a registered name or a config
            dict (default ``"cfg"``).
        threshold: gamma-bar in (0, 1] (default 0.991, the paper's value reported second-hand, tuned for its
            Stable Diffusion setting on outputs whose space the paper does not state; on x0 it was calibrated to
            0.985-0.9994 on the digits model and 1 - 1e-6 on an SD-1.5-layout UNet: calibrate it,
            :mod:`guidance.ag_calibration`).
        space: ``"x0"`` (default: cosine of the denoised predictions) or ``"output"`` (of the raw network outputs,
            e.g. epsilon).
        reduce: ``"per-sample"`` (default): latch each sample on its own and evaluate the unconditional row only
            for samples that have not switched, so a sample's image and NFE do not depend on which samples share its
            batch; ``"all"``: switch the whole batch when every sample's gamma reached the threshold at the same step
            (one policy per batch: results then **depend on the batching**, e.g. on the batch size).
        guidance_scale: builds ``base`` when it is a name; otherwise only checked against the base's own scale
            (``None``: the base's scale). Lets ``pipe(..., guidance="ag", guidance_scale=5)`` work.
        record_only: measure gamma at every step but never switch (calibration runs; the output is the base rule's).

    Diagnostics, reset at every generation: ``gamma_history`` (one float64 ``[B]`` tensor per measured step, NaN
    where a sample was not measured), ``gamma_steps`` (their step indices), ``sample_switch_steps`` (per sample: the
    last guided step, ``None`` if it never switched) and ``switch_step`` (the step after which the whole batch is
    conditional-only, ``None`` if it never was).
    """

    def __init__(
        self,
        base: Guidance | str | dict[str, Any] = "cfg",
        threshold: float = 0.991,
        space: str = "x0",
        reduce: str = "per-sample",
        guidance_scale: float | None = None,
        record_only: bool = False,
    ) -> None:
        if guidance_scale is not None:
            check_number("guidance_scale", guidance_scale, low=0.0)
        self.base = _resolve_base(base, guidance_scale)
        self.guidance_scale = scale_of(self.base)
        self.threshold = check_number("threshold", threshold, low=0.0, high=1.0, low_open=True)
        self.space = check_choice("space", space, SPACES)
        self.reduce = check_choice("reduce", reduce, REDUCTIONS)
        self.record_only = check_bool("record_only", record_only)
        self.required_branches = self.base.required_branches
        self.reset()

    def reset(self) -> None:
        self.base.reset()
        self._switch_after: torch.Tensor | None = None  # per sample: last guided step (_NEVER: not switched)
        self.gamma_history: list[torch.Tensor] = []
        self.gamma_steps: list[int] = []

    @classmethod
    def couples_batch(cls, config: Mapping[str, Any]) -> bool:
        """``reduce="all"`` (stated or by default) decides for the whole batch at once."""
        default = inspect.signature(cls.__init__).parameters["reduce"].default
        return config.get("reduce", default) == "all"

    # -- state ---------------------------------------------------------------------------------------------------
    def _switched(self, step: Step) -> torch.Tensor:
        """Bool ``[B]``: samples that are conditional-only at this step."""
        if self._switch_after is None:
            self._switch_after = torch.full((step.batch_size,), _NEVER, dtype=torch.long)
        return self._switch_after < step.index

    @property
    def sample_switch_steps(self) -> list[int | None]:
        """Per sample: the last guided (two-branch) step, or ``None`` if the sample never switched."""
        if self._switch_after is None:
            return []
        return [None if k == _NEVER else int(k) for k in self._switch_after]

    @property
    def switch_step(self) -> int | None:
        """The step after which every sample is conditional-only (``None`` if some sample never switched)."""
        steps = self.sample_switch_steps
        return None if not steps or None in steps else max(steps)  # type: ignore[type-var]

    # -- hooks ---------------------------------------------------------------------------------------------------
    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        switched = self._switched(step)
        if not switched.any():
            return self.base.branches(preds, step)
        if switched.all():
            return [Branch("cond")]
        return [b if b.name == "cond" else _restrict(b, ~switched) for b in self.base.branches(preds, step)]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        """The base rule where a sample is still guided, its conditional prediction where it switched (the loop
        fills the unconditional rows of switched samples with the conditional prediction)."""
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        switched = self._switched(step)
        self._observe(cond, preds["uncond"], step, ~switched)
        guided = self.base.combine(preds, step).to(cond.dtype)
        if not switched.any():
            return guided
        return torch.where(_per_sample(switched, cond), cond, guided)

    def _observe(self, cond: torch.Tensor, uncond: torch.Tensor, step: Step, measured: torch.Tensor) -> None:
        """Measure gamma on the first evaluation of a step (for the ``measured`` samples; NaN elsewhere) and latch
        samples that reached the threshold."""
        if not step.first_stage:
            return
        gamma = self.statistic(cond, uncond, step).double().cpu()
        gamma = torch.where(measured, gamma, torch.full_like(gamma, float("nan")))
        self.gamma_history.append(gamma)
        self.gamma_steps.append(step.index)
        if self.record_only:
            return
        crossed = gamma >= self.threshold  # NaN (not measured) never crosses
        if self.reduce == "all":
            crossed = crossed.all().expand_as(crossed)
        latch = crossed & (self._switch_after > step.index)
        self._switch_after[latch] = step.index

    def statistic(self, cond: torch.Tensor, uncond: torch.Tensor, step: Step) -> torch.Tensor:
        """gamma ``[rows]`` of ``step`` in this rule's space; NaN where x0 is undefined (epsilon model at alpha ~ 0)."""
        if self.space == "output":
            return cosine_per_sample(cond, uncond)
        if step.prediction_type == "epsilon" and step.alpha < MIN_COEFFICIENT:
            return torch.full((cond.shape[0],), float("nan"), dtype=torch.float64)
        return cosine_per_sample(step.to_x0(cond), step.to_x0(uncond))


def _restrict(branch: Branch, keep: torch.Tensor) -> Branch:
    """``branch`` limited to the samples where ``keep`` (bool ``[B]``) is true."""
    mask = keep if branch.mask is None else branch.mask & keep.to(branch.mask.device)
    return replace(branch, mask=mask)


def _per_sample(mask: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A bool ``[B]`` mask shaped to broadcast over ``like`` ``[B, ...]``, on its device."""
    return mask.to(like.device).reshape(-1, *([1] * (like.ndim - 1)))
