"""LinearAG (Castillo et al., arXiv 2312.12487): affine estimates of early unconditional evaluations. A RECONSTRUCTION.

The paper's abstract only says that LinearAG exploits "further redundancies of CFG in the first half of the diffusion
process", that "entire neural function evaluations can be replaced by simple affine transformations of past score
estimates", and that it deviates from the CFG baseline. Which past estimates, at which steps and how they are fitted
is not public (``../shared/methods/adaptive_guidance.md`` §4). This module implements the spec's reading, with every
choice configurable at fitting time and stored with the coefficients:

* On every model evaluation ``e`` of the designated steps ``S`` (all evaluations of a Heun step, each with its own
  coefficients) only the conditional output ``c(e)`` is computed (1 NFE per sample) and the unconditional output is
  estimated as

      u^(e) = a_e c(e) + sum_{j=1..m} [b_{e,j} c(e-j) + c_{e,j} u(e-j)]  (+ d_e x(e))  (+ f_e)

  with per-evaluation *scalar* coefficients shared by all elements, samples and prompts, in the model's output space
  (epsilon, v, ...), ``x(e)`` the model input and ``f_e`` a constant. A past ``u(e-j)`` is itself an estimate when
  ``e-j`` is designated; ``chain=False`` (default) refuses such designations so every regressor is a true NFE.
  ``u^`` then enters the base rule (CFG) as if it had been evaluated.
* Coefficients are fitted by ordinary least squares in float64 (:func:`fit_affine`) on full-CFG calibration runs of
  the same model, scheduler, step count, scale, resolution and negative-prompt policy (:func:`fit_linear_ag`), with
  true past predictions as regressors (teacher forcing). The relative residual on held-out runs is stored per
  evaluation.
* As in :class:`~guidance.adaptive.AdaptiveGuidance`, once gamma reaches ``threshold`` the remaining steps are
  conditional-only (per sample with ``reduce="per-sample"``, the default; for the whole batch with ``"all"``, which
  makes results depend on the batching). On designated steps gamma is
  computed from the estimate; samples that already switched are not estimated.

Fitting and storage are :mod:`guidance.linear_ag_fit` (as :mod:`guidance.ag_calibration` is AG's). The coefficients
are saved as safetensors with their metadata (model id, scheduler class, step count, base rule and
scale, prediction type, sample shape, per-evaluation timesteps and noise levels, the designation) in the header.
:class:`LinearAG` refuses, with a ``ValueError``, coefficients whose metadata does not match the run.
"""

from __future__ import annotations

import os
from collections import deque
from collections.abc import Sequence
from typing import Any

import torch

from guidance.adaptive import AdaptiveGuidance, _resolve_base
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.linear_ag_fit import LinearAGCoefficients, check_metadata, evaluation_metadata, regressors, run_metadata
from guidance.registry import register
from guidance.spaces import compute_dtype


