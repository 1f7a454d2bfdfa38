"""TAG and TAG_cfg (tag.md §9): the post-step rule against independent references, its equivalence to the
output-space form where the paper says it holds (and not where it does not), TAG_cfg's space invariance, and the
effect on the exact Gaussian-mixture model."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from guidance import APG, CFG, TAG, TAGCFG, AdaptiveGuidance, Guidance, from_config, get_guidance, resolve_guidance
from guidance.cfg import classifier_free_guidance
from guidance.tag import FAMILY_TANGENTIAL_SCALE, tangential_amplify
from guidance.tag_cfg import tangential_cfg
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tests.gmm import two_class_mixture
from tests.tag_nlg_fakes import FakeDenoiser, label_conditioning, tiny_class_pipeline

SHAPE = (4, 4, 4)  # per-sample latent shape of the fake-model trajectories (D = 64)


def flat_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1)


def reference_tag(before: torch.Tensor, after: torch.Tensor, eta: float, eta_r: float = 1.0) -> torch.Tensor:
    """App. D Alg. 2, written per sample on flattened float64 vectors."""
    rows = []
    for x, x_new in zip(before.double().reshape(before.shape[0], -1), after.double().reshape(after.shape[0], -1)):
        unit = x / (x.norm() + 1e-8)
        step = x_new - x
        radial = (step @ unit) * unit
        rows.append(x + eta_r * radial + eta * (step - radial))
    return torch.stack(rows).reshape(after.shape)


def tangential(v: torch.Tensor, basis: torch.Tensor) -> torch.Tensor:
    """P_perp(basis) v per sample, float64, without eps guard."""
    flat_v, flat_b = v.double().reshape(v.shape[0], -1), basis.double().reshape(v.shape[0], -1)
    unit = flat_b / flat_b.norm(dim=1, keepdim=True)
    return (flat_v - (flat_v * unit).sum(1, keepdim=True) * unit).reshape(v.shape)


class OutputSpaceTAG(Guidance):
    """The output-space form: step with ``m + (eta - 1) P_perp(x) m`` (paper Eq. 16)."""

    def __init__(self, eta: float) -> None:
        self.eta = eta

    def combine(self, preds, step):
        pred = preds["cond"]
        return (pred.double() + (self.eta - 1) * tangential(pred, step.sample)).to(pred.dtype)


class RecordingTAG(TAG):
    """TAG that records (step index, start timestep, applied) at every ``after_step`` call."""

    def reset(self) -> None:
        self.calls: list[tuple[int, float, bool]] = []

    def after_step(self, before, after, step):
        self.calls.append((step.index, float(step.timestep), self.active(step.timestep)))
        return super().after_step(before, after, step)


def trajectory(scheduler, guidance, latents, steps, model, conditioning=None):
    """Run ``denoise`` from unit-variance ``latents`` and return (latents after every evaluation, result)."""
    scheduler.set_timesteps(steps)
    states: list[torch.Tensor] = []

    def record(i, t, x):
        states.append(x.clone())
        return x

    result = denoise(
        model_fn=model, scheduler=scheduler, timesteps=scheduler.timesteps,
        latents=latents * getattr(scheduler, "init_noise_sigma", 1.0), guidance=resolve_guidance(guidance),
        conditioning=conditioning or BranchConditioning({"cond": {}}), num_inference_steps=steps, on_step_end=record,
    )
    return states, result


SCHEDULERS = {
    "ddim-eps": lambda: DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear"),
    "ddim-v": lambda: DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear", prediction_type="v_prediction"),
    "euler": lambda: EulerDiscreteScheduler(beta_schedule="scaled_linear"),
    "flow-euler": lambda: FlowMatchEulerDiscreteScheduler(shift=3.0),
    "dpm++2m": lambda: DPMSolverMultistepScheduler(beta_schedule="scaled_linear"),
    "heun": lambda: HeunDiscreteScheduler(beta_schedule="scaled_linear"),
}


# ---------------------------------------------------------------- the post-step rule itself


def test_tag_matches_reference_radial_kept_tangential_scaled_and_closed_form():
    before, after = torch.randn(3, 4, 5, 6, dtype=torch.float64), torch.randn(3, 4, 5, 6, dtype=torch.float64)
    eta = 1.3
    out = tangential_amplify(before, after, eta)
    torch.testing.assert_close(out, reference_tag(before, after, eta), rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(tangential_amplify(before, after, 1.2, radial_scale=0.7),
                               reference_tag(before, after, 1.2, 0.7))
    unit = before / flat_norm(before).view(-1, 1, 1, 1)
    radial = lambda v: (v * unit).sum((1, 2, 3))  # noqa: E731
    torch.testing.assert_close(radial(out - before), radial(after - before))  # Eq. 22
    torch.testing.assert_close(tangential(out - before, before), eta * tangential(after - before, before))
    torch.testing.assert_close(out, after + (eta - 1) * tangential(after, before), rtol=1e-7, atol=1e-9)
    increment = after - before
    squared = radial(increment) ** 2 + eta**2 * flat_norm(tangential(increment, before)) ** 2
    torch.testing.assert_close(flat_norm(out - before) ** 2, squared)


def test_tag_eta_one_is_the_identity_and_scale_invariance_and_linearity():
    before, after = torch.randn(2, 3, 8, 8), torch.randn(2, 3, 8, 8)
    assert tangential_amplify(before, after, 1.0) is after
    torch.testing.assert_close(
        tangential_amplify(before.double(), after.double(), 1.0 + 1e-300), after.double(), rtol=0, atol=1e-14
    )
    b, a = before.double(), after.double()
    torch.testing.assert_close(tangential_amplify(7.5 * b, a, 1.4), tangential_amplify(b, a, 1.4))
    torch.testing.assert_close(tangential_amplify(b, -2.5 * a, 1.4), -2.5 * tangential_amplify(b, a, 1.4))


@pytest.mark.parametrize("shape", [(2, 3, 2, 4, 4), (2, 10, 6), (2, 5)])
def test_tag_reduces_over_all_non_batch_dims(shape):
    before, after = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(tangential_amplify(before, after, 1.2), reference_tag(before, after, 1.2))


def test_tag_fp16_large_latents_no_overflow():
    # SD3-sized latents: the sum of squares (262,144 elements at VE scale) overflows float16
    before = (torch.randn(2, 16, 128, 128) * 14.6).half()
    after = (before.float() * 0.9 + 0.5 * torch.randn(2, 16, 128, 128)).half()
    out = tangential_amplify(before, after, 1.2)
    assert out.dtype == torch.float16 and torch.isfinite(out).all()
    reference = tangential_amplify(before.float(), after.float(), 1.2)
    assert (flat_norm(out.float() - reference) / flat_norm(reference)).max() < 1e-3


# ---------------------------------------------------------------- TAG in the loop


def test_tag_eta_one_equals_base_sampler_exactly_in_the_pipeline():
    pipe = tiny_class_pipeline(DDIMScheduler(clip_sample=False))
    kwargs = dict(class_labels=[1, 4, 7], num_inference_steps=5, output_type="latent")
    base = pipe(guidance=CFG(3.0), generator=torch.Generator().manual_seed(0), **kwargs)
    same = pipe(guidance=[CFG(3.0), TAG(tangential_scale=1.0)], generator=torch.Generator().manual_seed(0), **kwargs)
    other = pipe(guidance=[CFG(3.0), TAG(tangential_scale=1.3)], generator=torch.Generator().manual_seed(0), **kwargs)
    assert torch.equal(same.images, base.images)
    assert same.nfe == base.nfe == other.nfe == 10
    assert not torch.allclose(other.images, base.images, atol=1e-3)


def test_tag_window_inclusive_edges_and_outside_is_bitwise_base():
    tag = TAG(tangential_scale=1.5, window=(500, 400))
    assert [tag.active(t) for t in (501, 500, 450, 400, 399.5)] == [False, True, True, True, False]
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")  # 10 steps: t = 900, 800, ..., 0
    model, latents = FakeDenoiser(SHAPE), torch.randn(2, *SHAPE, dtype=torch.float64)
    recording = RecordingTAG(1.5, window=(500, 400))
    windowed, _ = trajectory(scheduler, recording, latents, 10, model)
    base, _ = trajectory(scheduler, Guidance(), latents, 10, model)
    assert [t for _, t, on in recording.calls if on] == [500.0, 400.0]  # both edges inclusive
    for k in range(4):  # t = 900 ... 600: outside, bitwise the base sampler
        assert torch.equal(windowed[k], base[k])
    assert not torch.allclose(windowed[4], base[4])  # t = 500, the upper edge


@pytest.mark.parametrize("name", ["ddim-eps", "euler", "flow-euler", "dpm++2m", "heun"])
def test_tag_in_the_loop_matches_an_independent_post_step_loop(name):
    """§9.11: per completed step, the App. D rule on (start-of-step, end-of-step) samples; Heun: once per step."""
    steps, eta, window = 6, 1.25, (800.0, 200.0)
    model, latents = FakeDenoiser(SHAPE), torch.randn(2, *SHAPE, dtype=torch.float64)
    tag = RecordingTAG(eta, window=window)
    _, result = trajectory(SCHEDULERS[name](), tag, latents, steps, model)

    scheduler = SCHEDULERS[name]()
    scheduler.set_timesteps(steps)
    x = latents * getattr(scheduler, "init_noise_sigma", 1.0)
    timesteps = scheduler.timesteps
    applied = []
    for i, t in enumerate(timesteps):
        if getattr(scheduler, "state_in_first_order", True):
            start, t_begin = x, float(t)
        model_input = scheduler.scale_model_input(x, t) if hasattr(scheduler, "scale_model_input") else x
        x = scheduler.step(model(model_input, t), t, x).prev_sample
        if getattr(scheduler, "state_in_first_order", True) or i == len(timesteps) - 1:
            applied.append(window[1] <= t_begin <= window[0])
            if applied[-1]:
                x = reference_tag(start, x, eta)
    torch.testing.assert_close(result.latents, x, rtol=1e-10, atol=1e-10)
    assert [index for index, _, _ in tag.calls] == list(range(steps))  # exactly one TAG call per completed step
    assert [on for _, _, on in tag.calls] == applied and any(applied) and not all(applied)


def test_heun_window_sees_the_same_start_timesteps_as_euler():
    model, latents = FakeDenoiser(SHAPE), torch.randn(1, *SHAPE, dtype=torch.float64)
    heun, euler = RecordingTAG(1.2, window=(700, 300)), RecordingTAG(1.2, window=(700, 300))
    trajectory(SCHEDULERS["heun"](), heun, latents, 7, model)
    trajectory(SCHEDULERS["euler"](), euler, latents, 7, model)
    assert len(heun.calls) == 7 and heun.calls == euler.calls


@pytest.mark.parametrize("name", ["ddim-eps", "ddim-v", "euler", "flow-euler"])
def test_post_step_equals_output_space_form_for_first_order_deterministic_steps(name):
    model, latents = FakeDenoiser(SHAPE, dtype=torch.float32), torch.randn(2, *SHAPE)
    post, _ = trajectory(SCHEDULERS[name](), TAG(1.3), latents, 10, model)
    output, _ = trajectory(SCHEDULERS[name](), OutputSpaceTAG(1.3), latents, 10, model)
    base, _ = trajectory(SCHEDULERS[name](), Guidance(), latents, 10, model)
    for k, (a, b) in enumerate(zip(post, output)):
        scale = max(1.0, float(b.abs().max()))
        torch.testing.assert_close(a, b, rtol=0, atol=1e-4 * scale, msg=f"step {k}")
    assert (post[-1] - base[-1]).abs().max() > 1e-2  # and TAG did change the trajectory


def test_post_step_differs_from_output_space_for_dpm_solver_2m_after_step_0():
    model, latents = FakeDenoiser(SHAPE), torch.randn(2, *SHAPE, dtype=torch.float64)
    post, _ = trajectory(SCHEDULERS["dpm++2m"](), TAG(1.3), latents, 10, model)
    output, _ = trajectory(SCHEDULERS["dpm++2m"](), OutputSpaceTAG(1.3), latents, 10, model)
    torch.testing.assert_close(post[0], output[0], rtol=1e-6, atol=1e-6)  # step 0 is first order
    assert (post[-1] - output[-1]).abs().max() > 1e-3


def test_tag_batch_equals_single_runs_with_per_sample_generators():
    """DDPM is stochastic: the per-sample generators drive its noise, and TAG's reductions must stay per sample."""
    model, labels, seeds = FakeDenoiser(SHAPE), torch.tensor([3, 5, 8]), (10, 11, 12)

    def run(rows):
        generators = [torch.Generator().manual_seed(seeds[r]) for r in rows]
        latents = torch.cat([torch.randn(1, *SHAPE, generator=g, dtype=torch.float64) for g in generators])
        scheduler = DDPMScheduler(clip_sample=False)
        scheduler.set_timesteps(6)
        return denoise(model_fn=model, scheduler=scheduler, timesteps=scheduler.timesteps, latents=latents,
                       guidance=resolve_guidance([CFG(2.0), TAG(1.3)]), conditioning=label_conditioning(labels[rows]),
                       num_inference_steps=6, generator=generators, extra_step_kwargs={"generator": generators}).latents

    batch = run([0, 1, 2])
    for row in range(3):
        torch.testing.assert_close(batch[row : row + 1], run([row]), rtol=1e-12, atol=1e-12)


