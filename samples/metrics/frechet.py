"""Frechet distance between feature sets (the minimum the model card needs).

For two Gaussians fitted to features ``a`` and ``b`` (means ``mu_a``, ``mu_b``; covariances ``S_a``, ``S_b``)

    FD = ||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2}).

With the embedded evaluation network's features (:meth:`samples.digits.nets.DigitEvaluator.features`) this is
"FD-digits"; with Inception features it is FID.
"""

from __future__ import annotations

import numpy as np
import torch


def feature_statistics(feats: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """Mean ``[F]`` and unbiased covariance ``[F, F]`` (float64) of features ``[N, F]``, ``N >= 2``."""
    if isinstance(feats, torch.Tensor):
        feats = feats.detach().cpu().numpy()
    array = np.asarray(feats, dtype=np.float64)
    if array.ndim != 2 or array.shape[0] < 2:
        raise ValueError(f"expected features of shape [N >= 2, F], got {array.shape}")
    return array.mean(axis=0), np.cov(array, rowvar=False)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Symmetric square root of a symmetric positive semi-definite matrix (negative rounding eigenvalues -> 0)."""
    eigenvalues, eigenvectors = np.linalg.eigh((matrix + matrix.T) / 2.0)
    return (eigenvectors * np.sqrt(np.clip(eigenvalues, 0.0, None))) @ eigenvectors.T


def frechet_distance_from_statistics(
    mu_a: np.ndarray, sigma_a: np.ndarray, mu_b: np.ndarray, sigma_b: np.ndarray
) -> float:
    """``||mu_a - mu_b||^2 + Tr(S_a + S_b - 2 (S_a S_b)^{1/2})`` in float64.

    ``Tr((S_a S_b)^{1/2})`` is computed as the sum of the square roots of the eigenvalues of the symmetric
    matrix ``S_a^{1/2} S_b S_a^{1/2}``, which has the same spectrum. This stays real and exact for singular
    covariances (dead feature units, fewer samples than dimensions), where a general matrix square root such as
    ``scipy.linalg.sqrtm`` returns tiny imaginary parts and warnings. A negative rounding residue is clamped to 0.
    """
    mu_a, mu_b = np.asarray(mu_a, np.float64), np.asarray(mu_b, np.float64)
    sigma_a, sigma_b = np.atleast_2d(np.asarray(sigma_a, np.float64)), np.atleast_2d(np.asarray(sigma_b, np.float64))
    root_a = _psd_sqrt(sigma_a)
    middle = root_a @ sigma_b @ root_a
    trace_sqrt = np.sqrt(np.clip(np.linalg.eigvalsh((middle + middle.T) / 2.0), 0.0, None)).sum()
    diff = mu_a - mu_b
    distance = diff @ diff + np.trace(sigma_a) + np.trace(sigma_b) - 2.0 * trace_sqrt
    return max(float(distance), 0.0)


def frechet_distance(feats_a: np.ndarray | torch.Tensor, feats_b: np.ndarray | torch.Tensor) -> float:
    """Frechet distance between the Gaussians fitted to features ``[N_a, F]`` and ``[N_b, F]``."""
    return frechet_distance_from_statistics(*feature_statistics(feats_a), *feature_statistics(feats_b))
