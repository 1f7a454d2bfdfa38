"""Autoguidance (guidance/autoguidance.py) and GFCG on top of it, on the exact Gaussian mixture (tests/gmm.py).

The guiding ("bad") model is the same mixture with every class component widened by a factor ``k`` in variance: a
closed-form worse denoiser. Each class is one Gaussian N(mu, S), so in the VE variable y = x / alpha both denoisers are
linear, E[x0 | y] = mu + c(s) (y - mu) with c(s) = S / (S + s^2), and DDIM moves the deviation z = y - mu by the
scalar c + (s' / s) (1 - c) per step: the exact reference below. In the ODE limit Autoguidance at w turns the class
Gaussian's std into std * [k (S + s_T^2) / (k S + s_T^2)] ** (-(w - 1) / 2), which is the paper's claim (samples
concentrate at the good model's modes) in closed form.
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler
from torch import nn

from guidance import CFG, GFCG, AutoGuidance, Guidance, from_config, get_guidance
from guidance.autoguidance import autoguidance_combine
from guidance.spaces import from_x0, to_x0
from pipelines.loop import denoise
from tests.gmm import GaussianMixture, two_class_mixture

STEPS = 20
WIDEN = 2.25  # the guiding model's class variance factor (std x 1.5)
VARIANCE = 0.25  # two_class_mixture's class variance (std 0.5)


class MixtureNet(nn.Module):
    """A mixture's exact epsilon denoiser as a module (``unconditional``: it ignores the label)."""

    def __init__(self, mixture: GaussianMixture, unconditional: bool = False) -> None:
        super().__init__()
        self.mixture, self.unconditional = mixture, unconditional
        self.labels: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.labels.append(class_labels.clone())
        if self.unconditional:
            class_labels = torch.full_like(class_labels, self.mixture.null_label)
        return self.mixture.model_fn(x, t, class_labels)


def module_fn(network):
    """The loop's network function for modules that already take ``model_fn``'s call."""
    return network.module


def widened(mixture: GaussianMixture, factor: float = WIDEN) -> GaussianMixture:
    return GaussianMixture(mixture.means, mixture.covs * factor, mixture.weights, torch.tensor(ALPHAS))


SCHEDULER = DDIMScheduler(clip_sample=False)
ALPHAS = SCHEDULER.alphas_cumprod.tolist()


@pytest.fixture
def scheduler():
    return DDIMScheduler(clip_sample=False)


@pytest.fixture
def good(scheduler):
    return two_class_mixture(scheduler.alphas_cumprod)


@pytest.fixture
def bad(good):
    return MixtureNet(widened(good))


def sample(mixture, scheduler, guidance, labels, steps=STEPS, seed=0):
    scheduler.set_timesteps(steps)
    noise = torch.randn(len(labels), mixture.dim, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))
    return denoise(
        model_fn=mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps,
        latents=noise * scheduler.init_noise_sigma, guidance=guidance, conditioning=mixture.conditioning(labels),
        num_inference_steps=steps, network_fn=module_fn,
    )


def ve_sigma(scheduler, timestep) -> float:
    abar = float(scheduler.alphas_cumprod[int(timestep)])
    return math.sqrt((1 - abar) / abar)


def ddim_contraction(scheduler, w: float, steps: int) -> float:
    """Exact DDIM factor on z = y - mu of Autoguidance (good class variance S, guiding k S), written from the DDIM
    update y' = x0 + (s' / s) (y - x0) and the closed-form denoisers; the last step lands on s' = 0."""
    scheduler.set_timesteps(steps)
    sigmas = [ve_sigma(scheduler, t) for t in scheduler.timesteps] + [0.0]
    factor = 1.0
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        c_good, c_bad = VARIANCE / (VARIANCE + s * s), WIDEN * VARIANCE / (WIDEN * VARIANCE + s * s)
        c = c_bad + w * (c_good - c_bad)
        factor *= c + (s_next / s) * (1 - c)
    return factor


LABELS = torch.tensor([0, 1] * 16)


# -- exact ground truth ---------------------------------------------------------------------------------------------


def test_w_one_is_the_good_model_alone_exactly(good, scheduler, bad):
    plain = sample(good, scheduler, Guidance(), LABELS)
    guided = sample(good, scheduler, AutoGuidance(1.0, model=bad), LABELS)
    assert torch.equal(guided.latents, plain.latents)
    assert guided.nfe == STEPS and guided.nfe_per_network == {"main": STEPS}
    assert bad.labels == []  # the guiding model is never called at w = 1


