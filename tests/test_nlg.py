"""NLG (nlg.md §9): the refinement step, its bookkeeping in the loop (NFE, generators, per-sample independence), the
direction for v-, x0- and flow-prediction models, and the effect on the exact Gaussian-mixture model."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.utils.torch_utils import randn_tensor

from guidance import CFG, NLG, Guidance, from_config, get_guidance, resolve_guidance
from guidance.base import Step
from guidance.nlg import DEFAULT_NOISE_STD, noise_level_direction, refine_step, scaled_norm_threshold
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from pipelines.run import derive_generator
from tests.gmm import two_class_mixture
from tests.tag_nlg_fakes import NULL_LABEL, FakeDenoiser, label_conditioning, tiny_class_pipeline

SHAPE = (4, 4, 4)
D = 64


def flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


class NoiseSpy(Guidance):
    """Records the (refined) noise it receives in ``prepare_noise``; listed after NLG."""

    def prepare_noise(self, noise, context):
        self.noise = noise.clone()
        return noise


def refine(guidance, latents, model=None, labels=None, scheduler=None, generator=None, steps=4, conditioning=None):
    """Run ``denoise`` with ``[guidance, spy]``; return (refined unit-variance noise, loop result)."""
    scheduler = scheduler or DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    scheduler.set_timesteps(steps)
    spy = NoiseSpy()
    labels = torch.arange(latents.shape[0]) % 10 if labels is None else labels
    result = denoise(
        model_fn=model or FakeDenoiser(SHAPE), scheduler=scheduler, timesteps=scheduler.timesteps,
        latents=latents * getattr(scheduler, "init_noise_sigma", 1.0),
        guidance=resolve_guidance([*guidance, spy] if isinstance(guidance, list) else [guidance, spy]),
        conditioning=conditioning or label_conditioning(labels), num_inference_steps=steps, generator=generator,
    )
    return spy.noise, result


def step_record(prediction_type: str, alpha: float, sigma: float, sample: torch.Tensor) -> Step:
    return Step(index=0, num_steps=1, evaluation=-1, first_stage=True, timestep=torch.tensor(999.0), alpha=alpha,
                sigma=sigma, sample=sample, prediction_type=prediction_type)


# ---------------------------------------------------------------- the refinement step


def test_refine_step_clip_bound_and_renormalisation():
    noise, direction = torch.randn(3, *SHAPE, dtype=torch.float64), torch.randn(3, *SHAPE, dtype=torch.float64)
    direction[1] *= 1e-3  # below the clip: moved by exactly step_size * direction
    moved = refine_step(noise, direction, 1.0, 0.5, None, renormalize=False)
    assert torch.all(flat_norm(moved - noise) <= 0.5 + 1e-12)
    torch.testing.assert_close(moved[1], noise[1] - direction[1])
    torch.testing.assert_close(moved[0], noise[0] - 0.5 * direction[0] / direction[0].norm())
    refined = refine_step(noise, direction, 2.0, None, 0.1 * torch.ones_like(noise), clamp=2.5)
    expected = (noise - 2.0 * direction + 0.1).clamp(-2.5, 2.5)
    torch.testing.assert_close(refined, expected * math.sqrt(D) / flat_norm(expected).view(-1, 1, 1, 1))


def test_zero_steps_leave_the_latents_bitwise_untouched():
    nlg = NLG(steps=0)
    noise = torch.randn(2, *SHAPE)
    assert not nlg.uses("prepare_noise") and nlg.prepare_noise(noise, None) is noise
    finals = []
    for rule in ([NLG(steps=0), CFG(2.0)], CFG(2.0)):  # Euler: init_noise_sigma != 1, so a round trip would show
        scheduler = EulerDiscreteScheduler(beta_schedule="scaled_linear")
        scheduler.set_timesteps(4)
        finals.append(denoise(model_fn=FakeDenoiser(SHAPE, dtype=torch.float32), scheduler=scheduler,
                              timesteps=scheduler.timesteps, latents=noise * scheduler.init_noise_sigma,
                              guidance=resolve_guidance(rule), conditioning=label_conditioning(torch.tensor([1, 2])),
                              num_inference_steps=4))
    assert torch.equal(finals[0].latents, finals[1].latents) and finals[0].nfe == finals[1].nfe == 8


def test_refined_noise_has_norm_sqrt_d_and_costs_two_nfe_per_iteration():
    latents = torch.randn(3, *SHAPE) * torch.tensor([0.5, 1.0, 2.0]).view(3, 1, 1, 1)
    refined, result = refine([NLG(steps=3), CFG(2.0)], latents, model=FakeDenoiser(SHAPE, dtype=torch.float32))
    assert refined.dtype == torch.float32
    torch.testing.assert_close(flat_norm(refined), torch.full((3,), math.sqrt(D)), rtol=1e-4, atol=0)
    assert result.nfe_per_sample == [2 * 3 + 2 * 4] * 3
    assert [entry["branches"] for entry in result.trace[:3]] == [{"uncond": 3, "cond": 3}] * 3
    assert all(entry["step"] == -1 for entry in result.trace[:3])
    _, unguided = refine(NLG(steps=3), latents)  # CFG off: 2K + 1 per sampling step
    assert unguided.nfe == 2 * 3 + 4


def test_identical_branches_only_renormalise():
    latents = torch.randn(2, *SHAPE, dtype=torch.float64)
    same = BranchConditioning({"cond": {"class_labels": torch.tensor([4, 4])},
                               "uncond": {"class_labels": torch.tensor([4, 4])}})
    refined, _ = refine(NLG(steps=5, noise_std=0.0), latents, conditioning=same)
    torch.testing.assert_close(refined, latents * math.sqrt(D) / flat_norm(latents).view(-1, 1, 1, 1))


# ---------------------------------------------------------------- randomness follows the generators


def test_batch_equals_single_runs_with_per_sample_generators_and_generators_are_not_consumed():
    seeds, labels = (3, 4, 5), torch.tensor([1, 6, 9])

    def run(rows):
        generators = [torch.Generator().manual_seed(seeds[r]) for r in rows]
        latents = torch.cat([torch.randn(1, *SHAPE, generator=g, dtype=torch.float64) for g in generators])
        states = [g.get_state() for g in generators]
        refined, result = refine([NLG(steps=4), CFG(3.0)], latents, labels=labels[rows], generator=generators)
        assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states))
        return refined, result.latents

    batch_noise, batch_out = run([0, 1, 2])
    for row in range(3):
        single_noise, single_out = run([row])
        torch.testing.assert_close(batch_noise[row : row + 1], single_noise, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(batch_out[row : row + 1], single_out, rtol=1e-12, atol=1e-12)
    latents = torch.randn(1, *SHAPE, dtype=torch.float64)
    a, _ = refine(NLG(steps=2), latents, generator=torch.Generator().manual_seed(0))
    b, _ = refine(NLG(steps=2), latents, generator=torch.Generator().manual_seed(0))
    c, _ = refine(NLG(steps=2), latents, generator=torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


@pytest.mark.parametrize("frozen", [False, True])
def test_fresh_noise_every_iteration_or_one_frozen_draw(frozen):
    latents, generator = torch.randn(2, *SHAPE, dtype=torch.float64), torch.Generator().manual_seed(7)
    same = BranchConditioning({"cond": {"class_labels": torch.tensor([2, 3])},
                               "uncond": {"class_labels": torch.tensor([2, 3])}})  # zero direction
    refined, _ = refine(NLG(steps=3, renormalize=False, frozen_noise=frozen), latents, conditioning=same,
                        generator=generator)
    draws = [randn_tensor(latents.shape, generator=derive_generator(generator, salt), dtype=latents.dtype)
             for salt in ((0, 0, 0) if frozen else (0, 1, 2))]
    torch.testing.assert_close(refined, latents + DEFAULT_NOISE_STD * sum(draws))


# ---------------------------------------------------------------- prediction types


def test_direction_from_v_and_x0_predictions_is_the_eps_difference():
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    eps_c, eps_u = torch.randn_like(x), torch.randn_like(x)
    alpha, sigma = 0.2, math.sqrt(1 - 0.04)
    v = lambda e: (e - sigma * x) / alpha  # noqa: E731  (spaces.md §2, eps -> v)
    x0 = lambda e: (x - sigma * e) / alpha  # noqa: E731
    expected = eps_c - eps_u
    torch.testing.assert_close(noise_level_direction(v(eps_c), v(eps_u), step_record("v_prediction", alpha, sigma, x)),
                               expected)
    torch.testing.assert_close(noise_level_direction(x0(eps_c), x0(eps_u), step_record("sample", alpha, sigma, x)),
                               expected)


def test_v_prediction_model_refines_like_its_eps_twin():
    eps_model = FakeDenoiser(SHAPE)

    def v_model(x, t, class_labels):  # the same network, reparameterised to predict v
        abar = float(DDIMScheduler(beta_schedule="scaled_linear").alphas_cumprod[int(t)])
        return (eps_model(x, t, class_labels) - math.sqrt(1 - abar) * x) / math.sqrt(abar)

    latents, labels = torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([0, 5])
    kwargs = dict(labels=labels, generator=torch.Generator().manual_seed(0))
    from_eps, _ = refine(NLG(steps=3, norm_threshold=0.0), latents, model=eps_model, **kwargs)
    v_scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear", prediction_type="v_prediction")
    from_v, _ = refine(NLG(steps=3, norm_threshold=0.0), latents, model=v_model, scheduler=v_scheduler, **kwargs)
    torch.testing.assert_close(from_v, from_eps, rtol=1e-10, atol=1e-10)


def test_flow_direction_is_the_velocity_difference_and_non_zero_at_s_1():
    x = torch.randn(2, *SHAPE, dtype=torch.float64)
    u_c, u_u = torch.randn_like(x), torch.randn_like(x)
    direction = noise_level_direction(u_c, u_u, step_record("flow", 0.0, 1.0, x))
    torch.testing.assert_close(direction, u_c - u_u)
    eps = lambda u: x + (1 - 1.0) * u  # noqa: E731  the eps route at s = 1: identically zero difference
    assert torch.equal(eps(u_c) - eps(u_u), torch.zeros_like(x)) and flat_norm(direction).min() > 1

    model, latents, labels = FakeDenoiser(SHAPE), torch.randn(2, *SHAPE, dtype=torch.float64), torch.tensor([3, 7])
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    refined, _ = refine(NLG(steps=1, norm_threshold=0.5, noise_std=0.0, renormalize=False), latents, model=model,
                        labels=labels, scheduler=scheduler)
    assert float(scheduler.sigmas[0]) == 1.0
    t0 = scheduler.timesteps[0]
    velocity_diff = model(latents, t0, labels) - model(latents, t0, torch.full_like(labels, NULL_LABEL))
    expected = latents - velocity_diff * torch.clamp(0.5 / flat_norm(velocity_diff), max=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(refined, expected)
    assert flat_norm(refined - latents).min() > 0.4


# ---------------------------------------------------------------- the exact Gaussian mixture


def noisy_log_posterior(mixture, x, alpha, sigma, labels, scale=0.5):
    """log p(y | x_t) of the isotropic two-class mixture (equal priors) at x_t = alpha x0 + sigma eps."""
    var = alpha**2 * scale**2 + sigma**2
    logits = -((x[:, None, :] - alpha * mixture.means[None]) ** 2).sum(-1) / (2 * var)
    return torch.log_softmax(logits, dim=1)[torch.arange(x.shape[0]), labels]


def test_one_iteration_ascends_log_p_y_given_noise():
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    mixture = two_class_mixture(scheduler.alphas_cumprod, dim=16, separation=0.5)
    latents, labels = torch.randn(500, 16, dtype=torch.float64), torch.arange(500) % 2
    refined, _ = refine(NLG(steps=1, noise_std=0.0, renormalize=False), latents, model=mixture.model_fn,
                        labels=labels, scheduler=scheduler, conditioning=mixture.conditioning(labels), steps=25)
    alpha, sigma = mixture.alpha_sigma(999.0)  # where NLG evaluates (timestep="max")
    gain = noisy_log_posterior(mixture, refined, alpha, sigma, labels) - noisy_log_posterior(
        mixture, latents, alpha, sigma, labels)
    assert (gain > 0).all()


@pytest.mark.parametrize("timestep", ["first", "max"])
def test_nlg_raises_bayes_accuracy_on_the_gaussian_mixture(timestep):
    """Unguided conditional DDIM (20 steps) from the same noise, with and without NLG's official refinement (the
    absolute tau = 0.5: the size-scaled default is 0.0156 at D = 16, a far smaller step), evaluated at the schedule's
    first timestep (951) or at t = 999 (official).

    Two overlapping classes (means +-0.5, std 0.5) in D = 16 with SD's scaled-linear schedule: the exact conditional
    sampler reaches the Bayes accuracy of the data (~0.84); refined noise lands further inside its class. At t = 999
    the direction is shorter than tau here (not clipped), so the step and the gain are smaller: accuracy +0.025
    (3.2 standard errors) instead of +0.052 at t = 951, log p(y | x) +0.079 (11 standard errors).
    """
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    mixture = two_class_mixture(scheduler.alphas_cumprod, dim=16, separation=0.5)
    n = 600
    latents = torch.randn(n, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 2
    stats = {}
    official = {**NLG.official().config(), "timestep": timestep}
    for name, rule in (("base", Guidance()), ("nlg", from_config(official))):
        _, result = refine(rule, latents, model=mixture.model_fn, labels=labels, scheduler=scheduler, steps=20,
                           conditioning=mixture.conditioning(labels), generator=torch.Generator().manual_seed(1))
        logits = mixture.bayes_logits(result.latents)
        stats[name] = {
            "correct": (logits.argmax(1) == labels).double(),
            "log_p_y": torch.log_softmax(logits, 1)[torch.arange(n), labels],
            "log_p_x": mixture.log_density(result.latents, labels),
            "nfe": result.nfe,
        }
    assert stats["base"]["nfe"] == 20 and stats["nlg"]["nfe"] == 20 + 40
    report = {}
    for key in ("correct", "log_p_y", "log_p_x"):
        diff = stats["nlg"][key] - stats["base"][key]  # paired: same initial noise
        report[key] = (stats["base"][key].mean().item(), stats["nlg"][key].mean().item(), diff.mean().item(),
                       (diff.std() / n**0.5).item())
    print("base / NLG / gain +- stderr:", {k: tuple(round(v, 4) for v in r) for k, r in report.items()})
    for key in ("correct", "log_p_y"):
        _, _, gain, stderr = report[key]
        if timestep == "first":
            assert gain > 4 * stderr and gain > 0.03
        else:
            assert gain > 3 * stderr and gain > 0.02


# ---------------------------------------------------------------- configuration and bad input


def test_registry_config_round_trip():
    for module in (NLG(), NLG(steps=5, norm_threshold=0.0, noise_std=0.0, clamp=3.0, frozen_noise=True, timestep="first")):
        rebuilt = from_config(json.dumps(module.config()))
        assert isinstance(rebuilt, NLG) and rebuilt.config() == module.config()
    assert isinstance(get_guidance("nlg"), NLG)
    assert NLG().noise_std == pytest.approx(math.sqrt(0.001))


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"steps": -1}, ValueError, "steps"),
        ({"steps": 2.0}, TypeError, "steps"),
        ({"steps": True}, TypeError, "steps"),
        ({"step_size": 0.0}, ValueError, "step_size"),
        ({"max_norm": -0.1}, ValueError, "max_norm"),
        ({"timestep": "last"}, ValueError, "timestep"),
        ({"noise_std": -0.1}, ValueError, "noise_std"),
        ({"clamp": 0.0}, ValueError, "clamp"),
        ({"renormalize": "yes"}, TypeError, "renormalize"),
        ({"frozen_noise": 1}, TypeError, "frozen_noise"),
    ],
)
def test_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        NLG(**kwargs)


def test_pipeline_nfe_and_refusal_without_an_unconditional_branch():
    pipe = tiny_class_pipeline(DDIMScheduler(clip_sample=False))
    out = pipe([1, 8], guidance=[NLG(steps=2), CFG(3.0)], num_inference_steps=3, output_type="latent",
               generator=torch.Generator().manual_seed(0))
    assert out.nfe == 2 * 2 + 2 * 3 and out.model_calls == 2 + 3
    no_null = tiny_class_pipeline(DDIMScheduler(clip_sample=False), null_class_label=None)
    with pytest.raises(ValueError, match="uncond"):
        no_null([1], guidance=NLG(steps=2), num_inference_steps=3, output_type="latent")


# ---------------------------------------------------------------- size-scaled default clip (issue 17)


def test_default_clip_is_the_official_tau_at_the_official_experiments_size_and_scales_as_sqrt_d():
    """0.5 at SD 2.1's 768-px latents (4x96x96, the official experiments' shape), sqrt(D) scaling elsewhere."""
    assert NLG().norm_threshold is None
    assert NLG().threshold_for(torch.zeros(2, 4, 96, 96)) == 0.5  # SD 2.1 at 768 px: the official value
    for shape in ((1, 8, 8), (4, 64, 64), (4, 128, 128), (16, 32, 32)):
        elements = math.prod(shape)
        assert NLG().threshold_for(torch.zeros(1, *shape)) == pytest.approx(0.5 * math.sqrt(elements / 36864))
    assert NLG().threshold_for(torch.zeros(3, 1, 8, 8)) == pytest.approx(0.5 / 24)
    assert NLG().threshold_for(torch.zeros(1, 4, 64, 64)) == pytest.approx(1 / 3)  # SD 1.5 at 512 px
    assert NLG(norm_threshold=0.5).threshold_for(torch.zeros(1, 1, 8, 8)) == 0.5  # an explicit value stays absolute
    assert NLG(norm_threshold=0.0).threshold_for(torch.zeros(1, 1, 8, 8)) is None  # 0: no clip
    assert scaled_norm_threshold(36864) == 0.5 and scaled_norm_threshold(4 * 128 * 128) == pytest.approx(2 / 3)


def test_official_configuration_is_the_literal_official_values():
    official = NLG.official().config()
    assert official == {"name": "nlg", "steps": 20, "step_size": 1.0, "norm_threshold": 0.5, "noise_std": math.sqrt(0.001),
                        "renormalize": True, "clamp": None, "frozen_noise": False, "timestep": "max"}
    assert from_config(json.dumps(official)).config() == official


def test_zero_noise_without_perturbation_stays_finite():
    """A zero vector cannot be rescaled to the shell (0/0): it stays zero instead of becoming NaN."""
    zero = torch.zeros(2, *SHAPE, dtype=torch.float64)
    refined = refine_step(zero, torch.zeros_like(zero), 1.0, 0.5, None)
    assert torch.equal(refined, zero)
    out, _ = refine(NLG(steps=2, noise_std=0.0), zero, conditioning=BranchConditioning(
        {"cond": {"class_labels": torch.tensor([2, 3])}, "uncond": {"class_labels": torch.tensor([2, 3])}}))
    assert torch.isfinite(out).all()


# ---------------------------------------------------------------- faithfulness: t = 999 as the official code


def official_refinement(unet, noise, labels, null_label, alphas_cumprod, steps=20, step_size=1.0, tau=0.5):
    """``refine_noise`` transcribed from the official code's description (nlg.md §3), noise injection off:
    t = 999 for every iteration, the batch duplicated as [uncond, cond] and fed as is (DDIM's scale_model_input is
    the identity), eps-prediction, direction eps_c - eps_u, per-sample clip to tau, n - step * d, rescale to sqrt(D)."""
    del alphas_cumprod  # an eps model needs no alpha, sigma (the v-pred branch would use them)
    n = noise.clone()
    batch = n.shape[0]
    class_labels = torch.cat([torch.full((batch,), null_label), torch.as_tensor(labels)])
    dim = n[0].numel()
    for _ in range(steps):
        eps = unet(torch.cat([n, n]), 999, class_labels=class_labels).sample
        eps_uncond, eps_cond = eps[:batch], eps[batch:]
        d = (eps_cond - eps_uncond).double()
        norms = d.flatten(1).norm(dim=1)
        d = torch.stack([d[b] * min(1.0, tau / float(norms[b])) for b in range(batch)])
        n = (n.double() - step_size * d)
        n = torch.stack([n[b] * math.sqrt(dim) / float(n[b].norm()) for b in range(batch)]).float()
    return n


def test_refined_noise_at_t999_equals_the_official_refinement_on_the_digits_model():
    from pipelines import GuidedClassConditionalPipeline

    pipe = GuidedClassConditionalPipeline.from_pretrained("samples/weights/digits")
    pipe.set_progress_bar_config(disable=True)
    labels = [3, 8]
    noise = torch.randn(2, 1, 8, 8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = official_refinement(pipe.unet, noise, labels, pipe.null_class_label, pipe.scheduler.alphas_cumprod)
    refined = {}
    for timestep in ("max", "first"):
        spy = NoiseSpy()
        rule = from_config({**NLG.official().config(), "noise_std": 0.0, "timestep": timestep})
        pipe(labels, guidance=[rule, spy], num_inference_steps=30, latents=noise.clone(), output_type="latent")
        refined[timestep] = spy.noise
    assert float((refined["max"] - expected).abs().max()) < 1e-5
    assert float((refined["first"] - expected).abs().max()) > 1e-3  # timesteps[0] = 957 is not what the code does


def test_max_norm_is_a_deprecated_alias_of_norm_threshold():
    """One word for the clip across rules (APG's ``norm_threshold``); the old keyword still works, with a warning."""
    with pytest.warns(FutureWarning, match="norm_threshold"):
        old = NLG(max_norm=0.25)
    assert old == NLG(norm_threshold=0.25) and old.config()["norm_threshold"] == 0.25 and "max_norm" not in old.config()
    with pytest.warns(FutureWarning, match="norm_threshold"):  # an old config still builds
        assert from_config({"name": "nlg", "max_norm": 0.25}) == NLG(norm_threshold=0.25)
    with pytest.raises(ValueError, match="not both"):
        NLG(norm_threshold=0.25, max_norm=0.25)
    with pytest.raises(TypeError, match="unexpected keyword"):
        NLG(max_nrom=0.25)
