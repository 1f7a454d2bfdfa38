"""Exact ground truth: a two-class Gaussian mixture (``tests/gmm.py``) sampled through the real loop and scheduler.

Setting: classes N(+-m e1, tau^2 I) in 2-D (m = 1.5, tau = 0.5, equal priors), exact denoisers, DPM-Solver++(2M) with
100 trailing steps in float64, 4000 samples per class. In VE coordinates z = x / alpha, s = sigma / alpha the
probability-flow ODE is ``dz/ds = (z - D(z, s)) / s``; everything below is derived from it in this file, independently
of the library:

* unguided class k: ``D_k = mu_k + tau^2 / (tau^2 + s^2) (z - mu_k)``, so ``(z - mu_k) / sqrt(tau^2 + s^2)`` is
  constant and the flow map from the first noise level S is ``z_0 = mu_k + tau (z_S - mu_k) / sqrt(tau^2 + S^2)``;
* CFG for class 0 (mu = +m e1): ``D_c - D_u = p_-(z, s) (D_+ - D_-) = p_- * 2 m s^2 / (tau^2 + s^2) e1`` with
  ``p_- = sigmoid(-2 m z_1 / (tau^2 + s^2))``: guidance acts along e1 only, and with
  ``v = (z_1 - m) / sqrt(tau^2 + s^2)``: ``dv/ds = -(w - 1) 2 m p_- s / (tau^2 + s^2)^{3/2}`` (solved with scipy);
* hence the outward shift of every sample, ``z_w(0) - z_1(0) = (w - 1) 2 m tau Int_0^S p_-(z_w(s), s) s /
  (tau^2 + s^2)^{3/2} ds``, is >= 0, increases with w (comparison theorem: the drift decreases in w) and, because
  p_- decreases along the guided (outer) path, is at most ``(w - 1) B`` with B the same integral along the unguided
  path (closed form above), so ``shift / (w - 1)`` is non-increasing in w.

The sampler: DDIM with 100 trailing steps (the Euler method on this ODE) shrinks every sample towards its mode by ~3%
(variance 0.236 instead of 0.25 per class, measured against the exact map above: -2.5 standard errors at 4000
samples), so the tests use DPM-Solver++(2M), whose per-sample error is <= 3.5e-3 against the exact map and against the
scipy solution of the guided flow (at 50 steps: 1.1e-2).
"""

from __future__ import annotations

import math
from itertools import pairwise

import numpy as np
import pytest
import torch
from diffusers import DPMSolverMultistepScheduler
from scipy.integrate import solve_ivp
from scipy.special import expit

from guidance import APG, CFG
from pipelines.loop import denoise
from tests.gmm import two_class_mixture
from tests.tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

M, TAU = 1.5, 0.5  # two_class_mixture's defaults: class means +-M e1, std TAU
N = 4000  # samples per class
STEPS = 100
SCALES = (1.5, 2.0, 3.0, 5.0)
SAMPLER_TOLERANCE = 1e-2  # per-sample discretisation error allowed (measured: <= 3.5e-3)


