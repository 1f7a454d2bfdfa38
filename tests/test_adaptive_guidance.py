"""Adaptive Guidance and LinearAG (Castillo et al., arXiv 2312.12487): spec ``methods/adaptive_guidance.md`` §8.

References are independent of the code under test: a scripted x0-prediction mock whose per-sample cosine between the
conditional and unconditional predictions is set by the test, model wrappers that count and inspect every row the
network sees, plain CFG runs, closed-form VP conversions written here, and least squares with known coefficients.
"""

from __future__ import annotations

import json
import math
import re
from functools import partial

import pytest
import torch
from safetensors.torch import save_file
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, EulerDiscreteScheduler, HeunDiscreteScheduler

from guidance import APG, CFG, AdaptiveGuidance, Guidance, LinearAG, from_config, get_guidance
from guidance.ag_calibration import (
    calibrate_threshold, mean_guided_fraction, propose_threshold, record_gammas, switch_steps, target_step,
)
from guidance.adaptive import cosine_per_sample
from guidance.base import Step
from guidance.linear_ag_fit import LinearAGCoefficients, fit_affine, fit_linear_ag, relative_residual
from pipelines import GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline
from pipelines.common import pipeline_guidance
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tiny import tiny_sd_components, tiny_sdxl_components

T = 10
DIM = 16
SCALE = 3.0


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models run fastest on one thread; two threads on a loaded 2-core machine stall in OpenMP barriers."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# -- a scripted model ---------------------------------------------------------------------------------------------
class ScriptedX0Model:
    """x0-prediction mock: ``cos(x0_c, x0_u)`` of sample i at timestep t is exactly ``gamma(i, t)``.

    The condition label carries the sample index (``i`` for ``cond``, ``-1 - i`` for ``uncond``), so the mock knows
    which sample every row belongs to even when only some rows are evaluated. Outputs are positive, x-dependent
    multiples of orthonormal per-sample directions, so the trajectory depends on the guidance while gamma stays
    scripted. Every call's labels are recorded.
    """

    def __init__(self, gamma, batch: int, dim: int = DIM) -> None:
        generator = torch.Generator().manual_seed(1)
        basis, _ = torch.linalg.qr(torch.randn(batch, dim, 2, generator=generator, dtype=torch.float64))
        self.a, self.b = basis[..., 0], basis[..., 1]
        self.gamma = gamma
        self.calls: list[torch.Tensor] = []

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
        self.calls.append(class_labels.clone())
        out = []
        for row, label in zip(x, class_labels.tolist()):
            i = label if label >= 0 else -1 - label
            if label >= 0:
                out.append((1.5 + torch.tanh(row.mean())) * self.a[i])
            else:
                g = self.gamma(i, float(t))
                direction = g * self.a[i] + math.sqrt(max(1 - g * g, 0.0)) * self.b[i]
                out.append((1.2 + 0.5 * torch.tanh(row.sum())) * direction)
        return torch.stack(out).to(x.dtype)

    def rows_per_call(self) -> list[tuple[int, int]]:
        """(cond rows, uncond rows) of every call."""
        return [(int((c >= 0).sum()), int((c < 0).sum())) for c in self.calls]


def conditioning(batch: int) -> BranchConditioning:
    labels = torch.arange(batch)
    return BranchConditioning({"cond": {"class_labels": labels}, "uncond": {"class_labels": -1 - labels}})


def make_scheduler(kind: str = "ddim", steps: int = T):
    common = {"prediction_type": "sample"}
    scheduler = {
        "ddim": lambda: DDIMScheduler(clip_sample=False, **common),
        "heun": lambda: HeunDiscreteScheduler(**common),
    }[kind]()
    scheduler.set_timesteps(steps)
    return scheduler