def test_tag_raises_model_likelihood_on_the_gaussian_mixture():
    """Thm 4.1 on the exact model: same noise, same NFE, DDIM 25 steps, D = 32 (the Gaussian annulus matters)."""
    scheduler = DDIMScheduler(clip_sample=False, beta_schedule="scaled_linear")
    mixture = two_class_mixture(scheduler.alphas_cumprod, dim=32)
    n = 200
    latents = torch.randn(n, 32, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    labels = torch.arange(n) % 2
    log_density = {}
    for eta in (1.0, 1.2):
        scheduler.set_timesteps(25)
        result = denoise(model_fn=mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps,
                         latents=latents, guidance=TAG(eta), conditioning=mixture.conditioning(labels),
                         num_inference_steps=25)
        assert result.nfe == 25
        log_density[eta] = mixture.log_density(result.latents, labels)
    gain = log_density[1.2] - log_density[1.0]  # paired: same initial noise
    stderr = gain.std() / n**0.5
    print(f"mean log p(x0|y): base {log_density[1.0].mean():.3f}, TAG(1.2) {log_density[1.2].mean():.3f}, "
          f"gain {gain.mean():.3f} +- {stderr:.3f}")
    assert gain.mean() > 10 * stderr and gain.mean() > 0.3


# ---------------------------------------------------------------- TAG_cfg


def test_tag_cfg_eta_zero_is_exactly_cfg():
    cond, uncond, x = torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8), torch.randn(3, 4, 8, 8)
    assert torch.equal(tangential_cfg(cond, uncond, x, 5.0, 0.0), classifier_free_guidance(cond, uncond, 5.0))
    scheduler = DDIMScheduler(clip_sample=False)
    mixture = two_class_mixture(scheduler.alphas_cumprod, dim=4)
    latents, labels = torch.randn(6, 4, dtype=torch.float64), torch.arange(6) % 2
    finals = []
    for rule in (CFG(3.0), TAGCFG(3.0, tangential_weight=0.0)):
        scheduler.set_timesteps(10)
        finals.append(denoise(model_fn=mixture.model_fn, scheduler=scheduler, timesteps=scheduler.timesteps,
                              latents=latents, guidance=rule, conditioning=mixture.conditioning(labels),
                              num_inference_steps=10).latents)
    assert torch.equal(finals[0], finals[1])
    assert TAGCFG(1.0, tangential_weight=0.0).branches({}, None) == CFG(1.0).branches({}, None)
    assert {b.name for b in TAGCFG(1.0, tangential_weight=0.5).branches({}, None)} == {"cond", "uncond"}


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_tag_cfg_residual_parallel_to_x_is_cfg_without_nan(dtype):
    x = torch.randn(2, 4, 8, 8, dtype=dtype)
    for uncond, cond in ((torch.zeros_like(x), 2 * x), (x * 0.5, x * 0.5)):  # g = 2x, and g = 0
        for adaptive in (False, True):
            out = tangential_cfg(cond, uncond, x, 4.0, 2.0, adaptive=adaptive)
            assert torch.isfinite(out).all()
            torch.testing.assert_close(out, classifier_free_guidance(cond, uncond, 4.0), rtol=1e-6, atol=1e-6)


