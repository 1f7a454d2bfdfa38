"""APG (shared/methods/apg.md §9) against a literal float64 transcription of Algorithm 1 and against diffusers."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import DDIMScheduler, HeunDiscreteScheduler, UNet2DModel
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.guiders.adaptive_projected_guidance import (
    MomentumBuffer,
    normalized_guidance,
)

from guidance import APG, CFG, Guidance
from guidance.apg import apg_x0, parallel_coefficient
from guidance.spaces import clip_factor, clip_norm
from guidance.base import Step
from pipelines.class_conditional import GuidedClassConditionalPipeline
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tests.tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- reference: Algorithm 1, written out in float64


def norm(x: torch.Tensor) -> torch.Tensor:
    return torch.sqrt((x.double() ** 2).flatten(1).sum(1)).reshape(-1, *([1] * (x.ndim - 1)))


def listing(cond_x0, update, w, eta, r):
    """``D_c + (w - 1) * U`` exactly as the listing: clip, normalise D_c, project, all in float64."""
    c, d = cond_x0.double(), update.double()
    if r > 0:
        d = d * torch.clamp(r / norm(d), max=1.0)
    unit = c / norm(c)
    parallel = (d * unit).flatten(1).sum(1).reshape(norm(c).shape) * unit
    return c + (w - 1) * ((d - parallel) + eta * parallel)


def relative(a, b) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


def make_step(sample, sigma=0.6, prediction_type="epsilon", **kw) -> Step:
    """A VP evaluation record (flow: alpha = 1 - sigma)."""
    alpha = 1 - sigma if prediction_type == "flow" else math.sqrt(1 - sigma**2)
    fields = {"index": 0, "num_steps": 10, "evaluation": 0, "first_stage": True, "timestep": torch.tensor(500)}
    fields.update(kw)
    return Step(alpha=alpha, sigma=sigma, sample=sample, prediction_type=prediction_type, **fields)


def tensors(*shape, seed=0, n=3, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(*shape, generator=gen, dtype=dtype) for _ in range(n)]


# ---------------------------------------------------------------- §9.1-9.4 the update rule


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample", "flow"])
def test_eta_one_without_clip_or_momentum_is_cfg(prediction_type):
    x, cond, uncond = tensors(2, 4, 16, 16)
    step = make_step(x, 0.7, prediction_type)
    preds = {"cond": cond, "uncond": uncond}
    for w in (1.5, 4.0, 12.0):
        apg = APG(w, parallel_scale=1.0, norm_threshold=0.0, momentum=0.0).combine(preds, step)
        assert relative(apg, CFG(w).combine(preds, step)) < 1e-6


def test_scale_one_returns_the_conditional_prediction():
    x, cond, uncond = tensors(2, 4, 8, 8)
    for eta, r, beta in [(0.0, 0.0, 0.0), (0.5, 0.1, -0.5), (2.0, 5.0, -0.9)]:
        apg = APG(1.0, parallel_scale=eta, norm_threshold=r, momentum=beta)
        assert [b.name for b in apg.branches({}, make_step(x))] == ["cond"]  # one NFE per step, as CFG at w=1
        out = apg.combine({"cond": cond, "uncond": uncond}, make_step(x))
        torch.testing.assert_close(out, cond, rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(apg_x0(cond, cond - uncond, 1.0, eta, r), cond, rtol=0, atol=0)
        torch.testing.assert_close(apg.combine({"cond": cond}, make_step(x)), cond)


def test_projection_splits_the_update_into_parallel_and_orthogonal_parts():
    cond, update, _ = tensors(3, 4, 8, 8, seed=1)
    update = update + 0.7 * cond  # a real parallel component
    k = parallel_coefficient(update, cond)
    assert k.dtype == torch.float64 and k.shape == (3, 1, 1, 1)
    parallel = k * cond.double()
    orthogonal = update.double() - parallel
    torch.testing.assert_close(parallel + orthogonal, update.double())
    cos = (orthogonal * cond.double()).flatten(1).sum(1) / (norm(orthogonal) * norm(cond)).flatten()
    assert cos.abs().max() < 1e-7
    torch.testing.assert_close(parallel_coefficient(parallel.float(), cond), k, rtol=1e-6, atol=0)  # idempotent
    # the reference projection gives the same parts
    unit = cond.double() / norm(cond)
    torch.testing.assert_close(parallel, (update.double() * unit).flatten(1).sum(1).reshape(3, 1, 1, 1) * unit)


def test_update_orthogonal_to_cond_ignores_eta_and_parallel_update_with_eta_zero_gives_cond():
    cond, raw, _ = tensors(2, 4, 8, 8, seed=2)
    orthogonal = raw - parallel_coefficient(raw, cond).float() * cond
    outs = [apg_x0(cond, orthogonal, 6.0, eta, 0.0) for eta in (0.0, 0.5, 1.0, -1.0)]
    for out in outs[1:]:
        torch.testing.assert_close(out, outs[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(apg_x0(cond, 0.8 * cond, 6.0, 0.0, 0.0), cond, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("w,eta,r", [(7.5, 0.0, 0.0), (7.5, 0.0, 3.0), (15.0, 0.3, 1.0), (4.0, 1.0, 100.0)])
def test_apg_x0_matches_the_float64_listing(w, eta, r):
    for shape in [(2, 4, 16, 16), (2, 3, 2, 4, 4), (2, 7, 5)]:
        cond, update, _ = tensors(*shape, seed=3)
        out = apg_x0(cond, update, w, eta, r)
        assert out.dtype == torch.float32
        assert relative(out, listing(cond, update, w, eta, r)) < 1e-6


# ---------------------------------------------------------------- §9.5 the clip


def test_clip_is_a_no_op_below_the_threshold_and_bounds_the_norm_above():
    _, update, _ = tensors(4, 4, 8, 8, seed=4)
    norms = norm(update).flatten()
    r = float(norms.sort().values[1:3].mean())  # between the 2nd and 3rd norm: two samples on each side
    factor = clip_factor(update, r).flatten()
    below = norms <= r
    assert below.any() and (~below).any()
    assert (factor[below] == 1).all()
    clipped = clip_norm(update, r)
    torch.testing.assert_close(clipped[below], update[below], rtol=0, atol=0)
    assert (norm(clipped).flatten() <= r * (1 + 1e-6)).all()
    torch.testing.assert_close(norm(clipped).flatten()[~below], torch.full_like(norms[~below], r), rtol=1e-6, atol=0)
    assert (clip_factor(update, 0.0) == 1).all()


# ---------------------------------------------------------------- §9.6 momentum and resets


def test_momentum_uses_the_unclipped_running_sum_and_restarts_on_reset():
    x, c1, u1, c2, u2, c3, u3 = (torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(7))
    w, eta, r, beta = 5.0, 0.2, 0.5, -0.5  # r well below ||Delta||: clipped and un-clipped sums differ
    apg = APG(w, parallel_scale=eta, norm_threshold=r, momentum=beta)
    steps = [make_step(x, s, evaluation=i) for i, s in enumerate((0.9, 0.8, 0.7))]
    outs = [apg.combine({"cond": c, "uncond": u}, s) for (c, u), s in zip([(c1, u1), (c2, u2), (c3, u3)], steps)]

    x0 = [[s.to_x0(t) for t in pair] for s, pair in zip(steps, [(c1, u1), (c2, u2), (c3, u3)])]
    m1 = x0[0][0] - x0[0][1]
    m2 = x0[1][0] - x0[1][1] + beta * m1  # Delta_2 + beta * Delta_1 (un-clipped)
    m3 = x0[2][0] - x0[2][1] + beta * m2
    for out, step, (cond_x0, _), m in zip(outs, steps, x0, (m1, m2, m3)):
        expected = step.from_x0(listing(cond_x0, m, w, eta, r).float())
        assert relative(out, expected) < 1e-5
    assert norm(m1).min() > 2 * r

    apg.reset()
    again = apg.combine({"cond": c2, "uncond": u2}, steps[1])  # a new generation starts from Delta alone
    fresh = APG(w, parallel_scale=eta, norm_threshold=r, momentum=beta).combine({"cond": c2, "uncond": u2}, steps[1])
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)
    assert relative(outs[1], fresh) > 1e-3


def fake_model(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    shift = label.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * x + 0.3 * torch.sin(2 * x + shift) + 2e-4 * float(t) * (1 + shift)


class Spy(Guidance):
    """Test-local wrapper: records every evaluation's record, predictions and output of the rule it wraps."""

    required_branches = frozenset({"cond", "uncond"})

    def __init__(self, inner: Guidance) -> None:
        self.inner = inner
        self.calls: list = []

    def reset(self) -> None:
        self.inner.reset()

    def branches(self, preds, step):
        return self.inner.branches(preds, step)

    def combine(self, preds, step):
        out = self.inner.combine(preds, step)
        self.calls.append((step, dict(preds), out))
        return out


