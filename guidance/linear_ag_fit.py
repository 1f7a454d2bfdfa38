"""Fitting and storage of LinearAG's coefficients (:mod:`guidance.linear_ag`, a reconstruction of Castillo et al.,
arXiv 2312.12487).

Float64 ordinary least squares per designated evaluation (:func:`fit_affine`) on full-CFG calibration runs with true
past predictions as regressors (teacher forcing, :func:`fit_linear_ag`); the coefficients and the metadata of the run
configuration they were fitted on travel together in one safetensors file (:class:`LinearAGCoefficients`), and
:func:`check_metadata` is what :class:`~guidance.linear_ag.LinearAG` compares at call time.
"""


from __future__ import annotations

import json
import math
import os
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from guidance._validate import check_bool, check_int
from guidance.adaptive import _resolve_base
from guidance.base import Branch, Guidance, Predictions, Step

METADATA_KEY = "linear_ag"
Run = Callable[[Guidance], Any]
History = Sequence[tuple[torch.Tensor, torch.Tensor]]


# -- pure functions ----------------------------------------------------------------------------------------------
def regressors(
    cond: torch.Tensor, past: History, sample: torch.Tensor | None = None, intercept: bool = False
) -> list[torch.Tensor]:
    """``[c(e), c(e-1..e-m), u(e-1..e-m), x(e)?, 1?]`` with ``past = [(c(e-1), u(e-1)), ..., (c(e-m), u(e-m))]``."""
    columns = [cond, *(c for c, _ in past), *(u for _, u in past)]
    if sample is not None:
        columns.append(sample)
    if intercept:
        columns.append(torch.ones_like(cond))
    return columns


def design_matrix(columns: Sequence[torch.Tensor]) -> torch.Tensor:
    """float64 ``[n, p]``: every column flattened over samples and elements."""
    return torch.stack([c.reshape(-1).double() for c in columns], dim=1)