def affine_combination(coefficients: torch.Tensor, columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """``sum_i coefficients[i] * columns[i]`` in float32 or better, returned in the dtype of ``columns[0]``."""
    dtype = compute_dtype(columns[0].dtype)
    total = torch.zeros_like(columns[0], dtype=dtype)
    for weight, column in zip(coefficients.tolist(), columns):
        total = total + weight * column.to(dtype)
    return total.to(columns[0].dtype)


@register("linear-ag")
class LinearAG(AdaptiveGuidance):
    """LinearAG, a documented RECONSTRUCTION of Castillo et al.'s second method (see the module docstring).

    Args:
        coefficients: a ``.safetensors`` file written by :meth:`LinearAGCoefficients.save` (or the object itself).
        model_id: the model this run uses (e.g. the hub id or local path); must equal the fitted one.
        scheduler: the scheduler's class name (or the scheduler itself); must equal the fitted one.
        threshold: AG's gamma-bar in (0, 1]: conditional-only steps after it is reached (calibrate it).
        space: where AG's gamma is measured, ``"x0"`` or ``"output"``.
        reduce: AG's switch per sample (``"per-sample"``, default: a sample's image and NFE do not depend on its
            batch-mates) or for the whole batch (``"all"``: results then depend on the batching).
        base: the guidance rule; ``None`` takes the one the coefficients were fitted with (any other must match it).

    Step count, prediction type, sample shape, the pipeline's actual scheduler (its class and config, whatever
    ``scheduler`` says) and every evaluation's timestep and noise level are checked against the coefficients'
    metadata as the run proceeds (before the evaluation is spent).
    """

    inputs_help = (
        "coefficients fitted on full-CFG runs of the same pipeline: fit = guidance.fit_linear_ag(run, steps=..., "
        "model_id=..., scheduler=pipe.scheduler), then LinearAG(fit, model_id=..., scheduler=pipe.scheduler) or "
        "get_guidance('linear-ag', coefficients=fit or 'path.safetensors', model_id=..., scheduler=...); "
        "guidance-generate and guidance-evaluate fit them on the fly"
    )

    def __init__(
        self,
        coefficients: str | os.PathLike | LinearAGCoefficients,
        model_id: str,
        scheduler: Any,
        threshold: float = 0.991,
        space: str = "x0",
        reduce: str = "per-sample",
        base: Guidance | str | dict[str, Any] | None = None,
    ) -> None:
        fitted = coefficients if isinstance(coefficients, LinearAGCoefficients) else LinearAGCoefficients.load(coefficients)
        self.coefficients = coefficients if isinstance(coefficients, LinearAGCoefficients) else str(coefficients)
        self.model_id = model_id
        self.scheduler = scheduler if isinstance(scheduler, str) else type(scheduler).__name__
        fitted_base = fitted.metadata.get("base")
        rule = _resolve_base(fitted_base if base is None else base, None)
        check_metadata(fitted.metadata, {"model_id": self.model_id, "scheduler": self.scheduler, "base": rule.config()})
        self._fitted = fitted
        self._history_length = int(fitted.metadata["history"])
        self._use_sample = bool(fitted.metadata["use_sample"])
        self._intercept = bool(fitted.metadata["intercept"])
        super().__init__(base=rule, threshold=threshold, space=space, reduce=reduce)

    def reset(self) -> None:
        super().reset()
        self._past: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(self._history_length, 1))

    def _check_run(self, step: Step) -> None:
        check_metadata(self._fitted.metadata, run_metadata(step))
        evaluations = self._fitted.metadata["evaluations_meta"]
        if step.evaluation >= len(evaluations):
            raise ValueError(
                f"LinearAG coefficients cover {len(evaluations)} model evaluations, this run makes more; refit them"
            )
        check_metadata(evaluations[step.evaluation], evaluation_metadata(step), f" of evaluation {step.evaluation}")

    def _estimated(self, step: Step) -> torch.Tensor | None:
        """This evaluation's coefficients when its unconditional output is estimated (before the AG switch)."""
        if self._switched(step).all():
            return None
        return self._fitted.for_evaluation(step.evaluation)

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        self._check_run(step)
        if self._estimated(step) is not None:
            return [Branch("cond")]
        return super().branches(preds, step)

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        coefficients = self._estimated(step)
        if coefficients is not None:
            past = list(reversed(self._past))[: self._history_length]
            sample = step.sample if self._use_sample else None
            cond = preds["cond"]
            estimate = affine_combination(coefficients, regressors(cond, past, sample, self._intercept))
            switched = self._switched(step).to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
            preds = {**preds, "uncond": torch.where(switched, cond, estimate)}  # as the loop fills switched rows
        if "uncond" in preds and self._history_length:
            self._past.append((preds["cond"], preds["uncond"]))
        return super().combine(preds, step)


# -- fitting ------------------------------------------------------------------------------------------------------