def heun_run(momentum_per: str, steps: int = 4):
    scheduler = HeunDiscreteScheduler()
    scheduler.set_timesteps(steps)
    labels = torch.tensor([0, 1])
    spy = Spy(APG(4.0, parallel_scale=0.1, norm_threshold=2.0, momentum=-0.5, momentum_per=momentum_per))
    denoise(
        model_fn=fake_model,
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        latents=torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(5)) * scheduler.init_noise_sigma,
        guidance=spy,
        conditioning=BranchConditioning({"cond": {"label": labels}, "uncond": {"label": labels + 2}}),
        num_inference_steps=steps,
    )
    return spy.calls


@pytest.mark.parametrize("momentum_per", ["step", "evaluation"])
def test_heun_momentum_advances_once_per_step_or_once_per_evaluation(momentum_per):
    steps = 4
    calls = heun_run(momentum_per, steps)
    assert len(calls) == 2 * steps - 1
    assert sum(step.first_stage for step, _, _ in calls) == steps  # Heun's last step is a single Euler stage
    advanced, committed, base = 0, None, None  # committed: the latest stored sum; base: what this step adds to
    for step, preds, out in calls:
        cond_x0 = step.to_x0(preds["cond"])
        delta = cond_x0 - step.to_x0(preds["uncond"])
        advancing = momentum_per == "evaluation" or step.first_stage
        if advancing:
            base = committed
        m = delta if base is None else delta - 0.5 * base
        if advancing:
            committed = m
            advanced += 1
        expected = step.from_x0(listing(cond_x0, m, 4.0, 0.1, 2.0).float())
        assert relative(out, expected) < 1e-5
    assert advanced == (steps if momentum_per == "step" else 2 * steps - 1)


