"""Affine maps between a model's output and the denoised estimate x0 (``../shared/methods/spaces.md`` §2).

Everything is written on the *model input* ``x`` (what the network received), with per-evaluation scalars
``alpha`` and ``sigma`` such that ``x = alpha * x0 + sigma * eps``:

* VP schedulers (DDIM, DDPM, DPM-Solver, UniPC): ``alpha = sqrt(abar)``, ``sigma = sqrt(1 - abar)``;
* Euler-type (VE sample ``x_ve = x0 + s * eps``, model input ``x = x_ve / sqrt(s^2 + 1)``):
  ``alpha = 1 / sqrt(s^2 + 1)``, ``sigma = s * alpha``;
* rectified flow (SD3): ``x = (1 - s) * x0 + s * eps``, so ``alpha = 1 - s``, ``sigma = s``; the output is the
  velocity ``u = eps - x0``.

| prediction type | x0 from the output p | output from x0 |
|---|---|---|
| ``epsilon`` | (x - sigma p) / alpha | (x - alpha x0) / sigma |
| ``v_prediction`` | alpha x - sigma p | (alpha x - x0) / sigma |
| ``sample`` | p | x0 |
| ``flow`` | x - sigma p | (x - x0) / sigma |

All arithmetic runs in float32 or better (:func:`compute_dtype`); callers cast the result back.
"""

from __future__ import annotations

import math

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "sample", "flow")
MIN_COEFFICIENT = 1e-6


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 stays float64; everything narrower is computed in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _guard(name: str, value: float, prediction_type: str, direction: str) -> None:
    if value < MIN_COEFFICIENT:
        raise ValueError(
            f"cannot convert a {prediction_type!r} prediction {direction} x0 at {name}={value:.3g} "
            f"(must be >= {MIN_COEFFICIENT}); this happens at the first step of zero-terminal-SNR schedules "
            "(epsilon models) or at the last step of a schedule that ends at sigma=0"
        )


def to_x0(pred: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """Denoised estimate x0 from the model output ``pred`` at model input ``x`` (table in the module docstring)."""
    dtype = compute_dtype(pred.dtype)
    p, x = pred.to(dtype), x.to(dtype)
    if prediction_type == "epsilon":
        _guard("alpha", alpha, prediction_type, "to")
        return (x - sigma * p) / alpha
    if prediction_type == "v_prediction":
        return alpha * x - sigma * p
    if prediction_type == "sample":
        return p
    if prediction_type == "flow":
        return x - sigma * p
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def from_x0(x0: torch.Tensor, x: torch.Tensor, alpha: float, sigma: float, prediction_type: str) -> torch.Tensor:
    """Model output that corresponds to the denoised estimate ``x0`` at model input ``x`` (inverse of :func:`to_x0`)."""
    dtype = compute_dtype(x0.dtype)
    x0, x = x0.to(dtype), x.to(dtype)
    if prediction_type == "sample":
        return x0
    _guard("sigma", sigma, prediction_type, "from")
    if prediction_type == "epsilon":
        return (x - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        return (alpha * x - x0) / sigma
    if prediction_type == "flow":
        return (x - x0) / sigma
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def batch_dims(tensor: torch.Tensor) -> tuple[int, ...]:
    """All non-batch dims: reductions are per sample over these (spaces.md §6.9)."""
    return tuple(range(1, tensor.ndim))


def per_sample_norm(tensor: torch.Tensor) -> torch.Tensor:
    """L2 norm per sample over all non-batch dims, shaped ``[B, 1, ..., 1]`` for broadcasting."""
    return torch.linalg.vector_norm(tensor, dim=batch_dims(tensor), keepdim=True)


def per_sample_dot(a: torch.Tensor, b: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """Inner product per sample over all non-batch dims, shaped ``[B, 1, ..., 1]``.

    ``dtype`` accumulates the sum in a wider type (the element-wise products stay in the inputs' dtype).
    """
    return (a * b).sum(dim=batch_dims(a), keepdim=True, dtype=dtype)


def reduction_dtype(tensor: torch.Tensor) -> torch.dtype:
    """float64 for precise per-sample reductions, float32 on MPS (which has no float64)."""
    return torch.float32 if tensor.device.type == "mps" else torch.float64


def size_scaled(value: float, elements: int, reference_elements: int) -> float:
    """``value * sqrt(elements / reference_elements)``: a norm tuned at ``reference_elements`` per sample, moved to
    samples of ``elements``.

    Per-sample L2 norms of noise-like tensors grow like sqrt(D) for D elements, so an absolute norm threshold tuned on
    one latent size is too strong on smaller samples and too weak on larger ones; scaling by sqrt(D / D_ref) keeps
    its size relative to the signal (APG's default ``norm_threshold``, NLG's default ``norm_threshold``).
    """
    return value * math.sqrt(elements / reference_elements)


#: the eps of TAG's unit vector ``x / (||x|| + eps)`` (Cho et al., App. D)
NORM_EPS = 1e-8
#: floor of a norm we divide by where an additive eps would bias the result (a zero vector stays zero)
TINY = 1e-30


def clip_factor(update: torch.Tensor, threshold: float) -> torch.Tensor:
    """Per-sample ``min(1, r / ||M||)`` in float64 (float32 on MPS), shaped ``[B, 1, ..., 1]``; 1 for ``r = 0``
    and for a zero update (no NaN)."""
    dtype = reduction_dtype(update)
    if threshold <= 0:
        return torch.ones((update.shape[0],) + (1,) * (update.ndim - 1), dtype=dtype, device=update.device)
    update = update.to(compute_dtype(update.dtype))
    return torch.clamp(threshold * per_sample_dot(update, update, dtype=dtype).rsqrt(), max=1.0)  # 1/0 = inf -> 1


def clip_norm(update: torch.Tensor, threshold: float) -> torch.Tensor:
    """``update * min(1, threshold / ||update||)`` per sample; a zero update stays zero."""
    return update * clip_factor(update, threshold).to(update.dtype)


def radial_unit(x: torch.Tensor) -> torch.Tensor:
    """``x / (||x|| + 1e-8)`` per sample over all non-batch dims (in ``x``'s dtype: pass float32 or better)."""
    return x / (per_sample_norm(x) + NORM_EPS)


def tangential_part(v: torch.Tensor, unit: torch.Tensor) -> torch.Tensor:
    """``P_perp v = v - <v, unit> unit`` per sample, for a unit vector ``unit`` (e.g. from :func:`radial_unit`)."""
    return v - per_sample_dot(v, unit) * unit