@pytest.mark.parametrize("w", [1.5, 2.0, 3.0])
def test_samples_contract_to_the_good_modes_as_the_exact_ddim_recursion_says(good, scheduler, bad, w):
    plain = sample(good, scheduler, Guidance(), LABELS)
    guided = sample(good, scheduler, AutoGuidance(w, model=bad), LABELS)
    mu = good.means[LABELS]
    ratio = (guided.latents - mu) / (plain.latents - mu)
    expected = ddim_contraction(scheduler, w, STEPS) / ddim_contraction(scheduler, 1.0, STEPS)
    # the scheduler's float32 alpha tables round the coefficients at ~1e-7 per step (measured: 1e-5 at most)
    torch.testing.assert_close(ratio, torch.full_like(ratio, expected), rtol=1e-4, atol=0)
    assert expected < 1  # toward the class mean, the mode of the good model's class density
    density = good.log_density(guided.latents, LABELS).mean()
    assert density > good.log_density(plain.latents, LABELS).mean()
    assert guided.nfe == 2 * STEPS and guided.nfe_per_network == {"main": STEPS, "guiding": STEPS}
    assert all(torch.equal(labels, LABELS) for labels in bad.labels)  # the guiding model at the samples' own class


def test_ode_limit_matches_the_closed_form_contraction(good, scheduler, bad):
    """At 200 DDIM steps the contraction is within 1% of the probability-flow ODE's closed form."""
    w, steps = 2.0, 200
    plain = sample(good, scheduler, Guidance(), LABELS, steps=steps)
    guided = sample(good, scheduler, AutoGuidance(w, model=bad), LABELS, steps=steps)
    mu = good.means[LABELS]
    measured = float(((guided.latents - mu) / (plain.latents - mu)).mean())
    s_top = ve_sigma(scheduler, scheduler.timesteps[0])
    closed_form = (WIDEN * (VARIANCE + s_top**2) / (WIDEN * VARIANCE + s_top**2)) ** (-(w - 1) / 2)
    assert closed_form == pytest.approx(WIDEN ** (-0.5), rel=1e-4)  # std / 1.5 for a 1.5x wider guide
    assert measured == pytest.approx(closed_form, rel=0.01)


