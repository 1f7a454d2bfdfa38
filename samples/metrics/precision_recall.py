"""Improved precision and recall (Kynkaanniemi, Karras, Laine, Lehtinen, Aila, NeurIPS 2019, arXiv 1904.06991).

Each feature set spans a "manifold": the union of balls around its points, the radius of a point being the distance
to its k-th nearest neighbour in the same set (the point itself excluded; k = 3 in the paper). Then

    precision = fraction of generated points inside the manifold of the real points      (fidelity)
    recall    = fraction of real points inside the manifold of the generated points      (diversity)

where "inside" means ``||x - y|| <= radius(y)`` for at least one point ``y`` of the other set. Distances are Euclidean
in feature space, computed directly (not through the matrix-product expansion, whose rounding can move a point across
a ball's boundary) and in blocks, so that memory stays at ``block x N`` distances.
"""

from __future__ import annotations

import numpy as np
import torch

K_DEFAULT = 3


def _as_tensor(feats: np.ndarray | torch.Tensor, name: str) -> torch.Tensor:
    tensor = torch.as_tensor(feats)
    if tensor.ndim != 2:
        raise ValueError(f"{name} must be features [N, F], got shape {tuple(tensor.shape)}")
    return tensor.to(torch.float64 if tensor.dtype == torch.float64 else torch.float32)


def _distances(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return torch.cdist(a, b, compute_mode="donot_use_mm_for_euclid_dist")


def knn_radii(feats: torch.Tensor, k: int = K_DEFAULT, block: int = 1024) -> torch.Tensor:
    """Distance from every point of ``feats`` ``[N, F]`` to its k-th nearest *other* point, ``[N]``."""
    if feats.shape[0] <= k:
        raise ValueError(f"k-NN radii with k={k} need more than {k} points, got {feats.shape[0]}")
    radii = []
    for start in range(0, feats.shape[0], block):
        dist = _distances(feats[start : start + block], feats)
        radii.append(dist.kthvalue(k + 1, dim=1).values)  # the (k+1)-th smallest: the point itself is at 0
    return torch.cat(radii)


def inside_manifold(
    points: torch.Tensor, manifold: torch.Tensor, radii: torch.Tensor, block: int = 1024
) -> torch.Tensor:
    """Boolean ``[M]``: whether each of ``points`` ``[M, F]`` lies in a ball of ``manifold`` ``[N, F]`` (``radii``)."""
    inside = []
    for start in range(0, points.shape[0], block):
        dist = _distances(points[start : start + block], manifold)
        inside.append((dist <= radii.unsqueeze(0)).any(dim=1))
    return torch.cat(inside)


def precision_recall(
    real: np.ndarray | torch.Tensor, fake: np.ndarray | torch.Tensor, k: int = K_DEFAULT
) -> tuple[float, float]:
    """``(precision, recall)`` of generated features ``fake`` against real features ``real`` (module docstring)."""
    if isinstance(k, bool) or not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be an int >= 1, got {k!r}")
    real_t, fake_t = _as_tensor(real, "real"), _as_tensor(fake, "fake")
    if real_t.shape[1] != fake_t.shape[1]:
        raise ValueError(f"real and fake features differ in width: {real_t.shape[1]} vs {fake_t.shape[1]}")
    dtype = torch.promote_types(real_t.dtype, fake_t.dtype)
    real_t, fake_t = real_t.to(dtype), fake_t.to(dtype)
    precision = inside_manifold(fake_t, real_t, knn_radii(real_t, k)).double().mean()
    recall = inside_manifold(real_t, fake_t, knn_radii(fake_t, k)).double().mean()
    return float(precision), float(recall)
