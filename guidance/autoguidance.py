"""Autoguidance (Karras, Aittala, Kynkaanniemi, Lehtinen, Aila, Laine, "Guiding a Diffusion Model with a Bad Version
of Itself", NeurIPS 2024, arXiv 2406.02507, Eq. 2).

The main ("good") model D_1 is guided by a *guiding* ("bad") model D_0: a smaller and/or less-trained version of
it, both conditioned on the same class or prompt c:

    D(x; sigma, c) = D_0(x; sigma, c) + w (D_1(x; sigma, c) - D_0(x; sigma, c))

The paper states it on the denoised estimates D (EDM's x0). At a fixed model input x_t every prediction type is an
affine function of x0 with the same coefficients (eps = (x_t - alpha x0) / sigma, v = alpha eps - sigma x0,
flow = (x_t - x0) / (1 - t)...), and the combination's weights sum to 1, so it gives the same result applied to the
model outputs in any space (``../shared/methods/spaces.md`` §5); it is applied to the outputs directly (no conversion,
no rounding from it; ``tests/test_autoguidance.py`` checks the equality in x0, epsilon and v).

w = 1 is the main model alone (its branch only, 1 evaluation per step); w > 1 extrapolates away from the guiding
model's errors (the paper's gains are at w ~ 1.5-3); 0 <= w < 1 interpolates toward it. Cost: 2 network evaluations
per step, one of each network (the guiding model's in its own batched forward). This differs from diffusers'
``AutoGuidance`` guider, which makes the "bad" prediction by skipping layers of the main network itself.
"""

from __future__ import annotations

from typing import Any

import torch

from guidance._validate import check_choice, check_number
from guidance.base import Branch, Guidance, Network, Predictions, Step
from guidance.registry import register
from guidance.spaces import compute_dtype

#: the name of the guiding model's network and of its branch (in ``trace`` and ``nfe_per_network``)
GUIDING = "guiding"
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")


def autoguidance_combine(good: torch.Tensor, bad: torch.Tensor, scale: float | torch.Tensor) -> torch.Tensor:
    """``bad + w (good - bad)`` in float32 or better; ``scale`` is one ``w``, or one per sample ``[B]``."""
    dtype = compute_dtype(good.dtype)
    good, bad = good.to(dtype), bad.to(dtype)
    weight = torch.as_tensor(scale, dtype=dtype, device=good.device)
    weight = weight.reshape(-1, *([1] * (good.ndim - 1))) if weight.ndim else weight
    return bad + weight * (good - bad)


def check_prediction_type(prediction_type: str | None) -> str | None:
    return None if prediction_type is None else check_choice("prediction_type", prediction_type, PREDICTION_TYPES)


@register("autoguidance")
class AutoGuidance(Guidance):
    """Autoguidance: ``D_0 + w (D_1 - D_0)`` with the guiding model ``model`` as D_0 (see the module docstring).

    Args:
        guidance_scale: w >= 0 (1: the main model alone, 1 evaluation per step).
        model: the guiding denoiser, called exactly like the pipeline's own (the same class of network: a diffusers
            ``UNet2DModel``, ``UNet2DConditionModel``, ``DiTTransformer2DModel``, ... with the same inputs, outputs
            and prediction type), on the same device. Required. Not part of :meth:`config` (a module is not
            serialisable): rebuild with ``from_config({**config, "model": net})``.
        prediction_type: what ``model`` predicts (``"epsilon"``, ``"v_prediction"``, ``"sample"``, ``"flow"``;
            e.g. its own scheduler's ``prediction_type``), checked against the pipeline's; ``None``: not checked
            (a module does not record it).

    The pipelines refuse, before any work, a guiding model with another call signature, another call-relevant
    config (channels, class embeddings, cross-attention width, ...), on another device or predicting another type,
    and stop at the first evaluation whose output shape differs from the main network's.
    """

    scale_low = 0.0
    inputs_help = "the guiding denoiser; the command lines take it from --guiding-model"

    def __init__(
        self, guidance_scale: float = 2.0, model: torch.nn.Module | None = None, prediction_type: str | None = None
    ) -> None:
        self.guidance_scale = check_number("guidance_scale", guidance_scale, low=0.0)
        if model is None:
            raise ValueError(
                "AutoGuidance needs model=: the guiding denoiser (a smaller or less-trained version of the main "
                "network), e.g. AutoGuidance(2.0, model=weak_unet) or from_config({**config, 'model': weak_unet})"
            )
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"model must be a torch.nn.Module (the guiding denoiser), got {type(model).__name__}")
        self.model = model
        self.prediction_type = check_prediction_type(prediction_type)

    @property
    def network(self) -> Network:
        return Network(self.model, self.prediction_type)

    @property
    def networks(self) -> dict[str, Network]:
        return {GUIDING: self.network}

    def config(self) -> dict[str, Any]:
        """Constructor arguments except ``model`` (a module; supply it again to rebuild)."""
        out = super().config()
        del out["model"]
        return out

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        if self.guidance_scale == 1.0:
            return [Branch("cond")]
        return [Branch("cond"), guiding_branch()]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        if GUIDING not in preds:
            return preds["cond"]
        return autoguidance_combine(preds["cond"], preds[GUIDING], self.guidance_scale)


def guiding_branch(mask: torch.Tensor | None = None) -> Branch:
    """The guiding model's prediction under the samples' own condition (``cond``), for the samples in ``mask``
    (``None``: all)."""
    return Branch(GUIDING, mask=mask, network=GUIDING, condition="cond")