def test_heun_momentum_modes_differ():
    step_mode = heun_run("step")
    evaluation_mode = heun_run("evaluation")
    assert relative(step_mode[-1][2], evaluation_mode[-1][2]) > 1e-4


# ---------------------------------------------------------------- pipeline: repeatability and batch independence


def tiny_pipeline() -> GuidedClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8,
        in_channels=1,
        out_channels=1,
        layers_per_block=1,
        block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8,
        num_class_embeds=3,  # classes 0, 1 and the null label 2
    ).eval()
    return GuidedClassConditionalPipeline(scheduler=DDIMScheduler(clip_sample=False), unet=unet, null_class_label=2)


def generate(pipe, labels, seeds, guidance):
    generators = [torch.Generator().manual_seed(s) for s in seeds]
    out = pipe(labels, guidance=guidance, num_inference_steps=6, generator=generators, output_type="latent")
    return out.images


def strong_apg() -> APG:
    return APG(6.0, parallel_scale=0.0, norm_threshold=0.05, momentum=-0.5)


def test_two_identical_pipeline_calls_give_identical_images():
    pipe = tiny_pipeline()
    first = generate(pipe, [0, 1], [1, 2], strong_apg())
    second = generate(pipe, [0, 1], [1, 2], strong_apg())
    torch.testing.assert_close(first, second, rtol=0, atol=0)
    rule = strong_apg()  # the same module object reused: its momentum must not leak into the next call
    torch.testing.assert_close(generate(pipe, [0, 1], [1, 2], rule), generate(pipe, [0, 1], [1, 2], rule), rtol=0,
                               atol=0)
    without_momentum = generate(pipe, [0, 1], [1, 2], APG(6.0, parallel_scale=0.0, norm_threshold=0.05, momentum=0.0))
    assert (first - without_momentum).abs().max() > 1e-5