def algorithm_3(eps_c, eps_u, x, sigma, scale, eta):
    """App. D Alg. 3 (score space, s = -eps / sigma, back with eps = -sigma s*), per sample on flat float64 rows."""
    rows = []
    for c, u, xb in zip(*(v.double().reshape(v.shape[0], -1) for v in (eps_c, eps_u, x))):
        s_c, s_u = -c / (sigma + 1e-12), -u / (sigma + 1e-12)
        g = s_c - s_u
        unit_x = xb / (xb.norm() + 1e-8)
        g_perp = g - (g @ unit_x) * unit_x
        unit = g_perp / (g_perp.norm() + 1e-8)
        rows.append(-sigma * (s_u + scale * g + eta * (s_c @ unit) * unit))
    return torch.stack(rows).reshape(eps_c.shape)


@pytest.mark.parametrize("sigma", [0.05, 0.5, 0.999])
def test_tag_cfg_eps_form_equals_score_space_algorithm_3(sigma):
    eps_c, eps_u, x = (torch.randn(3, 4, 6, 6, dtype=torch.float64) for _ in range(3))
    out = tangential_cfg(eps_c, eps_u, x, 4.0, 2.5)
    torch.testing.assert_close(out, algorithm_3(eps_c, eps_u, x, sigma, 4.0, 2.5), rtol=1e-7, atol=1e-7)
    assert (out - classifier_free_guidance(eps_c, eps_u, 4.0)).abs().max() > 0.1


