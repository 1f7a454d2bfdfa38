"""Adaptive Projected Guidance (Sadat, Hilliges, Weber, arXiv 2410.02416, ICLR 2025), Algorithm 1, in x0 space.

At every guided evaluation, with the denoised predictions D_c, D_u and per-sample inner products over all non-batch
dims:

    Delta = D_c - D_u
    M_k   = Delta + beta * M_{k-1}                  reverse momentum: a plain running sum (beta < 0), M_{-1} = 0
    M~    = M_k * min(1, r / ||M_k||)               norm clip (r = 0: off); the buffer keeps the un-clipped M_k
    Dpar  = <M~, D_c> / <D_c, D_c> * D_c            projection onto D_c (inner products accumulated in float64)
    U     = (M~ - Dpar) + parallel_scale * Dpar   the paper's eta (Algorithm 1) is ``parallel_scale``
    D^    = D_c + (w - 1) * U

Everything after the momentum is one per-sample combination ``a * D_c + b * M`` (see :func:`apg_x0`), so only three
inner products per sample are computed and the tensors are never copied to float64 as diffusers does; the result
stays within ~1e-7 relative of the float64 listing. ``parallel_scale = 1, r = 0, beta = 0`` is exactly CFG. The rule
runs on x0 whatever the model predicts (epsilon, v, flow velocity), converted with the current evaluation's alpha,
sigma and converted back afterwards.

Relation to diffusers' ``AdaptiveProjectedGuidance`` / ``normalized_guidance`` (same ``U``, other output and space):

* diffusers runs on whatever the pipeline passes (the UNet's epsilon in its SDXL pipeline), not on x0;
* ``use_original_formulation=True`` returns ``D_c + w * U``: our ``guidance_scale = w + 1``, exact in all cases;
* the default returns ``D_u + w * U``: with no clip and no momentum this is our rule at the same ``w`` with
  ``parallel_scale = (w * eta - 1) / (w - 1)`` from diffusers' ``eta`` (so its ``eta = 0`` pushes *against* the
  parallel part); with the clip active it has no equivalent here (it collapses to D_u under strong clipping).
  :meth:`APG.from_diffusers` does the mapping.
"""

from __future__ import annotations

from typing import Any

import torch

from guidance._validate import check_choice, check_number, renamed_arguments
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.registry import register
from guidance.spaces import clip_factor, compute_dtype, per_sample_dot, reduction_dtype, size_scaled

#: SDXL's r = 15 (paper, Table 10) at 4x128x128 latent elements; the default scales it by sqrt(N / 65536)
SDXL_NORM_THRESHOLD = 15.0
SDXL_LATENT_ELEMENTS = 4 * 128 * 128


def parallel_coefficient(update: torch.Tensor, onto: torch.Tensor) -> torch.Tensor:
    """Per-sample ``k = <M, D> / <D, D>`` in float64 (float32 on MPS), so that ``M_par = k D`` and
    ``M_perp = M - k D``; 0 for a zero ``onto`` (no NaN)."""
    dtype = reduction_dtype(update)
    update, onto = update.to(compute_dtype(update.dtype)), onto.to(compute_dtype(onto.dtype))
    return per_sample_dot(update, onto, dtype=dtype) / per_sample_dot(onto, onto, dtype=dtype).clamp_min(1e-24)


def apg_x0(
    cond_x0: torch.Tensor, update: torch.Tensor, scale: float, parallel_scale: float, threshold: float
) -> torch.Tensor:
    """``D_c + (w - 1) * U`` from the (momentum-accumulated) update M, Algorithm 1 steps 3-6.

    With the clip factor ``f``, ``k = <f M, D_c> / <D_c, D_c>`` and ``p = parallel_scale`` (the paper's eta),
    ``U = f M - (1 - p) k D_c``, so the output is the per-sample combination ``(1 - (w - 1)(1 - p) k) D_c +
    (w - 1) f M``: the three inner products are summed in float64 (the listing's precision for the projection, which
    float32 sums miss by up to ~7e-7 when M is nearly parallel to D_c), the element-wise work stays in float32.
    Inputs narrower than float32 are computed in float32; the result has ``cond_x0``'s dtype.
    """
    dtype = compute_dtype(cond_x0.dtype)
    cond, update = cond_x0.to(dtype), update.to(dtype)
    factor = clip_factor(update, threshold)
    cond_weight = 1 - ((scale - 1) * (1 - parallel_scale)) * factor * parallel_coefficient(update, cond)
    update_weight = (scale - 1) * factor
    guided = (cond * cond_weight.to(dtype)).addcmul_(update, update_weight.to(dtype))
    return guided.to(cond_x0.dtype)


