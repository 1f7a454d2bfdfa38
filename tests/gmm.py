"""A class-conditional Gaussian mixture with closed-form denoisers: exact ground truth for guidance tests.

Class k has prior ``pi_k`` and clean distribution ``N(mu_k, Sigma_k)`` in ``D`` dims. Under a VP noising
``x = alpha x0 + sigma eps`` the posterior means are closed-form:

    p(x | k)      = N(alpha mu_k, alpha^2 Sigma_k + sigma^2 I)
    E[x0 | x, k]  = mu_k + alpha Sigma_k (alpha^2 Sigma_k + sigma^2 I)^{-1} (x - alpha mu_k)
    E[x0 | x]     = sum_k p(k | x) E[x0 | x, k]

:class:`GaussianMixture` exposes them as an epsilon-prediction network for :func:`pipelines.loop.denoise`
(``model_fn(x, t, class_labels)``; the label ``K`` is the unconditional null label), with ``alpha, sigma`` looked up
from the timestep the way diffusers' Euler scheduler interpolates its sigmas, so any VP-family scheduler sees the
exact model.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from pipelines.conditioning import BranchConditioning


class GaussianMixture:
    """Exact class-conditional and unconditional denoisers of a Gaussian mixture (float64 throughout)."""

    def __init__(self, means: torch.Tensor, covariances: torch.Tensor, weights: torch.Tensor, alphas_cumprod: torch.Tensor):
        self.means = means.double()  # [K, D]
        self.covs = covariances.double()  # [K, D, D]
        self.weights = weights.double() / weights.sum()
        self.num_classes, self.dim = self.means.shape
        abar = alphas_cumprod.double().numpy()
        self._sigma_table = np.sqrt((1 - abar) / abar)

    @property
    def null_label(self) -> int:
        return self.num_classes

    def alpha_sigma(self, timestep: float) -> tuple[float, float]:
        """VP coefficients at a (possibly fractional) timestep, linear in the VE sigma as diffusers interpolates."""
        s = float(np.interp(float(timestep), np.arange(len(self._sigma_table)), self._sigma_table))
        alpha = 1 / math.sqrt(1 + s * s)
        return alpha, s * alpha

    def _class_terms(self, x: torch.Tensor, alpha: float, sigma: float):
        """Per class: log N(x; alpha mu_k, C_k) [B, K] and E[x0 | x, k] [B, K, D]."""
        eye = torch.eye(self.dim, dtype=torch.float64)
        cov_x = alpha**2 * self.covs + sigma**2 * eye  # [K, D, D]
        diff = x[:, None, :] - alpha * self.means[None]  # [B, K, D]
        solved = torch.linalg.solve(cov_x[None].expand(x.shape[0], -1, -1, -1), diff[..., None])[..., 0]
        logdet = torch.linalg.slogdet(cov_x)[1]
        log_lik = -0.5 * ((diff * solved).sum(-1) + logdet + self.dim * math.log(2 * math.pi))
        x0 = self.means[None] + alpha * torch.einsum("kde,bke->bkd", self.covs, solved)
        return log_lik, x0

    def denoise(self, x: torch.Tensor, alpha: float, sigma: float, labels: torch.Tensor) -> torch.Tensor:
        """E[x0 | x, label] per sample; ``label == null_label`` gives the unconditional E[x0 | x]."""
        x = x.double()
        log_lik, x0 = self._class_terms(x, alpha, sigma)
        posterior = torch.softmax(log_lik + self.weights.log()[None], dim=1)  # [B, K]
        uncond = (posterior[..., None] * x0).sum(1)
        picked = x0[torch.arange(x.shape[0]), labels.clamp(max=self.num_classes - 1)]
        return torch.where((labels == self.null_label)[:, None], uncond, picked)

    def model_fn(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        """Epsilon prediction ``(x - alpha x0) / sigma`` of the exact denoiser, in ``x``'s dtype."""
        alpha, sigma = self.alpha_sigma(float(t))
        x0 = self.denoise(x, alpha, sigma, class_labels)
        return ((x.double() - alpha * x0) / sigma).to(x.dtype)

    def log_density(self, x0: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """log p(x0 | label) per sample, or the mixture log p(x0) without labels."""
        log_lik, _ = self._class_terms(x0.double(), 1.0, 0.0)
        if labels is None:
            return torch.logsumexp(log_lik + self.weights.log()[None], dim=1)
        return log_lik[torch.arange(x0.shape[0]), labels]

    def bayes_logits(self, x0: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x0; mu_k, Sigma_k): the exact Bayes classifier on clean samples, [B, K]."""
        log_lik, _ = self._class_terms(x0.double(), 1.0, 0.0)
        return log_lik + self.weights.log()[None]

    def conditioning(self, labels: torch.Tensor) -> BranchConditioning:
        """``cond``/``uncond`` branches and the class label set, for :func:`pipelines.loop.denoise`."""
        return BranchConditioning(
            {"cond": {"class_labels": labels}, "uncond": {"class_labels": torch.full_like(labels, self.null_label)}},
            label_set={"class_labels": torch.arange(self.num_classes)},
            target_labels=labels,
        )


def two_class_mixture(alphas_cumprod: torch.Tensor, dim: int = 2, separation: float = 1.5, scale: float = 0.5):
    """Two equally likely isotropic classes at ``+-separation`` along the first axis, std ``scale``."""
    means = torch.zeros(2, dim, dtype=torch.float64)
    means[0, 0], means[1, 0] = separation, -separation
    covs = (scale**2) * torch.eye(dim, dtype=torch.float64).expand(2, dim, dim).clone()
    return GaussianMixture(means, covs, torch.ones(2), alphas_cumprod)