def run_scripted(guidance, script, batch: int = 2, kind: str = "ddim", steps: int = T, seed: int = 0):
    """Sample with the scripted model; ``script[i][k]`` is gamma of sample i at step k (DDIM) or a ``gamma(i, t)``."""
    scheduler = make_scheduler(kind, steps)
    if callable(script):
        gamma = script
    else:
        step_of = {float(t): k for k, t in enumerate(scheduler.timesteps)}
        gamma = lambda i, t: script[i][step_of[t]]  # noqa: E731
    model = ScriptedX0Model(gamma, batch)
    latents = torch.randn(batch, DIM, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    trajectory: list[torch.Tensor] = []

    def record(i, t, current):
        trajectory.append(current.clone())
        return current

    result = denoise(
        model_fn=model, scheduler=scheduler, timesteps=scheduler.timesteps,
        latents=latents * scheduler.init_noise_sigma, guidance=guidance, conditioning=conditioning(batch),
        num_inference_steps=steps, on_step_end=record,
    )
    return result, model, trajectory


def crossing_at(k: int, after: float = 0.99, before: float = 0.5, steps: int = T) -> list[float]:
    return [before] * k + [after] * (steps - k)


class Spy(AdaptiveGuidance):
    """Records every guided output together with the branch predictions it came from."""

    def reset(self) -> None:
        super().reset()
        self.outputs: list[tuple[dict[str, torch.Tensor], torch.Tensor]] = []

    def combine(self, preds, step):
        out = super().combine(preds, step)
        self.outputs.append(({k: v.clone() for k, v in preds.items()}, out.clone()))
        return out


# -- the statistic ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", [(3, 4, 5, 6), (3, 7, 9), (3, 2, 3, 4, 5)])
def test_cosine_is_per_sample_over_all_non_batch_dims(shape):
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    flat_a, flat_b = a.reshape(3, -1), b.reshape(3, -1)
    reference = (flat_a * flat_b).sum(1) / (flat_a.norm(dim=1) * flat_b.norm(dim=1))
    torch.testing.assert_close(cosine_per_sample(a, b), reference, rtol=1e-12, atol=1e-12)
    scales = torch.tensor([0.1, 3.0, 70.0], dtype=torch.float64).view(3, *[1] * (len(shape) - 1))
    torch.testing.assert_close(cosine_per_sample(a * scales, b / scales), reference, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(cosine_per_sample(a, a), torch.ones(3, dtype=torch.float64), rtol=1e-12, atol=1e-12)
    changed = b.clone()
    changed[2] = -changed[2] + 1
    torch.testing.assert_close(cosine_per_sample(a, changed)[:2], reference[:2], rtol=0, atol=0)


def test_cosine_of_half_precision_inputs_is_reduced_in_float32():
    a = torch.randn(2, 4, 128, 128)
    b = a + 0.05 * torch.randn_like(a)
    gamma = cosine_per_sample(a.half(), b.half())
    assert gamma.dtype == torch.float32
    reference = cosine_per_sample(a.half().double(), b.half().double())
    torch.testing.assert_close(gamma.double(), reference, rtol=0, atol=1e-5)


def vp_step(x: torch.Tensor, alpha: float, prediction_type: str = "epsilon") -> Step:
    sigma = math.sqrt(1 - alpha * alpha)
    return Step(
        index=0, num_steps=T, evaluation=0, first_stage=True, timestep=torch.tensor(900), alpha=alpha, sigma=sigma,
        sample=x, prediction_type=prediction_type,
    )


def test_x0_space_differs_from_epsilon_space_on_a_vp_schedule():
    """At alpha = 0.3, eps_c and eps_u are nearly parallel (both ~ noise) while the x0 predictions are not."""
    generator = torch.Generator().manual_seed(3)
    x0_c = torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    x0_u = x0_c + 0.5 * torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    alpha = 0.3
    sigma = math.sqrt(1 - alpha**2)
    x = alpha * x0_c + sigma * torch.randn(2, 4, 8, 8, generator=generator, dtype=torch.float64)
    eps_c, eps_u = (x - alpha * x0_c) / sigma, (x - alpha * x0_u) / sigma  # closed-form VP inverse
    cos_eps, cos_x0 = cosine_per_sample(eps_c, eps_u), cosine_per_sample(x0_c, x0_u)
    assert (cos_eps > 0.98).all() and (cos_x0 < 0.93).all()

    step = vp_step(x, alpha)
    preds = {"cond": eps_c, "uncond": eps_u}
    in_x0 = AdaptiveGuidance(CFG(SCALE), threshold=0.95)
    in_output = AdaptiveGuidance(CFG(SCALE), threshold=0.95, space="output")
    for rule in (in_x0, in_output):
        rule.reset()
        rule.branches({}, step)
        rule.combine(preds, step)
    torch.testing.assert_close(in_x0.gamma_history[0], cos_x0, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(in_output.gamma_history[0], cos_eps, rtol=1e-10, atol=1e-12)
    assert in_x0.switch_step is None and in_output.switch_step == 0


def test_undefined_x0_at_alpha_zero_is_not_measured():
    rule = AdaptiveGuidance(CFG(SCALE), threshold=0.1)
    rule.reset()
    step = vp_step(torch.randn(2, 3), 0.0)
    out = rule.combine({"cond": torch.ones(2, 3), "uncond": torch.ones(2, 3)}, step)
    assert torch.isfinite(out).all() and torch.isnan(rule.gamma_history[0]).all() and rule.switch_step is None


# -- the switch ---------------------------------------------------------------------------------------------------
def test_never_switching_equals_cfg_bit_for_bit():
    script = [[0.999] * T, [0.9999] * T]
    cfg, _, cfg_traj = run_scripted(CFG(SCALE), script)
    rule = AdaptiveGuidance(CFG(SCALE), threshold=1.0)
    ag, model, ag_traj = run_scripted(rule, script)
    assert torch.equal(ag.latents, cfg.latents)
    assert all(torch.equal(a, c) for a, c in zip(ag_traj, cfg_traj))
    assert sum(c.numel() for c in model.calls) / 2 == 2 * T == ag.nfe
    assert rule.switch_step is None
    torch.testing.assert_close(torch.stack(rule.gamma_history, 1), torch.tensor(script, dtype=torch.float64))


@pytest.mark.parametrize("k", [0, 3, T - 2])
def test_switch_after_step_k_costs_t_plus_k_plus_1_and_matches_cfg_until_then(k):
    script = [crossing_at(k), crossing_at(k - 1 if k else 0)]  # "all": the batch waits for sample 0
    cfg, _, cfg_traj = run_scripted(CFG(SCALE), script)
    rule = Spy(CFG(SCALE), threshold=0.9, reduce="all")
    ag, model, ag_traj = run_scripted(rule, script)
    counted = sum(c.numel() for c in model.calls)
    assert counted == 2 * (T + k + 1) and ag.nfe == T + k + 1 and ag.nfe_per_sample == [T + k + 1] * 2
    assert rule.switch_step == k and rule.sample_switch_steps == [k, k]
    for step in range(k + 1):  # guided steps: CFG's trajectory bit for bit
        assert torch.equal(ag_traj[step], cfg_traj[step])
    assert not torch.equal(ag.latents, cfg.latents)
    for index, (preds, out) in enumerate(rule.outputs):
        if index <= k:
            expected = preds["uncond"] + SCALE * (preds["cond"] - preds["uncond"])
            assert torch.equal(out, expected)
        else:
            assert "uncond" not in preds and torch.equal(out, preds["cond"])
    assert model.rows_per_call() == [(2, 2)] * (k + 1) + [(2, 0)] * (T - k - 1)


def test_latch_never_asks_for_the_null_condition_again():
    k = 4
    script = [[0.5] * k + [0.99] + [0.0] * (T - k - 1)] * 2  # gamma collapses right after the switch
    rule = AdaptiveGuidance(CFG(SCALE), threshold=0.9)
    result, model, _ = run_scripted(rule, script)
    assert all((c >= 0).all() for c in model.calls[k + 1:])
    assert result.nfe == T + k + 1 and rule.switch_step == k


def test_prompt_equal_to_negative_switches_after_step_zero():
    rule = AdaptiveGuidance(CFG(SCALE), threshold=0.999)
    result, _, _ = run_scripted(rule, [[1.0] * T] * 2)
    assert rule.switch_step == 0 and result.nfe == T + 1


def test_all_waits_for_the_slowest_sample_and_per_sample_evaluates_only_needed_rows():
    script = [crossing_at(2), crossing_at(5)]
    together = AdaptiveGuidance(CFG(SCALE), threshold=0.9, reduce="all")
    all_result, _, _ = run_scripted(together, script)
    assert together.switch_step == 5 and all_result.nfe_per_sample == [T + 6, T + 6]

    alone = Spy(CFG(SCALE), threshold=0.9)  # the default: reduce="per-sample"
    result, model, _ = run_scripted(alone, script)
    assert alone.sample_switch_steps == [2, 5] and alone.switch_step == 5
    assert result.nfe_per_sample == [T + 3, T + 6] and result.nfe == (2 * T + 9) / 2
    assert model.rows_per_call() == [(2, 2)] * 3 + [(2, 1)] * 3 + [(2, 0)] * (T - 6)
    assert all(c[c < 0].tolist() == [-2] for c in model.calls[3:6])  # only sample 1's null row
    for preds, out in alone.outputs[3:6]:  # sample 0 conditional-only, sample 1 still CFG
        assert torch.equal(out[0], preds["cond"][0])
        assert torch.equal(out[1], preds["uncond"][1] + SCALE * (preds["cond"][1] - preds["uncond"][1]))
        assert torch.equal(preds["uncond"][0], preds["cond"][0])  # the row not evaluated holds the cond prediction

    changed = [crossing_at(2), crossing_at(7)]
    other = AdaptiveGuidance(CFG(SCALE), threshold=0.9, reduce="per-sample")
    run_scripted(other, changed)
    assert other.sample_switch_steps[0] == 2  # sample 0's gamma and latch do not depend on sample 1


def test_per_sample_switch_keeps_apg_momentum_per_row():
    """Sample 1 keeps full APG (with momentum) until its own switch, as in an APG-only run of the same batch."""
    script = [crossing_at(1), crossing_at(6)]
    base = dict(guidance_scale=SCALE, norm_threshold=0.5, momentum=-0.5)
    _, _, apg_traj = run_scripted(APG(**base), script)
    rule = AdaptiveGuidance(APG(**base), threshold=0.9, reduce="per-sample")
    _, _, ag_traj = run_scripted(rule, script)
    assert rule.sample_switch_steps == [1, 6]
    for step in range(7):
        torch.testing.assert_close(ag_traj[step][1], apg_traj[step][1], rtol=0, atol=1e-12)
    assert not torch.allclose(ag_traj[3][0], apg_traj[3][0])


def test_heun_changes_policy_only_between_completed_steps():
    """gamma = 1 - t/1000 crosses between the two evaluations of a Heun step; the switch waits for the next step."""
    steps = 6
    scheduler = make_scheduler("heun", steps)
    first_stage_t = scheduler.timesteps[::2].tolist()  # evaluation 2k is the first stage of step k
    second_stage_t = scheduler.timesteps[1::2].tolist()  # evaluation 2k+1 is the second stage of step k
    k = 2
    threshold = 1 - (first_stage_t[k] + second_stage_t[k]) / 2000  # crossed at step k's 2nd stage, not its 1st
    rule = AdaptiveGuidance(CFG(SCALE), threshold=threshold)
    result, model, _ = run_scripted(rule, lambda i, t: 1 - t / 1000, kind="heun", steps=steps)
    assert len(model.calls) == 2 * steps - 1
    by_step: dict[int, set] = {}
    for entry in result.trace:
        by_step.setdefault(entry["step"], set()).add(tuple(sorted(entry["branches"].items())))
    assert all(len(policies) == 1 for policies in by_step.values())
    assert rule.switch_step == k + 1  # seen at step k+1's first stage (same sigma as step k's 2nd stage)
    guided_evaluations = 2 * (k + 2)
    assert result.nfe == guided_evaluations * 2 + (2 * steps - 1 - guided_evaluations)
    assert model.rows_per_call()[: guided_evaluations] == [(2, 2)] * guided_evaluations
    assert len(rule.gamma_history) == k + 2


def test_state_resets_between_calls():
    rule = AdaptiveGuidance(CFG(SCALE), threshold=0.9, reduce="per-sample")
    script = [crossing_at(2), crossing_at(5)]
    first, _, _ = run_scripted(rule, script)
    history = [g.clone() for g in rule.gamma_history]
    second, _, _ = run_scripted(rule, script)
    assert torch.equal(first.latents, second.latents) and first.nfe_per_sample == second.nfe_per_sample
    assert first.trace == second.trace and len(rule.gamma_history) == len(history)
    torch.testing.assert_close(torch.stack(history), torch.stack(rule.gamma_history), rtol=0, atol=0, equal_nan=True)


# -- configuration and bad input ----------------------------------------------------------------------------------
def test_config_round_trips_and_names_build_the_base():
    rule = AdaptiveGuidance(APG(5.0, parallel_scale=0.2, momentum=-0.3), threshold=0.95, space="output",
                            reduce="per-sample")
    config = rule.config()
    assert config["base"]["name"] == "apg" and config["guidance_scale"] == 5.0
    rebuilt = from_config(json.loads(json.dumps(config)))
    assert isinstance(rebuilt, AdaptiveGuidance) and rebuilt.config() == config
    by_name = get_guidance("ag", guidance_scale=6.0, threshold=0.98)
    assert by_name.base.config() == CFG(6.0).config()
    assert pipeline_guidance("ag", 4.0).base.guidance_scale == 4.0
    assert AdaptiveGuidance({"name": "apg", "guidance_scale": 3.0}).base.config() == APG(3.0).config()


@pytest.mark.parametrize(
    "kwargs, error",
    [
        ({"threshold": 0.0}, ValueError),
        ({"threshold": -0.5}, ValueError),
        ({"threshold": 1.0001}, ValueError),
        ({"threshold": float("nan")}, ValueError),
        ({"threshold": "0.9"}, TypeError),
        ({"space": "eps"}, ValueError),
        ({"reduce": "mean"}, ValueError),
        ({"record_only": 1}, TypeError),
        ({"base": Guidance()}, ValueError),
        ({"base": CFG(4.0), "guidance_scale": 5.0}, ValueError),
        ({"base": "nope"}, ValueError),
    ],
)
def test_bad_input_is_refused(kwargs, error):
    with pytest.raises(error):
        AdaptiveGuidance(**kwargs)


# -- calibration helper -------------------------------------------------------------------------------------------
def calibration_curves():
    generator = torch.Generator().manual_seed(5)
    curves = torch.sort(torch.rand(5, T, generator=generator, dtype=torch.float64) * 0.2 + 0.8, dim=1).values
    return curves, [lambda g, c=curve: run_scripted(g, [c.tolist()], batch=1) for curve in curves]


def test_calibration_quantile_target_switches_the_median_sample_at_the_target_step():
    curves, runs = calibration_curves()
    calibration = calibrate_threshold(runs, base=CFG(SCALE), fraction=0.5, target="quantile")
    gammas = record_gammas(runs, base=CFG(SCALE))
    torch.testing.assert_close(gammas, curves, rtol=0, atol=1e-12)
    assert calibration.target_step == target_step(T, 0.5) == 4
    assert calibration.threshold == pytest.approx(float(curves[:, 4].median()))
    median_curve = curves[int(curves[:, 4].argsort()[2])]
    rule = AdaptiveGuidance(CFG(SCALE), threshold=calibration.threshold)
    result, _, _ = run_scripted(rule, [median_curve.tolist()], batch=1)
    assert rule.switch_step == 4 and result.nfe == T + 5
    predicted = switch_steps(gammas, calibration.threshold)
    assert predicted.tolist() == calibration.switch_steps.tolist()
    assert sorted(predicted.tolist())[2] == 4  # the median sample switches at the target step
    assert switch_steps(torch.tensor([[0.1, 0.99, 0.2]]), 0.999).tolist() == [2]  # never: costs like T - 1
    assert propose_threshold(torch.full((2, T), -0.5, dtype=torch.float64), target="quantile") > 0  # in (0, 1]


@pytest.mark.parametrize("fraction", [0.3, 0.5, 0.7])
def test_calibration_mean_target_meets_the_nfe_budget_on_average(fraction):
    curves, runs = calibration_curves()
    calibration = calibrate_threshold(runs, base=CFG(SCALE), fraction=fraction)
    nfes = []
    for curve in curves:  # each calibration sample generated alone with the proposed threshold
        result, _, _ = run_scripted(AdaptiveGuidance(CFG(SCALE), threshold=calibration.threshold), [curve.tolist()], batch=1)
        nfes.append(result.nfe)
    mean_guided = (sum(nfes) / len(nfes) - T) / T
    assert mean_guided <= fraction and calibration.mean_nfe_fraction == pytest.approx((1 + mean_guided) / 2)
    larger = curves[curves > calibration.threshold]  # the next observed gamma would overshoot the budget
    if larger.numel():
        assert mean_guided_fraction(curves, float(larger.min())) > fraction


# -- LinearAG -----------------------------------------------------------------------------------------------------
def test_ols_recovers_known_coefficients():
    generator = torch.Generator().manual_seed(2)
    base = torch.randn(64, 4, 8, 8, generator=generator, dtype=torch.float64)
    columns = [base + 0.3 * torch.randn(base.shape, generator=generator, dtype=torch.float64) for _ in range(5)]
    truth = torch.tensor([0.7, -1.3, 2.1, 0.05, -0.4], dtype=torch.float64)
    target = sum(w * c for w, c in zip(truth, columns))
    fitted = fit_affine(columns, target)
    assert fitted.dtype == torch.float64 and (fitted - truth).abs().max() < 1e-8
    assert relative_residual(fitted, columns, target) < 1e-12


class AffineUncondModel:
    """epsilon model whose unconditional output is exactly ``a(t) * cond`` (``a`` depends on t only)."""

    def __init__(self, batch: int, dim: int = DIM) -> None:
        generator = torch.Generator().manual_seed(4)
        self.weight = torch.randn(dim, dim, generator=generator, dtype=torch.float64) / 4
        self.shift = torch.randn(batch, dim, generator=generator, dtype=torch.float64)
        self.rows = 0

    @staticmethod
    def factor(t: float) -> float:
        return 0.3 + t / 1500

    def __call__(self, x, t, class_labels):
        self.rows += x.shape[0]
        index = torch.where(class_labels >= 0, class_labels, -1 - class_labels)
        cond = torch.tanh(x @ self.weight + self.shift[index] + float(t) / 1000)
        return torch.where((class_labels < 0)[:, None], self.factor(float(t)) * cond, cond)


def affine_run(
    batch: int = 4, steps: int = T, seed: int = 0, spacing: str = "leading", dim: int = DIM, model=None,
    scheduler_cls=DDIMScheduler,
):
    """A pipeline-like run: ``run(guidance)`` samples ``batch`` vectors with the affine model."""

    def run(guidance):
        options = {"clip_sample": False} if scheduler_cls is DDIMScheduler else {}
        scheduler = scheduler_cls(timestep_spacing=spacing, **options)
        scheduler.set_timesteps(steps)
        net = AffineUncondModel(batch, dim) if model is None else model
        latents = torch.randn(batch, dim, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        result = denoise(
            model_fn=net, scheduler=scheduler, timesteps=scheduler.timesteps,
            latents=latents * scheduler.init_noise_sigma, guidance=guidance,
            conditioning=conditioning(batch), num_inference_steps=steps,
        )
        return result, net, scheduler

    return run


def fitted_affine(history: int = 0, steps=(1, 3, 5), **kwargs) -> LinearAGCoefficients:
    return fit_linear_ag(
        [affine_run(seed=1), affine_run(seed=2)], steps=list(steps), model_id="affine", scheduler="DDIMScheduler",
        base=CFG(SCALE), history=history, held_out=affine_run(seed=3), **kwargs,
    )


def test_fit_recovers_the_affine_unconditional_model():
    fitted = fitted_affine(history=0)
    _, _, scheduler = affine_run()(CFG(SCALE))
    truth = torch.tensor([[AffineUncondModel.factor(float(scheduler.timesteps[k]))] for k in (1, 3, 5)], dtype=torch.float64)
    assert fitted.evaluations == [1, 3, 5]
    assert (fitted.coefficients - truth).abs().max() < 1e-10
    assert max(fitted.metadata["held_out_relative_residual"]) < 1e-12


def test_oracle_linear_ag_equals_cfg_and_saves_the_designated_evaluations(tmp_path):
    fitted = fitted_affine(history=1, use_sample=True, intercept=True)
    oracle = fitted.coefficients.clone().zero_()
    oracle[:, 0] = torch.tensor([AffineUncondModel.factor(t) for t in fitted_timesteps(fitted)], dtype=torch.float64)
    path = tmp_path / "oracle.safetensors"
    LinearAGCoefficients(oracle, fitted.evaluations, fitted.metadata).save(path)
    rule = LinearAG(path, model_id="affine", scheduler="DDIMScheduler", threshold=1.0)
    cfg, _, _ = affine_run(seed=7)(CFG(SCALE))
    lag, model, _ = affine_run(seed=7)(rule)
    assert rule.switch_step is None
    torch.testing.assert_close(lag.latents, cfg.latents, rtol=0, atol=1e-12)
    assert lag.nfe == 2 * T - 3 == model.rows / 4
    fitted_rule = LinearAG(fitted, model_id="affine", scheduler="DDIMScheduler", threshold=1.0)
    torch.testing.assert_close(affine_run(seed=7)(fitted_rule)[0].latents, cfg.latents, rtol=0, atol=1e-9)


def test_oracle_linear_ag_per_sample_equals_per_sample_ag():
    """Per-sample switches (some before the last designated step): estimates only for samples still guided."""
    fitted = fitted_affine(history=1)
    oracle = fitted.coefficients.clone().zero_()
    oracle[:, 0] = torch.tensor([AffineUncondModel.factor(t) for t in fitted_timesteps(fitted)], dtype=torch.float64)
    coefficients = LinearAGCoefficients(oracle, fitted.evaluations, fitted.metadata)
    gammas = record_gammas(affine_run(seed=7), base=CFG(SCALE))
    values = gammas[:, 4].sort().values
    threshold = float(values[1:3].mean())  # two samples reach it by step 4, two later
    expected = switch_steps(gammas, threshold).tolist()
    assert min(expected) <= 4 < 5 <= max(expected)  # designated step 5 is estimated for some samples only
    ag_rule = AdaptiveGuidance(CFG(SCALE), threshold=threshold, reduce="per-sample")
    ag, _, _ = affine_run(seed=7)(ag_rule)
    rule = LinearAG(coefficients, model_id="affine", scheduler="DDIMScheduler", threshold=threshold, reduce="per-sample")
    lag, _, _ = affine_run(seed=7)(rule)
    assert ag_rule.sample_switch_steps == rule.sample_switch_steps == expected
    torch.testing.assert_close(lag.latents, ag.latents, rtol=0, atol=1e-12)
    saved = [sum(1 for d in (1, 3, 5) if d <= k) for k in expected]
    assert lag.nfe_per_sample == [n - s for n, s in zip(ag.nfe_per_sample, saved)]


def test_linear_ag_on_heun_estimates_both_evaluations_of_a_designated_step():
    heun = dict(scheduler_cls=HeunDiscreteScheduler, steps=6)
    fitted = fit_linear_ag(
        [affine_run(seed=1, **heun)], steps=[2], model_id="affine", scheduler="HeunDiscreteScheduler",
        base=CFG(SCALE), history=0,
    )
    assert fitted.evaluations == [4, 5]  # step 2 = evaluations 4 (first stage) and 5 (second stage)
    truth = torch.tensor([[AffineUncondModel.factor(t)] for t in fitted_timesteps(fitted)], dtype=torch.float64)
    assert (fitted.coefficients - truth).abs().max() < 1e-10
    cfg, _, _ = affine_run(seed=7, **heun)(CFG(SCALE))
    rule = LinearAG(fitted, model_id="affine", scheduler="HeunDiscreteScheduler", threshold=1.0)
    lag, model, _ = affine_run(seed=7, **heun)(rule)
    assert lag.nfe == 2 * (2 * 6 - 1) - 2 == model.rows / 4
    torch.testing.assert_close(lag.latents, cfg.latents, rtol=0, atol=1e-10)


def fitted_timesteps(fitted: LinearAGCoefficients) -> list[float]:
    return [fitted.metadata["evaluations_meta"][e]["timestep"] for e in fitted.evaluations]


def test_linear_ag_switches_to_conditional_only_after_the_ag_threshold():
    fitted = fitted_affine(history=1)
    gammas = record_gammas(affine_run(seed=7), base=CFG(SCALE))
    k = 7  # a threshold halfway between the batch's lowest gamma at steps k-1 and k switches after step k
    threshold = float(gammas[:, k - 1 : k + 1].min(dim=0).values.mean())
    assert switch_steps(gammas, threshold, reduce="all").tolist() == [k] * 4
    reference = AdaptiveGuidance(CFG(SCALE), threshold=threshold, reduce="all")
    ag, _, _ = affine_run(seed=7)(reference)
    rule = LinearAG(fitted, model_id="affine", scheduler="DDIMScheduler", threshold=threshold, reduce="all")
    lag, model, _ = affine_run(seed=7)(rule)
    assert reference.switch_step == rule.switch_step == k
    assert ag.nfe == T + k + 1 and lag.nfe == T + k + 1 - 3 == model.rows / 4


def test_mismatched_metadata_is_refused(tmp_path):
    fitted = fitted_affine(history=1)
    path = tmp_path / "coefficients.safetensors"
    fitted.save(path)
    loaded = LinearAGCoefficients.load(path)
    assert loaded.evaluations == fitted.evaluations and loaded.metadata == json.loads(json.dumps(fitted.metadata))
    torch.testing.assert_close(loaded.coefficients, fitted.coefficients, rtol=0, atol=0)
    with pytest.raises(ValueError, match="model_id"):
        LinearAG(path, model_id="other", scheduler="DDIMScheduler")
    with pytest.raises(ValueError, match="scheduler"):
        LinearAG(path, model_id="affine", scheduler=EulerDiscreteScheduler())
    with pytest.raises(ValueError, match="base"):
        LinearAG(path, model_id="affine", scheduler="DDIMScheduler", base=CFG(SCALE + 1))
    rule = LinearAG(path, model_id="affine", scheduler="DDIMScheduler")
    assert from_config(json.loads(json.dumps(rule.config()))).config() == rule.config()
    mismatches = {
        "num_inference_steps": {"steps": T + 2},
        "timestep": {"spacing": "trailing"},
        "sample_shape": {"dim": DIM + 1},
    }
    for field, change in mismatches.items():
        model = AffineUncondModel(4, change.get("dim", DIM))
        with pytest.raises(ValueError, match=field):
            affine_run(model=model, **change)(rule)
        assert model.rows == 0  # refused before any evaluation is spent
    bare = tmp_path / "bare.safetensors"
    save_file({"coefficients": torch.zeros(1, 1)}, str(bare))
    with pytest.raises(ValueError, match="metadata"):
        LinearAGCoefficients.load(bare)


def test_corrupt_coefficients_file_error_names_its_path(tmp_path):
    path = tmp_path / "coefficients.safetensors"
    fitted_affine(history=1).save(path)
    data = bytearray(path.read_bytes())
    truncated, garbled = tmp_path / "truncated.safetensors", tmp_path / "garbled.safetensors"
    truncated.write_bytes(bytes(data[: len(data) // 2]))
    data[8:40] = b"x" * 32  # inside the JSON header
    garbled.write_bytes(bytes(data))
    for bad in (truncated, garbled, tmp_path / "missing.safetensors"):
        with pytest.raises(ValueError, match=re.escape(str(bad))):
            LinearAG(bad, model_id="affine", scheduler="DDIMScheduler")


def test_the_pipelines_actual_scheduler_is_checked_not_the_name_it_is_told(tmp_path):
    """Coefficients fitted on DDIM refuse an Euler run told "DDIMScheduler", and a DDIM run with another config."""
    rule = LinearAG(fitted_affine(history=1), model_id="affine", scheduler="DDIMScheduler")
    assert rule._fitted.metadata["scheduler_class"] == "DDIMScheduler"
    for kwargs, field in ((dict(scheduler_cls=EulerDiscreteScheduler), "scheduler_class"),
                          (dict(scheduler_cls=partial(DDIMScheduler, thresholding=True)), "thresholding")):
        model = AffineUncondModel(4, DIM)
        with pytest.raises(ValueError, match=field):
            affine_run(model=model, **kwargs)(rule)
        assert model.rows == 0
    affine_run()(rule)  # the fitted configuration runs


def test_fitting_refuses_bad_designations():
    with pytest.raises(ValueError, match="chain"):
        fitted_affine(history=1, steps=(1, 2))
    with pytest.raises(ValueError, match="earlier evaluations"):
        fitted_affine(history=2, steps=(1,))
    with pytest.raises(ValueError, match="outside"):
        fitted_affine(history=0, steps=(T + 3,))
    with pytest.raises(ValueError):
        fitted_affine(history=-1)
    assert fitted_affine(history=1, steps=(1, 2), chain=True).evaluations == [1, 2]


# -- the tiny Stable Diffusion pipeline ---------------------------------------------------------------------------
SD_STEPS = 6
SD_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "heun": HeunDiscreteScheduler,
}


@pytest.fixture(scope="module")
def sd_components(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("sd"))


def sd_pipeline(components, scheduler_name):
    parts = dict(components)
    parts["scheduler"] = SD_SCHEDULERS[scheduler_name].from_config(components["scheduler"].config)
    pipe = GuidedStableDiffusionPipeline(**parts)
    pipe.set_progress_bar_config(disable=True)
    calls: list[tuple[int, torch.Tensor]] = []
    forward = pipe.unet.forward

    def counted(sample, timestep, encoder_hidden_states=None, **kwargs):
        calls.append((sample.shape[0], encoder_hidden_states.clone()))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, **kwargs)

    pipe.unet.forward = counted
    return pipe, calls


def sd_call(pipe, guidance):
    trajectory: list[torch.Tensor] = []

    def record(p, i, t, inputs):
        trajectory.append(inputs["latents"].clone())
        return inputs

    out = pipe(
        prompt=["a red cat", "a dog"], negative_prompt=["blurry", "dark"], num_inference_steps=SD_STEPS,
        guidance=guidance, generator=[torch.Generator().manual_seed(s) for s in (0, 1)], output_type="latent",
        callback_on_step_end=record,
    )
    return out, trajectory


@pytest.mark.parametrize("scheduler_name", list(SD_SCHEDULERS))
def test_tiny_sd_with_negative_prompt(sd_components, scheduler_name):
    pipe, calls = sd_pipeline(sd_components, scheduler_name)
    recorder = AdaptiveGuidance(CFG(SCALE), threshold=1.0, record_only=True)
    cfg, cfg_traj = sd_call(pipe, recorder)
    gammas = torch.stack(recorder.gamma_history, 1)
    assert gammas.shape == (2, SD_STEPS) and cfg.nfe == 2 * (2 * SD_STEPS - 1 if scheduler_name == "heun" else SD_STEPS)
    k = 2
    threshold = float(gammas[:, k].min())
    expected = int(switch_steps(gammas, threshold, reduce="all")[0])  # the switch AG must take on these curves
    assert 1 <= expected <= k

    calls.clear()
    rule = AdaptiveGuidance(CFG(SCALE), threshold=threshold)
    ag, ag_traj = sd_call(pipe, rule)
    assert rule.switch_step == expected
    per_step = [2 if scheduler_name == "heun" and s < SD_STEPS - 1 else 1 for s in range(SD_STEPS)]
    guided = sum(per_step[: expected + 1])
    assert ag.nfe == sum(per_step) + guided
    assert [size for size, _ in calls] == [4] * guided + [2] * (sum(per_step) - guided)
    negative, positive = calls[0][1][:2], calls[0][1][2:]
    assert not torch.equal(negative, positive)
    assert all(torch.equal(states, positive) for size, states in calls if size == 2)
    for index in range(guided):  # identical to CFG up to the switch
        assert torch.equal(ag_traj[index], cfg_traj[index])

    again, _ = sd_call(pipe, rule)  # state reset: same images, same cost
    assert torch.equal(again.images, ag.images) and again.nfe == ag.nfe and again.trace == ag.trace


def test_tiny_sdxl_conditional_only_steps_keep_the_positive_added_conditioning(tmp_path):
    """After the switch every conditioning tensor has batch B: prompt embeddings, pooled embeddings and the
    *positive* micro-conditioning time ids (the negative ones differ here)."""
    pipe = GuidedStableDiffusionXLPipeline(**tiny_sdxl_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    calls: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    forward = pipe.unet.forward

    def counted(sample, timestep, encoder_hidden_states=None, added_cond_kwargs=None, **kwargs):
        calls.append((encoder_hidden_states.clone(), *(added_cond_kwargs[k].clone() for k in ("text_embeds", "time_ids"))))
        return forward(sample, timestep, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs, **kwargs)

    pipe.unet.forward = counted
    arguments = dict(
        prompt=["a red cat", "a dog"], negative_prompt=["blurry", "dark"], negative_original_size=(16, 16),
        negative_target_size=(24, 24), num_inference_steps=SD_STEPS, output_type="latent",
    )
    recorder = AdaptiveGuidance(CFG(SCALE), threshold=1.0, record_only=True)
    pipe(guidance=recorder, generator=torch.Generator().manual_seed(0), **arguments)
    gammas = torch.stack(recorder.gamma_history, 1)
    threshold = float(gammas[:, 2].min())
    expected = int(switch_steps(gammas, threshold, reduce="all")[0])
    assert 1 <= expected <= 2
    calls.clear()
    rule = AdaptiveGuidance(CFG(SCALE), threshold=threshold)
    out = pipe(guidance=rule, generator=torch.Generator().manual_seed(0), **arguments)
    assert rule.switch_step == expected and out.nfe == SD_STEPS + expected + 1
    guided, single = calls[: expected + 1], calls[expected + 1 :]
    assert all(t.shape[0] == 4 for call in guided for t in call) and all(t.shape[0] == 2 for call in single for t in call)
    negative, positive = [t[:2] for t in guided[0]], [t[2:] for t in guided[0]]
    assert not torch.equal(negative[2], positive[2])  # negative micro-conditioning differs
    for call in single:
        assert all(torch.equal(t, p) for t, p in zip(call, positive))