@pytest.mark.parametrize("space", ["v_prediction", "sample", "flow"])
@pytest.mark.parametrize("adaptive", [False, True])
def test_tag_cfg_in_any_prediction_space_equals_the_converted_eps_result(space, adaptive):
    x, eps_c, eps_u = (torch.randn(3, 4, 6, 6, dtype=torch.float64) for _ in range(3))
    s = 0.6  # flow: alpha = 1 - s, sigma = s; VP: alpha^2 + sigma^2 = 1
    alpha, sigma = (1 - s, s) if space == "flow" else (0.6, 0.8)
    to_space = {  # eps -> output at fixed x (spaces.md §2), and back
        "v_prediction": (lambda e: (e - sigma * x) / alpha, lambda v: sigma * x + alpha * v),
        "sample": (lambda e: (x - sigma * e) / alpha, lambda x0: (x - alpha * x0) / sigma),
        "flow": (lambda e: (e - x) / (1 - s), lambda u: x + (1 - s) * u),
    }[space]
    forward, back = to_space
    delta = 1e-12  # Eq. 28's delta is in output units, so it is the one term that is not space invariant
    in_space = tangential_cfg(forward(eps_c), forward(eps_u), x, 3.0, 1.5, adaptive=adaptive, delta=delta)
    torch.testing.assert_close(back(in_space), tangential_cfg(eps_c, eps_u, x, 3.0, 1.5, adaptive, delta),
                               rtol=1e-9, atol=1e-9)