@pytest.mark.parametrize("w", [0.5, 2.0, 4.0])
def test_unconditional_good_model_as_guide_is_cfg(good, scheduler, w):
    """D_u + w (D_c - D_u): CFG's formula when the guiding model is the good model without its condition."""
    cfg = sample(good, scheduler, CFG(w), LABELS)
    guided = sample(good, scheduler, AutoGuidance(w, model=MixtureNet(good, unconditional=True)), LABELS)
    assert torch.equal(guided.latents, cfg.latents)
    assert guided.nfe == cfg.nfe == 2 * STEPS


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_the_combination_is_the_same_in_x0_and_in_every_output_space(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x, x0_good, x0_bad = (torch.randn(3, 4, 8, 8, dtype=torch.float64, generator=generator) for _ in range(3))
    alpha, sigma = (0.7, 0.3) if prediction_type == "flow" else (0.6, 0.8)
    good, bad = (from_x0(x0, x, alpha, sigma, prediction_type) for x0 in (x0_good, x0_bad))
    in_x0 = from_x0(autoguidance_combine(x0_good, x0_bad, 2.5), x, alpha, sigma, prediction_type)
    torch.testing.assert_close(autoguidance_combine(good, bad, 2.5), in_x0, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(to_x0(autoguidance_combine(good, bad, 2.5), x, alpha, sigma, prediction_type),
                               x0_bad + 2.5 * (x0_good - x0_bad), rtol=1e-10, atol=1e-10)


# -- GFCG with Autoguidance -----------------------------------------------------------------------------------------


def three_class(scheduler) -> GaussianMixture:
    """Three overlapping classes on a circle (as in tests/test_gfcg.py): room for a classifier to help."""
    angles = torch.arange(3) * 2 * math.pi / 3
    means = 0.6 * torch.stack([angles.cos(), angles.sin()], 1).double()
    covs = 0.25 * torch.eye(2, dtype=torch.float64).expand(3, 2, 2).clone()
    return GaussianMixture(means, covs, torch.tensor([0.5, 0.3, 0.2]), scheduler.alphas_cumprod)


class Bayes(nn.Module):
    def __init__(self, mixture: GaussianMixture) -> None:
        super().__init__()
        self.mixture = mixture

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.mixture.bayes_logits(x)


class Agreeing(nn.Module):
    """A classifier that always names class 0 with certainty."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([9.0, 0.0, 0.0], dtype=x.dtype).expand(x.shape[0], 3)


def test_gfcg_with_the_reference_forced_to_the_target_is_autoguidance_exactly(scheduler):
    mixture = three_class(scheduler)
    labels = torch.zeros(6, dtype=torch.long)
    bad = MixtureNet(widened(mixture))
    plain = sample(mixture, scheduler, AutoGuidance(2.5, model=bad), labels)
    forced = GFCG(Agreeing(), reference="include_target", confusion_scale=5.0, autoguidance=AutoGuidance(2.5, model=bad))
    result = sample(mixture, scheduler, forced, labels)
    assert torch.equal(result.latents, plain.latents)
    assert result.nfe == 2 * STEPS and result.nfe_per_network == {"main": STEPS, "guiding": STEPS}
    off = GFCG(Bayes(mixture), confusion_scale=0.0, autoguidance=AutoGuidance(2.5, model=bad))
    assert torch.equal(sample(mixture, scheduler, off, labels).latents, plain.latents)


def reference_gfcg_autoguidance(mixture, bad, scheduler, labels, w, lam, w_max, form, reference, steps=STEPS):
    """GFCG + Autoguidance written here from gfcg.md §2-3 (eps space, DDIM), without our modules; also returns the
    number of reference rows (w_t > 0) of each sample."""
    scheduler.set_timesteps(steps)
    x = torch.randn(len(labels), 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    rows = torch.arange(len(labels))
    active_rows = torch.zeros(len(labels))
    for t in scheduler.timesteps:
        alpha, sigma = mixture.alpha_sigma(float(t))
        eps_good = mixture.model_fn(x, t, labels)
        probs = torch.softmax(mixture.bayes_logits((x - sigma * eps_good) / alpha), 1)
        p_target = probs[rows, labels]
        if reference == "exclude_target":
            rival = probs.scatter(1, labels[:, None], -1.0).argmax(1)
        else:
            rival = probs.argmax(1)
        w_t = torch.where(rival == labels, 0.0, (lam * (1 - p_target)).clamp(0, w_max))
        active_rows += w_t > 0
        if form == "shared_reference":
            label = torch.where(w_t > 0, rival, labels)
            eps_bad = bad.model_fn(x, t, label)
            out = eps_bad + (w + w_t)[:, None] * (eps_good - eps_bad)
        else:
            eps_bad, eps_ref = bad.model_fn(x, t, labels), bad.model_fn(x, t, rival)
            out = eps_bad + w * (eps_good - eps_bad) + w_t[:, None] * (eps_good - eps_ref)
        x = scheduler.step(out, t, x).prev_sample
    return x, active_rows


@pytest.mark.parametrize("reference", ["exclude_target", "include_target"])
@pytest.mark.parametrize("form", ["shared_reference", "additive"])
def test_gfcg_autoguidance_matches_a_reference_written_from_the_spec(scheduler, form, reference):
    mixture = three_class(scheduler)
    bad_mixture = widened(mixture)
    labels = torch.tensor([0, 1, 2] * 4)
    rule = GFCG(Bayes(mixture), confusion_scale=2.0, w_max=4.0, reference=reference, autoguidance=AutoGuidance(
        1.8, model=MixtureNet(bad_mixture)), autoguidance_form=form)
    result = sample(mixture, scheduler, rule, labels)
    expected, active = reference_gfcg_autoguidance(mixture, bad_mixture, scheduler, labels, 1.8, 2.0, 4.0, form,
                                                   reference)
    # the loop's x0 for the classifier uses the scheduler's float32 alphas, the reference the mixture's float64 ones
    torch.testing.assert_close(result.latents, expected, rtol=1e-7, atol=1e-7)
    assert (result.latents - sample(mixture, scheduler, AutoGuidance(1.8, model=MixtureNet(bad_mixture)),
                                    labels).latents).abs().max() > 1e-2  # the classifier's contrast acts
    guiding = [STEPS] * len(labels) if form == "shared_reference" else (STEPS + active).long().tolist()
    assert result.rows_per_network == {"main": [STEPS] * len(labels), "guiding": guiding}
    assert 0 < active.sum() and (form == "shared_reference" or reference == "include_target" or active.min() == STEPS)
    assert result.model_calls == 2 * STEPS  # cond (read by the classifier), then one batched forward of the guide


def test_gfcg_reference_default_depends_on_the_autoguidance_form(bad):
    assert GFCG(nn.Identity()).reference == "exclude_target"
    assert GFCG(nn.Identity(), autoguidance=AutoGuidance(2.0, model=bad)).reference == "include_target"
    additive = GFCG(nn.Identity(), autoguidance=AutoGuidance(2.0, model=bad), autoguidance_form="additive")
    assert additive.reference == "exclude_target"


def test_gfcg_on_top_of_autoguidance_raises_bayes_accuracy(scheduler):
    mixture = three_class(scheduler)
    bad = MixtureNet(widened(mixture))
    labels = torch.tensor([0, 1, 2] * 100)
    accuracy = {}
    for name, rule in {
        "autoguidance": AutoGuidance(2.0, model=bad),
        "gfcg+autoguidance": GFCG(Bayes(mixture), confusion_scale=2.0, autoguidance=AutoGuidance(2.0, model=bad)),
    }.items():
        samples = sample(mixture, scheduler, rule, labels).latents
        accuracy[name] = (mixture.bayes_logits(samples).argmax(1) == labels).double().mean().item()
    assert accuracy["gfcg+autoguidance"] > accuracy["autoguidance"] + 0.02, accuracy


# -- configuration and bad input ------------------------------------------------------------------------------------


def test_config_leaves_out_the_model_and_round_trips_with_it(bad):
    rule = AutoGuidance(2.5, model=bad, prediction_type="epsilon")
    assert rule.config() == {"name": "autoguidance", "guidance_scale": 2.5, "prediction_type": "epsilon"}
    rebuilt = from_config({**rule.config(), "model": bad})
    assert rebuilt.model is bad and rebuilt.guidance_scale == 2.5
    assert get_guidance("autoguidance", guidance_scale=3.0, model=bad).guidance_scale == 3.0
    gfcg = GFCG(nn.Identity(), autoguidance=rule)
    nested = gfcg.config()["autoguidance"]
    assert nested == rule.config()
    rebuilt = GFCG(nn.Identity(), autoguidance={**nested, "model": bad})
    assert rebuilt.networks["guiding"].module is bad


def test_bad_arguments_give_clear_errors(bad):
    with pytest.raises(ValueError, match="needs model="):
        AutoGuidance(2.0)
    with pytest.raises(ValueError, match="needs model="):
        from_config({"name": "autoguidance", "guidance_scale": 2.0})
    with pytest.raises(TypeError, match="torch.nn.Module"):
        AutoGuidance(2.0, model=lambda x: x)
    with pytest.raises(ValueError, match=r"guidance_scale must be in \[0.0, inf\]"):
        AutoGuidance(-0.5, model=bad)
    with pytest.raises(ValueError, match="prediction_type"):
        AutoGuidance(2.0, model=bad, prediction_type="noise")
    with pytest.raises(ValueError, match="not both"):
        GFCG(nn.Identity(), cfg_scale=2.0, autoguidance=AutoGuidance(2.0, model=bad))
    with pytest.raises(ValueError, match="must be an AutoGuidance"):
        GFCG(nn.Identity(), autoguidance=CFG(2.0))
    with pytest.raises(ValueError, match="autoguidance_form"):
        GFCG(nn.Identity(), autoguidance=AutoGuidance(2.0, model=bad), autoguidance_form="both")


def test_a_guiding_model_of_another_prediction_type_or_shape_is_refused(good, scheduler, bad):
    with pytest.raises(ValueError, match="predicts 'v_prediction'.*expects 'epsilon'"):
        sample(good, scheduler, AutoGuidance(2.0, model=bad, prediction_type="v_prediction"), LABELS)

    class Wider(MixtureNet):
        def forward(self, x, t, class_labels):
            return torch.cat([super().forward(x, t, class_labels)] * 2, dim=1)

    with pytest.raises(ValueError, match=r"network 'guiding' returned predictions of shape \(32, 4\).*\(32, 2\)"):
        sample(good, scheduler, AutoGuidance(2.0, model=Wider(widened(good))), LABELS)


def test_a_loop_without_a_network_function_refuses_the_rule(good, scheduler, bad):
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="evaluates another network"):
        denoise(model_fn=good.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps,
                latents=torch.zeros(2, 2, dtype=torch.float64), guidance=AutoGuidance(2.0, model=bad),
                conditioning=good.conditioning(torch.tensor([0, 1])), num_inference_steps=2)
