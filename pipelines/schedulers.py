"""What the loop needs to know about a diffusers scheduler (``../shared/methods/spaces.md`` §3-4).

For the i-th model evaluation (``timesteps[i]``) the adapter gives the coefficients ``(alpha, sigma)`` of the model
input ``x = alpha * x0 + sigma * eps``, the factor that maps the scheduler sample to the model input, the prediction
type, and whether a ``scheduler.step`` call completed a sampling step (second-order schedulers such as Heun call the
model twice per step). Families:

| family | schedulers | (alpha, sigma) | model input |
|---|---|---|---|
| ``vp`` | DDIM, DDPM, PNDM, LCM, TCD | ``sqrt(abar_t), sqrt(1 - abar_t)`` | the sample |
| ``multistep`` | DPM-Solver(++), UniPC, DEIS, SA-Solver | ``scheduler._sigma_to_alpha_sigma_t(sigmas[i])`` | the sample |
| ``ve`` | Euler, Euler ancestral, Heun, LMS | ``1/sqrt(s^2+1), s/sqrt(s^2+1)``, ``s = sigmas[i]`` | ``sample / sqrt(s^2+1)`` |
| ``flow`` | FlowMatchEuler, FlowMatchHeun | ``1 - s, s``, ``s = sigmas[i]`` | the sample |

Coefficients come from the scheduler's own tables at the evaluation index, never from a formula of our own on ``t``.
"""

from __future__ import annotations

import math

import torch


def scheduler_family(scheduler: object) -> str:
    """``"vp"``, ``"multistep"``, ``"ve"`` or ``"flow"``; ``ValueError`` for schedulers the loop cannot convert."""
    name = type(scheduler).__name__
    if name.startswith("EDM"):
        raise ValueError(f"scheduler {name} (EDM preconditioning) is not supported; use an Euler or DPM-Solver scheduler")
    if name.startswith("FlowMatch"):
        return "flow"
    if hasattr(scheduler, "_sigma_to_alpha_sigma_t") and hasattr(scheduler, "sigmas"):
        return "multistep"
    if hasattr(scheduler, "sigmas_interpol"):
        raise ValueError(f"scheduler {name} (interpolated second stage) is not supported; use Heun or Euler")
    if hasattr(scheduler, "sigmas"):
        return "ve"
    if hasattr(scheduler, "alphas_cumprod"):
        return "vp"
    raise ValueError(f"scheduler {name} is not supported by the guided denoising loop")


def prediction_type_of(scheduler: object) -> str:
    """What a denoiser paired with ``scheduler`` predicts: ``"epsilon"``, ``"v_prediction"``, ``"sample"`` or
    ``"flow"`` (flow-matching schedulers and flow-sigma configurations)."""
    config = scheduler.config  # type: ignore[attr-defined]
    declared = config.get("prediction_type", "epsilon")
    if scheduler_family(scheduler) == "flow" or declared == "flow_prediction" or config.get("use_flow_sigmas", False):
        return "flow"
    return declared


class SchedulerAdapter:
    """Noise levels, model-input scaling and step completion for one scheduler (see the module docstring)."""

    def __init__(self, scheduler: object, num_evaluations: int) -> None:
        self.scheduler = scheduler
        self.family = scheduler_family(scheduler)
        self.num_evaluations = num_evaluations
        self.prediction_type = prediction_type_of(scheduler)
        # the tables as Python numbers, read from the scheduler once per generation: every evaluation's coefficients
        # then come without a device synchronisation (or any tensor operation)
        self._sigmas = _host_list(getattr(scheduler, "sigmas", None))
        self._timesteps = _host_list(getattr(scheduler, "timesteps", None))
        self._alphas_cumprod = _host_list(getattr(scheduler, "alphas_cumprod", None))

    def _sigma(self, index: int) -> float:
        return self._sigmas[index]  # type: ignore[index]

    def alpha_sigma(self, index: int, timestep: torch.Tensor) -> tuple[float, float]:
        """Coefficients of the model input at evaluation ``index`` (``timestep``, the scheduler's ``timesteps[index]``,
        is read from the host copy of the table)."""
        if self.family == "flow":
            s = self._sigma(index)
            return 1.0 - s, s
        if self.family == "multistep":
            alpha, sigma = self.scheduler._sigma_to_alpha_sigma_t(self._sigma(index))  # type: ignore[attr-defined]
            return float(alpha), float(sigma)
        if self.family == "ve":
            s = self._sigma(index)
            alpha = 1.0 / math.sqrt(s * s + 1.0)
            return alpha, s * alpha
        t = self._timesteps[index] if self._timesteps is not None and 0 <= index < len(self._timesteps) else timestep
        abar = self._alphas_cumprod[int(t)]  # type: ignore[index]
        return math.sqrt(abar), math.sqrt(1.0 - abar)

    def input_scale(self, index: int) -> float:
        """Model input = ``input_scale * scheduler sample`` (only Euler-type samples are VE-scaled)."""
        if self.family == "ve":
            s = self._sigma(index)
            return 1.0 / math.sqrt(s * s + 1.0)
        return 1.0

    def is_first_stage(self) -> bool:
        """Whether the next evaluation starts a step (False for the 2nd evaluation of a Heun-type step)."""
        return bool(getattr(self.scheduler, "state_in_first_order", True))

    def step_completed(self, index: int) -> bool:
        """After ``scheduler.step`` for evaluation ``index``: did it complete a sampling step?

        Second-order schedulers are back in first-order state after the 2nd stage; Heun's final step is a single
        Euler stage, so the last evaluation always completes one.
        """
        return self.is_first_stage() or index == self.num_evaluations - 1


def _host_list(table: object) -> list[float] | None:
    """A scheduler table (tensor or array) as a list of Python numbers (one read per generation)."""
    if table is None:
        return None
    return torch.as_tensor(table).detach().double().cpu().tolist()