def fit_affine(columns: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
    """Least-squares coefficients (float64 ``[p]``) of ``target ~ sum_i beta_i columns[i]`` over all elements."""
    design = design_matrix(columns)
    return torch.linalg.lstsq(design, target.reshape(-1, 1).double(), driver="gelsd").solution.flatten()


def relative_residual(coefficients: torch.Tensor, columns: Sequence[torch.Tensor], target: torch.Tensor) -> float:
    """``||target - X beta|| / ||target||`` in float64."""
    design, y = design_matrix(columns), target.reshape(-1).double()
    return float(torch.linalg.vector_norm(y - design @ coefficients.double()) / torch.linalg.vector_norm(y))


# -- coefficients and their metadata ------------------------------------------------------------------------------
@dataclass
class LinearAGCoefficients:
    """Per-evaluation coefficients (float64 ``[E, p]`` for the designated ``evaluations``) and their metadata."""

    coefficients: torch.Tensor
    evaluations: list[int]
    metadata: dict[str, Any] = field(default_factory=dict)

    def save(self, path: str | os.PathLike) -> None:
        """Write a ``.safetensors`` file; the metadata travels as JSON in its header."""
        tensors = {
            "coefficients": self.coefficients.double().contiguous(),
            "evaluations": torch.tensor(self.evaluations, dtype=torch.long),
        }
        save_file(tensors, str(path), metadata={METADATA_KEY: json.dumps(self.metadata)})

    @classmethod
    def load(cls, path: str | os.PathLike) -> LinearAGCoefficients:
        """Read a file written by :meth:`save`; ``ValueError`` naming ``path`` if it is unreadable or incomplete."""
        try:
            with safe_open(str(path), framework="pt") as handle:
                header = handle.metadata() or {}
            if METADATA_KEY not in header:
                raise ValueError(f"no LinearAG metadata (key {METADATA_KEY!r} in the safetensors header)")
            tensors = load_file(str(path))
            return cls(tensors["coefficients"], tensors["evaluations"].tolist(), json.loads(header[METADATA_KEY]))
        except (SafetensorError, OSError, KeyError, ValueError) as error:  # JSONDecodeError is a ValueError
            raise ValueError(f"{path}: not a readable LinearAG coefficients file ({error})") from None

    def for_evaluation(self, evaluation: int) -> torch.Tensor | None:
        """The coefficients of ``evaluation``, or ``None`` when it is not designated."""
        if evaluation not in self.evaluations:
            return None
        return self.coefficients[self.evaluations.index(evaluation)]



def check_metadata(fitted: dict[str, Any], observed: dict[str, Any], where: str = "") -> None:
    """Raise a ``ValueError`` naming every field of ``observed`` whose value differs from the ``fitted`` metadata
    (for a dict-valued field such as the scheduler config: the entries that differ)."""
    wrong = []
    for key, value in observed.items():
        expected = fitted.get(key)
        if _same(expected, value):
            continue
        if isinstance(expected, dict) and isinstance(value, dict):
            names = sorted(n for n in expected.keys() | value.keys() if not _same(expected.get(n), value.get(n)))
            expected, value = ({n: d.get(n) for n in names} for d in (expected, value))
        wrong.append(f"{key}{where}: coefficients fitted for {expected!r}, this run has {value!r}")
    if wrong:
        raise ValueError("LinearAG coefficients do not match this run (refit them for it):\n  " + "\n  ".join(wrong))


def _same(expected: Any, actual: Any) -> bool:
    if isinstance(expected, float) and isinstance(actual, (int, float)):
        return math.isclose(expected, actual, rel_tol=1e-5, abs_tol=1e-6)
    return expected == actual


def run_metadata(step: Step) -> dict[str, Any]:
    """What a run reveals at evaluation ``step.evaluation`` (compared with the fitted metadata): step count,
    prediction type, sample shape and the pipeline's actual scheduler (class and config, ``_``-keys left out)."""
    metadata: dict[str, Any] = {
        "num_inference_steps": step.num_steps,
        "prediction_type": step.prediction_type,
        "sample_shape": list(step.sample.shape[1:]),
    }
    if step.scheduler is not None:
        config = {k: v for k, v in dict(step.scheduler.config).items() if not k.startswith("_")}
        metadata["scheduler_class"] = type(step.scheduler).__name__
        metadata["scheduler_config"] = json.loads(json.dumps(config, default=str))
    return metadata


def evaluation_metadata(step: Step) -> dict[str, float]:
    return {"timestep": float(step.timestep), "noise_level": float(step.noise_level)}


# -- the guidance rule --------------------------------------------------------------------------------------------
class _Recorder(Guidance):
    """Runs ``base`` and collects, for every designated evaluation, its regressors and true unconditional output."""

    def __init__(self, base: Guidance, steps: frozenset[int], history: int, use_sample: bool, intercept: bool) -> None:
        self.base, self.steps = base, steps
        self.history, self.use_sample, self.intercept = history, use_sample, intercept
        self.required_branches = base.required_branches
        self.run_metadata: dict[str, Any] = {}
        self.reset()

    def reset(self) -> None:
        self.base.reset()
        self._past: deque[tuple[torch.Tensor, torch.Tensor]] = deque(maxlen=max(self.history, 1))
        self.samples: dict[int, tuple[list[torch.Tensor], torch.Tensor]] = {}  # evaluation -> (regressors, target)
        self.evaluations: list[dict[str, float]] = []
        self.evaluation_steps: list[int] = []

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        return self.base.branches(preds, step)

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        if "uncond" not in preds:
            raise ValueError("LinearAG calibration needs the unconditional branch at every step (guidance_scale != 1)")
        cond, uncond = preds["cond"].detach(), preds["uncond"].detach()
        self.run_metadata = run_metadata(step)
        self.evaluations.append(evaluation_metadata(step))
        self.evaluation_steps.append(step.index)
        if step.index in self.steps:
            if len(self._past) < self.history:
                raise ValueError(f"step {step.index} cannot be estimated: it needs {self.history} earlier evaluations")
            past = list(reversed(self._past))[: self.history]
            columns = regressors(cond, past, step.sample if self.use_sample else None, self.intercept)
            self.samples[step.evaluation] = ([c.cpu() for c in columns], uncond.cpu())
        if self.history:
            self._past.append((cond, uncond))
        return self.base.combine(preds, step)


def _collect(recorder: _Recorder, runs: Sequence[Run]) -> tuple[dict[int, tuple[list[torch.Tensor], torch.Tensor]], list[Any]]:
    """Call every run with ``recorder``; concatenate its samples per evaluation; return them and each run's metadata."""
    parts: dict[int, list[tuple[list[torch.Tensor], torch.Tensor]]] = {}
    seen = []
    for run in runs:
        run(recorder)
        seen.append((recorder.run_metadata, recorder.evaluations, recorder.evaluation_steps))
        for evaluation, sample in recorder.samples.items():
            parts.setdefault(evaluation, []).append(sample)
    if any(s != seen[0] for s in seen):
        raise ValueError("calibration runs differ in step count, schedule or sample shape; fit one configuration")
    merged = {
        e: ([torch.cat([p[0][i] for p in items]) for i in range(len(items[0][0]))], torch.cat([p[1] for p in items]))
        for e, items in parts.items()
    }
    return merged, seen


def _check_designation(evaluation_steps: list[int], steps: frozenset[int], history: int, chain: bool) -> list[int]:
    """Designated evaluation indices; refuse unknown steps and (without ``chain``) estimates built on estimates."""
    missing = sorted(steps - set(evaluation_steps))
    if missing:
        raise ValueError(f"steps {missing} are outside the schedule's {max(evaluation_steps) + 1} steps")
    designated = [e for e, k in enumerate(evaluation_steps) if k in steps]
    if not chain:
        chained = [e for e in designated if any(e - j in designated for j in range(1, history + 1))]
        if chained:
            raise ValueError(
                f"evaluations {chained} would be estimated from estimated unconditional outputs; designate "
                "non-adjacent steps (Heun: both evaluations of a step count) or fit with chain=True"
            )
    return designated


def fit_linear_ag(
    runs: Run | Sequence[Run],
    *,
    steps: Sequence[int],
    model_id: str,
    scheduler: Any,
    base: Guidance | str | dict[str, Any] = "cfg",
    history: int = 1,
    use_sample: bool = False,
    intercept: bool = False,
    chain: bool = False,
    held_out: Run | Sequence[Run] | None = None,
) -> LinearAGCoefficients:
    """Fit LinearAG's coefficients by float64 OLS on full-guidance calibration runs (see the module docstring).

    Args:
        runs: callables that perform one pipeline call with the guidance they are given (the calibration samples).
        steps: the designated step indices (e.g. the odd steps of the first half, :func:`alternate_steps`).
        model_id, scheduler: identify the run configuration (stored; :class:`LinearAG` compares them).
        base: the guidance rule of the calibration runs and of later LinearAG runs (default CFG at 7.5).
        history: m, the number of past evaluations used as regressors (>= 0).
        use_sample, intercept: add the model input ``x(e)`` and a constant as regressors.
        chain: allow designated evaluations whose past unconditional outputs are themselves estimates.
        held_out: further runs on which the relative residual of the fit is measured (teacher-forced).
    """
    rule = _resolve_base(base, None)
    check_int("history", history, low=0)
    for name, flag in (("use_sample", use_sample), ("intercept", intercept), ("chain", chain)):
        check_bool(name, flag)
    designated_steps = frozenset(check_int("steps", k, low=0) for k in steps)
    if not designated_steps:
        raise ValueError("steps must name at least one step to estimate")
    recorder = _Recorder(rule, designated_steps, history, use_sample, intercept)
    samples, seen = _collect(recorder, [runs] if callable(runs) else list(runs))
    run_metadata, evaluations_meta, evaluation_steps = seen[0]
    designated = _check_designation(evaluation_steps, designated_steps, history, chain)
    coefficients = torch.stack([fit_affine(*samples[e]) for e in designated])
    residuals = [relative_residual(b, *samples[e]) for b, e in zip(coefficients, designated)]
    metadata: dict[str, Any] = {
        "model_id": model_id,
        "scheduler": scheduler if isinstance(scheduler, str) else type(scheduler).__name__,
        "base": rule.config(),
        "guidance_scale": getattr(rule, "guidance_scale", None),
        **run_metadata,
        "evaluations_meta": evaluations_meta,
        "steps": sorted(designated_steps),
        "history": history,
        "use_sample": use_sample,
        "intercept": intercept,
        "chain": chain,
        "num_calibration_samples": int(next(iter(samples.values()))[1].shape[0]),
        "train_relative_residual": residuals,
    }
    if held_out is not None:
        test, held_out_seen = _collect(recorder, [held_out] if callable(held_out) else list(held_out))
        if held_out_seen[0] != seen[0]:
            raise ValueError("held-out runs differ from the calibration runs in step count, schedule or sample shape")
        metadata["held_out_relative_residual"] = [relative_residual(b, *test[e]) for b, e in zip(coefficients, designated)]
    return LinearAGCoefficients(coefficients, designated, metadata)


def alternate_steps(num_steps: int, fraction: float = 0.5, start: int = 1) -> list[int]:
    """Every other step from ``start`` below ``fraction * num_steps``: a designation that needs no chained estimate
    with ``history=1`` on first-order schedulers (1 NFE saved per designated step)."""
    return list(range(start, math.ceil(fraction * num_steps), 2))