def test_tag_cfg_adaptive_aligned_term_has_the_residual_norm():
    cond, uncond, x = torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8), torch.randn(4, 4, 8, 8)
    uncond[1] *= 30  # very different residual sizes per sample
    eta = 2.0
    term = (tangential_cfg(cond, uncond, x, 3.0, eta, adaptive=True).double()
            - classifier_free_guidance(cond, uncond, 3.0).double()) / eta
    torch.testing.assert_close(flat_norm(term), flat_norm(cond.double() - uncond.double()), rtol=1e-3, atol=0)


def test_tag_cfg_fp16_large_latents():
    x = torch.randn(2, 16, 128, 128).half()
    cond, uncond = torch.randn(2, 16, 128, 128).half(), torch.randn(2, 16, 128, 128).half()
    for adaptive in (False, True):
        out = tangential_cfg(cond, uncond, x, 5.0, 1.0, adaptive=adaptive)
        assert out.dtype == torch.float16 and torch.isfinite(out).all()
        reference = tangential_cfg(cond.float(), uncond.float(), x.float(), 5.0, 1.0, adaptive=adaptive)
        assert (flat_norm(out.float() - reference) / flat_norm(reference)).max() < 1e-3


def test_tag_cfg_composes_with_tag_at_cfg_cost():
    model, labels = FakeDenoiser(SHAPE), torch.tensor([2, 9])
    latents = torch.randn(2, *SHAPE, dtype=torch.float64)
    _, result = trajectory(SCHEDULERS["ddim-eps"](), [TAGCFG(3.0, tangential_weight=1.0), TAG(1.15)], latents, 5, model,
                           label_conditioning(labels))
    assert result.nfe == 10 and torch.isfinite(result.latents).all()