def test_batch_equals_separate_runs_with_per_sample_generators():
    pipe = tiny_pipeline()
    labels, seeds = [0, 1, 1], [11, 12, 13]
    batch = generate(pipe, labels, seeds, strong_apg())
    for i in range(3):
        single = generate(pipe, [labels[i]], [seeds[i]], strong_apg())
        torch.testing.assert_close(batch[i : i + 1], single, rtol=1e-4, atol=1e-5)
    # perturbing one sample leaves the others unchanged: reductions are per sample
    x, cond, uncond = tensors(3, 4, 8, 8, seed=6)
    step = make_step(x)
    base = APG(5.0, norm_threshold=1.0).combine({"cond": cond, "uncond": uncond}, step)
    cond2 = cond.clone()
    cond2[1] *= 3
    moved = APG(5.0, norm_threshold=1.0).combine({"cond": cond2, "uncond": uncond}, step)
    torch.testing.assert_close(moved[[0, 2]], base[[0, 2]], rtol=0, atol=0)


# ---------------------------------------------------------------- §9.10 precision and degenerate inputs


@pytest.mark.parametrize("dtype,tol", [(torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
def test_half_precision_inputs_give_finite_outputs_close_to_float32(dtype, tol):
    x, cond, uncond = tensors(2, 4, 64, 64, seed=7)
    x, cond, uncond = 3 * x, 3 * cond, 3 * cond + 0.5 * uncond  # sum of squares far above fp16's 65,504
    apg = APG(7.5, parallel_scale=0.0, norm_threshold=40.0, momentum=-0.5)
    step16 = make_step(x.to(dtype), 0.5)
    out = apg.combine({"cond": cond.to(dtype), "uncond": uncond.to(dtype)}, step16)
    assert out.dtype == dtype and torch.isfinite(out).all()
    apg.reset()
    reference = apg.combine({"cond": cond.to(dtype).float(), "uncond": uncond.to(dtype).float()},
                            make_step(x.to(dtype).float(), 0.5))
    assert relative(out, reference) < tol
    assert apg_x0(cond.to(dtype), (cond - uncond).to(dtype), 7.5, 0.0, 40.0).dtype == dtype


def test_zero_cond_and_zero_update_give_no_nan():
    zero, update, _ = tensors(2, 4, 8, 8, seed=8)
    zero = torch.zeros_like(zero)
    out = apg_x0(zero, update, 5.0, 0.0, 1.0)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, 4.0 * clip_norm(update, 1.0))  # no direction to project on: all orthogonal
    cond = torch.randn(2, 4, 8, 8)
    torch.testing.assert_close(apg_x0(cond, torch.zeros_like(cond), 5.0, 0.0, 1.0), cond, rtol=0, atol=0)
    x = torch.randn(2, 4, 8, 8)
    step = make_step(x, 0.5, "sample")
    out = APG(5.0, momentum=-0.5).combine({"cond": cond, "uncond": cond.clone()}, step)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, cond)


# ---------------------------------------------------------------- §9.9 the space matters


def test_x0_space_apg_differs_from_epsilon_space_apg_except_when_it_is_cfg():
    x, cond, uncond = tensors(2, 4, 16, 16, seed=9)
    step = make_step(x, 0.6, "epsilon")
    as_x0 = replace(step, prediction_type="sample")  # treats the epsilon outputs as if they were x0: the common mistake
    preds = {"cond": cond, "uncond": uncond}
    ours = APG(7.5, parallel_scale=0.0, norm_threshold=0.0, momentum=0.0).combine(preds, step)
    on_epsilon = APG(7.5, parallel_scale=0.0, norm_threshold=0.0, momentum=0.0).combine(preds, as_x0)
    assert relative(on_epsilon, ours) > 1e-2
    cfg_like = [APG(7.5, parallel_scale=1.0, norm_threshold=0.0, momentum=0.0).combine(preds, s) for s in (step, as_x0)]
    assert relative(cfg_like[0], cfg_like[1]) < 1e-6


# ---------------------------------------------------------------- §3 the identities with diffusers


def feed_diffusers(x0s, w, eta, r, beta, original):
    buffer = MomentumBuffer(beta) if beta else None
    return [normalized_guidance(c, u, w, buffer, eta, r, original) for c, u in x0s]


def feed_ours(apg, x0s):
    x = torch.zeros_like(x0s[0][0])
    return [apg.combine({"cond": c, "uncond": u}, make_step(x, s, "sample"))
            for (c, u), s in zip(x0s, (0.9, 0.7, 0.5))]


X0S = [tuple(tensors(2, 4, 16, 16, seed=10 + i, n=2)) for i in range(3)]


@pytest.mark.parametrize("w,eta,r,beta", [(5.0, 0.0, 0.0, 0.0), (5.0, 0.0, 15.0, -0.5), (7.5, 0.4, 3.0, -0.5),
                                          (2.0, 1.0, 1.0, -0.75)])
def test_diffusers_original_formulation_at_w_is_ours_at_w_plus_one(w, eta, r, beta):
    theirs = feed_diffusers(X0S, w, eta, r, beta, original=True)
    ours = feed_ours(APG(w + 1, parallel_scale=eta, norm_threshold=r, momentum=beta), X0S)
    ours_via_adapter = feed_ours(APG.from_diffusers(w, eta, r, beta or None, use_original_formulation=True), X0S)
    for a, b, c in zip(ours, theirs, ours_via_adapter):
        assert relative(a, b) < 1e-6
        torch.testing.assert_close(a, c, rtol=0, atol=0)
    if r:
        assert norm(X0S[0][0] - X0S[0][1]).min() > r  # the clip is active


@pytest.mark.parametrize("w,eta", [(5.0, 0.0), (5.0, 1.0), (7.5, 0.5), (3.0, -0.5)])
def test_diffusers_default_formulation_maps_to_ours_with_eta_prime(w, eta):
    (c, u), = X0S[:1]
    theirs = normalized_guidance(c, u, w, None, eta, 0.0, False)
    adapted = APG.from_diffusers(w, eta)
    assert adapted.parallel_scale == pytest.approx((w * eta - 1) / (w - 1))
    ours = feed_ours(adapted, [(c, u)])[0]
    assert relative(ours, theirs) < 1e-6
    if eta == 0.0:  # diffusers' eta=0 pushes against the parallel part: not our eta=0
        ours_zero = APG(w, parallel_scale=0.0, norm_threshold=0.0, momentum=0.0)
        assert relative(feed_ours(ours_zero, [(c, u)])[0], theirs) > 1e-2


def test_diffusers_guider_object_agrees_at_scale_one_and_above():
    (c, u), = X0S[:1]
    for w in (1.0, 4.0):
        guider = AdaptiveProjectedGuidance(guidance_scale=w, adaptive_projected_guidance_rescale=0.0, eta=0.3)
        guider.set_state(step=0, num_inference_steps=10, timestep=torch.tensor(500))
        theirs = guider.forward(c, u).pred  # at w = 1 the guider returns pred_cond
        ours = feed_ours(APG.from_diffusers(w, 0.3), [(c, u)])[0]
        assert relative(ours, theirs) < 1e-6


def test_from_diffusers_refuses_the_default_formulation_with_clip_or_momentum():
    with pytest.raises(ValueError, match="use_original_formulation"):
        APG.from_diffusers(7.5, eta=1.0, norm_threshold=15.0)
    with pytest.raises(ValueError, match="use_original_formulation"):
        APG.from_diffusers(7.5, eta=1.0, momentum=-0.5)


# ---------------------------------------------------------------- the default norm threshold


def test_default_threshold_scales_sdxl_r_with_the_square_root_of_the_sample_size():
    apg = APG()
    assert apg.threshold_for(torch.zeros(1, 4, 128, 128)) == pytest.approx(15.0)
    assert apg.threshold_for(torch.zeros(1, 4, 64, 64)) == pytest.approx(7.5)
    assert apg.threshold_for(torch.zeros(1, 1, 8, 8)) == pytest.approx(15.0 * math.sqrt(64 / 65536))
    assert APG(norm_threshold=3.0).threshold_for(torch.zeros(1, 4, 64, 64)) == 3.0
