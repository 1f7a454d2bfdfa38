"""The guidance interface: four hooks into one denoising loop (``../shared/DESIGN.md``).

| hook | called | default |
|---|---|---|
| :meth:`Guidance.prepare_noise` | once before the loop, on unit-variance initial noise | identity |
| :meth:`Guidance.branches` | before each model evaluation: which conditions to evaluate | ``cond`` only |
| :meth:`Guidance.combine` | after the evaluation: one guided prediction from the branches | the ``cond`` prediction |
| :meth:`Guidance.after_step` | after ``scheduler.step`` on every *completed* step | identity |

:meth:`Guidance.reset` runs at the start of every generation, so no state leaks between calls.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar, Protocol

import torch

from guidance import spaces


@dataclass(frozen=True)
class Branch:
    """One condition to evaluate: ``cond``, ``uncond`` or a labelled reference ``ref``.

    ``mask`` (bool, one entry per sample) asks for the samples that need the branch; ``None`` means all. The loop
    evaluates only those rows and hands the rule a prediction for the whole batch: rows outside the mask hold the
    ``cond`` prediction, so a rule selects with ``torch.where(mask, ...)`` and never sees a row subset.
    ``labels`` (one label id per sample; entries outside ``mask`` are ignored) selects the condition of a labelled
    branch from the pipeline's label set (class ids, or the prompts of a text-to-image label set).
    ``network`` names the denoiser that evaluates the branch: ``None`` is the pipeline's own, any other name one of
    the rule's :attr:`Guidance.networks` (Autoguidance's guiding model), called like the pipeline's own.
    ``condition`` names the branch whose keywords it takes (default: ``name``), so a branch of another network can
    read the ``cond`` condition under a name of its own.
    """

    name: str
    mask: torch.Tensor | None = None
    labels: torch.Tensor | None = None
    network: str | None = None
    condition: str | None = None

    @property
    def keywords(self) -> str:
        """The name of the branch whose conditioning keywords this branch uses."""
        return self.name if self.condition is None else self.condition


@dataclass(frozen=True)
class Network:
    """Another denoiser a rule evaluates branches with (Autoguidance's guiding model).

    ``module`` takes the pipeline's own denoiser's call (the same keywords, the same rows); ``prediction_type``
    (``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow"``), when known, is checked against the pipeline's.
    """

    module: Any
    prediction_type: str | None = None


@dataclass(frozen=True)
class Step:
    """Read-only record of one model evaluation, handed to every hook.

    ``index`` counts *completed* sampling steps before this evaluation (so both evaluations of a Heun step share it)
    and ``evaluation`` counts model evaluations. ``sample`` is the model input ``x = alpha * x0 + sigma * eps`` of the
    whole batch.
    """

    index: int
    num_steps: int
    evaluation: int
    first_stage: bool
    timestep: torch.Tensor
    alpha: float
    sigma: float
    sample: torch.Tensor
    prediction_type: str
    target_labels: torch.Tensor | None = None
    decode: Callable[[torch.Tensor], torch.Tensor] | None = field(default=None, repr=False)
    #: size of the pipeline's label set (the labels a ``ref`` branch may ask for); 0 without one
    num_labels: int = 0
    #: the pipeline's scheduler (read-only: rules check what they were fitted on against it, e.g. LinearAG)
    scheduler: Any = field(default=None, repr=False)

    @property
    def noise_level(self) -> float:
        """Scheduler-style noise level: ``sigma / alpha`` for VP models, ``s = sigma`` for flow models."""
        if self.prediction_type == "flow":
            return self.sigma
        return self.sigma / self.alpha if self.alpha > 0 else float("inf")

    def to_x0(self, pred: torch.Tensor) -> torch.Tensor:
        """Denoised estimate of ``pred`` (float32 or better), see :mod:`guidance.spaces`."""
        return spaces.to_x0(pred, self.sample, self.alpha, self.sigma, self.prediction_type)

    def from_x0(self, x0: torch.Tensor) -> torch.Tensor:
        """Model output (float32 or better) whose denoised estimate is ``x0``."""
        return spaces.from_x0(x0, self.sample, self.alpha, self.sigma, self.prediction_type)

    @property
    def batch_size(self) -> int:
        """The number of samples."""
        return self.sample.shape[0]


class NoiseContext(Protocol):
    """What :meth:`Guidance.prepare_noise` may use: model evaluations at the start of the schedule, and randomness."""

    def step_for(self, noise: torch.Tensor, timestep: int | None = None) -> Step:
        """The record of an evaluation with initial noise ``noise``: at the sampling schedule's first timestep, or
        (``timestep`` given) at that training timestep with its alpha, sigma from the scheduler's ``alphas_cumprod``
        and the unit-variance noise itself as the model input (VP-type schedulers)."""

    def evaluate(self, step: Step, branches: Sequence[Branch]) -> dict[str, torch.Tensor]:
        """Evaluate ``branches`` in one batched forward (counted in the NFE)."""

    def randn_like(self, noise: torch.Tensor, salt: int) -> torch.Tensor:
        """Standard normal noise that follows the pipeline's generator(s) without consuming them."""

    def has_branch(self, name: str) -> bool:
        """Whether the pipeline can evaluate the branch ``name``."""


Predictions = Mapping[str, torch.Tensor]


class Guidance:
    """Base class of every guidance rule. Subclasses override only the hooks they need.

    ``name`` is the registry name. Constructor arguments must be stored under attributes of the same name: that is
    what :meth:`config` serialises (nested guidance modules become nested dicts).
    """

    name: ClassVar[str] = ""
    #: branches this rule may request, so a pipeline can refuse it up front when it cannot provide one
    required_branches: ClassVar[frozenset[str]] = frozenset({"cond"})
    #: what to pass for the constructor arguments without a default (shown when a rule built by name lacks them)
    inputs_help: ClassVar[str] = ""
    #: the constructor argument that is this rule's strength, when it takes it: what ``--scale`` of the command
    #: lines, the resolver's ``guidance_scale`` for rules built by name and the wrappers set (CFG's w is
    #: ``guidance_scale``; GFCG's lambda is ``confusion_scale``)
    scale_argument: ClassVar[str] = "guidance_scale"
    #: the smallest value of :attr:`scale_argument` the rule accepts, for rules whose hooks read it at call time, so
    #: that :class:`~guidance.schedule.ScaleSchedule` may set it per step; ``None``: no such scale
    scale_low: ClassVar[float | None] = None
    #: deprecated constructor keywords, old name -> new name (still accepted, with a ``FutureWarning``)
    renamed: ClassVar[dict[str, str]] = {}

    @property
    def networks(self) -> Mapping[str, Network]:
        """Denoisers besides the pipeline's own that this rule's branches name (:attr:`Branch.network`)."""
        return {}

    def reset(self) -> None:
        """Forget all per-generation state (called at the start of every generation)."""

    @classmethod
    def couples_batch(cls, config: Mapping[str, Any]) -> bool:
        """Whether a module built from ``config`` (this class's :meth:`config` dict) lets a sample's result depend
        on the other samples of its batch. False for every rule at its defaults; tools that promise batch-independent
        images (``guidance-evaluate``) key the runs of such a configuration by batch size."""
        return False

    def prepare_noise(self, noise: torch.Tensor, context: NoiseContext) -> torch.Tensor:
        """Return the initial noise to sample from (unit variance in, unit variance out)."""
        return noise

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        """Branches to evaluate next, given the predictions already made at this evaluation.

        The loop calls this until it returns no branch that is missing from ``preds``, so a rule may ask in two phases
        (e.g. evaluate ``cond`` first, then pick a reference from it).
        """
        return [Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        """The guided model output (in the model's output space) from the branch predictions."""
        return preds["cond"]

    def after_step(self, before: torch.Tensor, after: torch.Tensor, step: Step) -> torch.Tensor:
        """Edit the scheduler sample after a completed step (``before``: the sample at the start of the step).

        ``step`` is the record of the evaluation that began the step (its first stage), so ``step.timestep`` is where
        the step started also for two-stage schedulers such as Heun.
        """
        return after

    def config(self) -> dict[str, Any]:
        """Plain-dict configuration: ``{"name": ..., **constructor arguments}`` (JSON-serialisable where they are)."""
        out: dict[str, Any] = {"name": self.name}
        for name, value in self._arguments().items():
            out[name] = value.config() if isinstance(value, Guidance) else value
        return out

    def overrides(self, hook: str) -> bool:
        """Whether this module defines ``hook`` itself rather than inheriting the identity."""
        return getattr(type(self), hook) is not getattr(Guidance, hook)

    def uses(self, hook: str) -> bool:
        """Whether running this guidance involves ``hook`` (the loop skips unused ``prepare_noise`` work)."""
        return self.overrides(hook)

    def _arguments(self) -> dict[str, Any]:
        """Every constructor argument as stored (unlike :meth:`config`, nothing is left out)."""
        out = {}
        for param in inspect.signature(type(self).__init__).parameters.values():
            if param.name != "self" and param.kind not in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
                out[param.name] = getattr(self, param.name)
        return out

    def __eq__(self, other: object) -> bool:
        """Rules are equal when they are of the same class with equal constructor arguments (``APG(3) == APG(3)``).

        Arguments without a value equality of their own (tensors, networks such as GFCG's classifier) compare by
        identity; per-generation state is not compared.
        """
        if not isinstance(other, Guidance):
            return NotImplemented
        return _frozen(self) == _frozen(other)

    def __hash__(self) -> int:
        return hash(_frozen(self))

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items() if k != "name")
        return f"{type(self).__name__}({args})"


def _frozen(value: Any) -> Any:
    """A hashable stand-in for a configuration value: containers recursively, objects without value equality (tensors,
    modules, unhashable objects) by identity."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, Guidance):
        return ("guidance", type(value), _frozen(value._arguments()))
    if isinstance(value, Mapping):
        return ("mapping", tuple(sorted((str(key), _frozen(item)) for key, item in value.items())))
    if isinstance(value, (list, tuple)):
        return ("sequence", tuple(_frozen(item) for item in value))
    if isinstance(value, (set, frozenset)):
        return ("set", frozenset(_frozen(item) for item in value))
    if isinstance(value, (torch.Tensor, torch.nn.Module)):
        return ("object", id(value))
    try:
        hash(value)
    except TypeError:
        return ("object", id(value))
    return value