@register("apg")
class APG(Guidance):
    """Adaptive projected guidance, the paper's Algorithm 1 in x0 space (see the module docstring).

    Args:
        guidance_scale: w >= 1 in the paper's form ``D_c + (w - 1) U`` (w = 1: no guidance).
        parallel_scale: the factor on the part of the update parallel to D_c, ``U = M_perp + parallel_scale *
            M_par`` (the paper's eta, Algorithm 1; default 0 drops it as the paper does, 1 keeps it: CFG's direction;
            negative values push against it, as diffusers' default formulation does). ``eta=`` is accepted as a
            deprecated alias.
        norm_threshold: r, an absolute L2 norm in x0 units per sample; 0 turns the clip off. ``None`` (default) uses
            SDXL's r = 15 scaled to the sample size, ``15 * sqrt(N / 65536)`` for N elements per sample: 15 for SDXL
            (4x128x128), 7.5 for SD 1.5 at 512 px (4x64x64), 0.47 for the 8x8 digits model. It grows like sqrt(N)
            because the norm sums over all elements (:func:`guidance.spaces.size_scaled`, the convention NLG's
            default ``norm_threshold`` follows). Tuned on: SDXL (the paper's Table 10); an explicit value is absolute.
        momentum: beta in (-1, 1) of the reverse momentum (paper: -0.5); 0 turns it off.
        momentum_per: ``"evaluation"`` advances the buffer at every model evaluation (paper-literal; a Heun step
            advances it twice) or ``"step"`` once per completed step [reconstruction: the paper does not discuss
            second-order samplers].
    """

    scale_low = 1.0
    renamed = {"eta": "parallel_scale"}

    required_branches = frozenset({"cond", "uncond"})

    def __init__(
        self,
        guidance_scale: float = 7.5,
        parallel_scale: float = 0.0,
        norm_threshold: float | None = None,
        momentum: float = -0.5,
        momentum_per: str = "evaluation",
        **deprecated: Any,
    ) -> None:
        values, names = renamed_arguments(APG, deprecated, APG.renamed, parallel_scale=parallel_scale)
        self.guidance_scale = check_number("guidance_scale", guidance_scale, low=1.0)
        self.parallel_scale = check_number(names["parallel_scale"], values["parallel_scale"])
        self.norm_threshold = None if norm_threshold is None else check_number("norm_threshold", norm_threshold, low=0)
        self.momentum = check_number("momentum", momentum, low=-1.0, high=1.0, low_open=True, high_open=True)
        self.momentum_per = check_choice("momentum_per", momentum_per, ("evaluation", "step"))
        self.reset()

    def reset(self) -> None:
        self._buffer: torch.Tensor | None = None  # M_k of the latest evaluation, [batch, ...]
        self._previous: torch.Tensor | None = None  # M before the current step ("step" mode, 2nd stage)
        self._noise_level: float | None = None  # noise level of the latest evaluation

    def threshold_for(self, sample: torch.Tensor) -> float:
        """The clip radius r for samples shaped like ``sample`` (see ``norm_threshold``)."""
        if self.norm_threshold is not None:
            return self.norm_threshold
        return size_scaled(SDXL_NORM_THRESHOLD, sample[0].numel(), SDXL_LATENT_ELEMENTS)

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        return [Branch("cond")] if self.guidance_scale == 1.0 else [Branch("uncond"), Branch("cond")]

    def _accumulate(self, diff: torch.Tensor, step: Step) -> torch.Tensor:
        """M_k = diff + beta * M_{k-1}, a plain running sum over the evaluations (over the steps with
        ``momentum_per="step"``: both stages of a Heun step add to the sum the step began with).

        A rise of the noise level (a new generation, a second img2img pass) starts the sum again (spaces.md §4).
        """
        if self.momentum == 0:
            return diff
        if self._noise_level is not None and step.noise_level > self._noise_level:
            self.reset()
        self._noise_level = step.noise_level
        if self._buffer is None:
            self._buffer = self._previous = torch.zeros_like(diff)
        advance = self.momentum_per == "evaluation" or step.first_stage
        if advance:
            self._previous = self._buffer
        accumulated = torch.add(diff, self._previous, alpha=self.momentum)
        if advance:
            self._buffer = accumulated
        return accumulated

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        if "uncond" not in preds:
            return cond
        cond_x0, uncond_x0 = step.to_x0(cond), step.to_x0(preds["uncond"])
        update = self._accumulate(cond_x0 - uncond_x0, step)
        guided_x0 = apg_x0(cond_x0, update, self.guidance_scale, self.parallel_scale, self.threshold_for(cond_x0))
        return step.from_x0(guided_x0).to(cond.dtype)

    @classmethod
    def from_diffusers(
        cls,
        guidance_scale: float,
        eta: float = 1.0,
        norm_threshold: float = 0.0,
        momentum: float | None = None,
        use_original_formulation: bool = False,
    ) -> APG:
        """Our APG equivalent to diffusers' ``AdaptiveProjectedGuidance`` *formula* (the space still differs).

        The arguments are diffusers' (``eta`` is its name for the parallel weight); the result has ours
        (``parallel_scale``). Raises ``ValueError`` where no equivalent exists (default formulation with clip or
        momentum, see the module docstring).
        """
        beta = 0.0 if momentum is None else momentum
        if use_original_formulation:
            return cls(guidance_scale + 1, parallel_scale=eta, norm_threshold=norm_threshold, momentum=beta)
        if norm_threshold > 0 or beta != 0:
            raise ValueError(
                "diffusers' default APG formulation (D_u + w * U) has no paper equivalent with norm_threshold > 0 "
                "or momentum; use use_original_formulation=True or turn both off"
            )
        if guidance_scale == 1:
            return cls(1.0, parallel_scale=1.0, norm_threshold=0.0, momentum=0.0)
        parallel_scale = (guidance_scale * eta - 1) / (guidance_scale - 1)
        return cls(guidance_scale, parallel_scale=parallel_scale, norm_threshold=0.0, momentum=0.0)