def sample(guidance, label_counts: tuple[int, int], seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(unit-variance noise, samples, first VE noise level S) for ``label_counts`` samples of class 0 and 1."""
    scheduler = DPMSolverMultistepScheduler(timestep_spacing="trailing")
    gmm = two_class_mixture(scheduler.alphas_cumprod, dim=2, separation=M, scale=TAU)
    scheduler.set_timesteps(STEPS)
    labels = torch.cat([torch.full((n,), k) for k, n in enumerate(label_counts)])
    noise = torch.randn(len(labels), 2, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    result = denoise(
        model_fn=gmm.model_fn,
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        latents=noise * scheduler.init_noise_sigma,
        guidance=guidance,
        conditioning=gmm.conditioning(labels),
        num_inference_steps=STEPS,
    )
    return noise, result.latents, float(scheduler.sigmas[0])


def exact_flow(noise: torch.Tensor, mean: torch.Tensor, first_sigma: float) -> torch.Tensor:
    """The unguided class flow map from VP noise at VE level S (module docstring)."""
    z_start = noise * math.sqrt(1 + first_sigma**2)  # z = x / alpha with alpha = 1 / sqrt(1 + S^2)
    return mean + TAU * (z_start - mean) / math.sqrt(TAU**2 + first_sigma**2)


def log_sigma_grid(first_sigma: float) -> tuple[np.ndarray, np.ndarray]:
    lam = np.linspace(math.log(1e-9), math.log(first_sigma), 4001)
    return lam, np.exp(lam)


def guided_flow_e1(z_start: np.ndarray, scale: float, first_sigma: float) -> np.ndarray:
    """CFG's guided probability flow along e1 for class 0, integrated in log-sigma with scipy (rtol 1e-10)."""
    v_start = (z_start - M) / math.sqrt(TAU**2 + first_sigma**2)

    def drift(lam: float, v: np.ndarray) -> np.ndarray:
        s = math.exp(lam)
        z = M + math.sqrt(TAU**2 + s**2) * v
        p_other = expit(-2 * M * z / (TAU**2 + s**2))
        return -(scale - 1) * 2 * M * p_other * s**2 / (TAU**2 + s**2) ** 1.5  # dv/dlog(s) = s dv/ds

    solution = solve_ivp(drift, (math.log(first_sigma), math.log(1e-9)), v_start, rtol=1e-10, atol=1e-12)
    assert solution.success
    return M + TAU * solution.y[:, -1]


def linear_bound(z_start: np.ndarray, first_sigma: float) -> np.ndarray:
    """B per sample: the shift integral along the unguided path (module docstring), by the trapezoid rule."""
    lam, s = log_sigma_grid(first_sigma)
    v_start = (z_start - M) / math.sqrt(TAU**2 + first_sigma**2)
    z = M + np.sqrt(TAU**2 + s[None] ** 2) * v_start[:, None]
    integrand = expit(-2 * M * z / (TAU**2 + s[None] ** 2)) * s[None] ** 2 / (TAU**2 + s[None] ** 2) ** 1.5
    return 2 * M * TAU * np.trapezoid(integrand, lam, axis=1)


@pytest.fixture(scope="module")
def class0_runs() -> dict:
    """Class-0 samples from the same noise: unguided, CFG at every scale, APG (eta = 0) at 3 and 5."""
    runs = {}
    for name, rule in [("cfg1", CFG(1.0))] + [(f"cfg{w}", CFG(w)) for w in SCALES] + [
        (f"apg{w}", APG(w, parallel_scale=0.0, norm_threshold=0.0, momentum=0.0)) for w in (3.0, 5.0)
    ] + [(f"apg-momentum{w}", APG(w, parallel_scale=0.0, norm_threshold=0.0, momentum=-0.5)) for w in (3.0, 5.0)]:
        noise, samples, first_sigma = sample(rule, (N, 0), seed=1)
        runs[name] = samples
    runs["noise"], runs["first_sigma"] = noise, first_sigma
    return runs


def test_unguided_conditional_sampling_reproduces_each_class():
    """Mean and covariance of each class within 4 standard errors (plus the start bias), per sample within 1e-2.

    Standard errors at n = 4000: mean TAU/sqrt(n) = 0.0079; variance TAU^2 sqrt(2/(n-1)) = 0.0056; covariance
    TAU^2/sqrt(n) = 0.0040. Start bias: starting from N(0, I) instead of the exact marginal at S moves the mean by
    TAU |mu| / sqrt(TAU^2 + S^2) = 0.005 towards 0 and the variance by a factor (1 + S^2)/(TAU^2 + S^2) = 1 + 3e-5.
    """
    noise, samples, first_sigma = sample(CFG(1.0), (N, N))
    assert samples.dtype == torch.float64
    for k, sign in ((0, 1.0), (1, -1.0)):
        rows = slice(k * N, (k + 1) * N)
        mean = torch.tensor([sign * M, 0.0], dtype=torch.float64)
        exact = exact_flow(noise[rows], mean, first_sigma)
        assert (samples[rows] - exact).abs().max() < SAMPLER_TOLERANCE

        start_bias = TAU * M / math.sqrt(TAU**2 + first_sigma**2)
        se_mean, se_var, se_cov = TAU / math.sqrt(N), TAU**2 * math.sqrt(2 / (N - 1)), TAU**2 / math.sqrt(N)
        assert (samples[rows].mean(0) - mean).abs().max() < 4 * se_mean + start_bias
        cov = torch.cov(samples[rows].T)
        assert (cov.diagonal() - TAU**2).abs().max() < 4 * se_var
        assert abs(cov[0, 1]) < 4 * se_cov


def test_cfg_follows_the_guided_probability_flow_solved_independently(class0_runs):
    first_sigma = class0_runs["first_sigma"]
    z_start = (class0_runs["noise"][:, 0] * math.sqrt(1 + first_sigma**2)).numpy()
    for w in SCALES:
        samples = class0_runs[f"cfg{w}"]
        ode = guided_flow_e1(z_start, w, first_sigma)
        assert np.abs(samples[:, 0].numpy() - ode).max() < SAMPLER_TOLERANCE
        assert abs(samples[:, 0].mean().item() - ode.mean()) < 2e-3
        # guidance acts along the class axis only: the other coordinate follows the unguided flow
        torch.testing.assert_close(samples[:, 1], class0_runs["cfg1"][:, 1], rtol=0, atol=1e-9)


def test_cfg_outward_shift_is_monotone_in_w_and_within_the_derived_bound(class0_runs):
    first_sigma = class0_runs["first_sigma"]
    z_start = (class0_runs["noise"][:, 0] * math.sqrt(1 + first_sigma**2)).numpy()
    bound = linear_bound(z_start, first_sigma)
    unguided = class0_runs["cfg1"][:, 0].numpy()
    mean_shifts, per_unit = [], []
    for w in SCALES:
        shift = class0_runs[f"cfg{w}"][:, 0].numpy() - unguided
        assert shift.min() > -SAMPLER_TOLERANCE
        assert (shift - (w - 1) * bound).max() < SAMPLER_TOLERANCE
        mean_shifts.append(shift.mean())
        per_unit.append(shift.mean() / (w - 1))
    assert all(b > a + 0.05 for a, b in pairwise(mean_shifts))  # strictly outward as w grows
    assert all(b < a for a, b in pairwise(per_unit))  # sub-linear: shift / (w - 1) decreases
    assert per_unit[0] <= bound.mean() + SAMPLER_TOLERANCE


@pytest.mark.parametrize("variant", ["apg", "apg-momentum"])
def test_apg_with_eta_zero_overshoots_the_class_mode_less_than_cfg(class0_runs, variant):
    """Mean distance beyond the mode, E[x_1] - m: CFG grows with w, APG (parallel part dropped) stays near 0."""
    unguided = class0_runs["cfg1"][:, 0].mean().item() - M
    for w in (3.0, 5.0):
        cfg = class0_runs[f"cfg{w}"][:, 0].mean().item() - M
        apg = class0_runs[f"{variant}{w}"][:, 0].mean().item() - M
        assert cfg > 0.4
        assert apg < 0.25 * cfg
        assert apg > unguided - 0.05  # APG still guides away from the other class, never towards it