@pytest.mark.parametrize("make", [lambda: APG(3.0), lambda: AdaptiveGuidance(CFG(3.0), threshold=0.5)])
def test_tag_adds_no_evaluations_to_other_combine_rules(make):
    model, labels = FakeDenoiser(SHAPE), torch.tensor([2, 9])
    latents = torch.randn(2, *SHAPE, dtype=torch.float64)
    _, alone = trajectory(SCHEDULERS["ddim-eps"](), make(), latents, 6, model, label_conditioning(labels))
    _, tagged = trajectory(SCHEDULERS["ddim-eps"](), [make(), TAG(1.2)], latents, 6, model, label_conditioning(labels))
    assert tagged.nfe_per_sample == alone.nfe_per_sample
    assert (tagged.latents - alone.latents).abs().max() > 1e-3


# ---------------------------------------------------------------- configuration and bad input


def test_registry_config_round_trip_and_family_defaults():
    for module in (TAG(1.2, window=(1000, 400)), TAGCFG(4.0, tangential_weight=2.0, adaptive=True, delta=1e-3)):
        rebuilt = from_config(json.dumps(module.config()))
        assert type(rebuilt) is type(module)
        assert json.dumps(rebuilt.config()) == json.dumps(module.config())
    assert isinstance(get_guidance("tag"), TAG) and isinstance(get_guidance("tag-cfg"), TAGCFG)
    assert TAG().tangential_scale == 1.15 and TAG().window == (1000.0, 0.0)
    assert {k: TAG.for_family(k).tangential_scale for k in FAMILY_TANGENTIAL_SCALE} == {
        "sd1.5": 1.15, "sd2.1": 1.15, "sdxl": 1.2, "sd3": 1.05}
    with pytest.raises(ValueError, match="family"):
        TAG.for_family("sd4")


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tangential_scale": 0.0}, ValueError, "tangential_scale"),
        ({"tangential_scale": -1.2}, ValueError, "tangential_scale"),
        ({"tangential_scale": float("nan")}, ValueError, "tangential_scale"),
        ({"tangential_scale": "1.2"}, TypeError, "tangential_scale"),
        ({"window": (400, 1000)}, ValueError, "t_start > t_end"),
        ({"window": (500, 500)}, ValueError, "t_start > t_end"),
        ({"window": (1000,)}, ValueError, "window"),
        ({"window": ()}, ValueError, "window"),
        ({"window": 1000}, TypeError, "window"),
        ({"window": (1000, -1)}, ValueError, "t_end"),
    ],
)
def test_tag_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        TAG(**kwargs)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"tangential_weight": -0.5}, ValueError, "tangential_weight"),
        ({"guidance_scale": -1.0}, ValueError, "guidance_scale"),
        ({"delta": 0.0}, ValueError, "delta"),
        ({"adaptive": 1}, TypeError, "adaptive"),
    ],
)
def test_tag_cfg_bad_input(kwargs, error, match):
    with pytest.raises(error, match=match):
        TAGCFG(**kwargs)
