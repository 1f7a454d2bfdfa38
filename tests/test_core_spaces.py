"""Prediction spaces (shared/methods/spaces.md §8): conversions, the loop's (alpha, sigma) against every scheduler's
own x0, space invariance of CFG, the zero-terminal-SNR guard and per-sample reductions."""

from __future__ import annotations

import math
from dataclasses import replace

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    HeunDiscreteScheduler,
)

from guidance import APG, CFG, Branch, Guidance
from guidance.apg import apg_x0
from guidance.spaces import clip_factor
from guidance.cfg import rescale_guidance
from guidance.spaces import (
    PREDICTION_TYPES,
    batch_dims,
    from_x0,
    per_sample_dot,
    per_sample_norm,
    to_x0,
)
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tests.tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")

# ---------------------------------------------------------------- 1. round trips and ground truth


def coefficients(prediction_type: str, level: float) -> tuple[float, float]:
    """(alpha, sigma) at a noise level in (0, 1): VP for epsilon/v/sample, rectified flow for flow."""
    if prediction_type == "flow":
        return 1.0 - level, level
    return math.sqrt(1 - level**2), level


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_round_trip_and_ground_truth(prediction_type, dtype, tol):
    gen = torch.Generator().manual_seed(0)
    for level in torch.empty(8, dtype=torch.float64).uniform_(0.05, 0.95, generator=gen).tolist():
        alpha, sigma = coefficients(prediction_type, level)
        x0 = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
        eps = torch.randn(3, 4, 5, 5, generator=gen, dtype=torch.float64)
        x = alpha * x0 + sigma * eps
        truth = {"epsilon": eps, "v_prediction": alpha * eps - sigma * x0, "sample": x0, "flow": eps - x0}
        pred = truth[prediction_type]  # the output an exact model gives, written from the definitions
        recovered = to_x0(pred.to(dtype), x.to(dtype), alpha, sigma, prediction_type)
        back = from_x0(x0.to(dtype), x.to(dtype), alpha, sigma, prediction_type)
        assert recovered.dtype == dtype and back.dtype == dtype
        torch.testing.assert_close(recovered.double(), x0, rtol=tol, atol=tol * 5)
        torch.testing.assert_close(back.double(), pred, rtol=tol, atol=tol * 5)
        round_trip = to_x0(from_x0(x0.to(dtype), x.to(dtype), alpha, sigma, prediction_type), x.to(dtype), alpha,
                           sigma, prediction_type)
        torch.testing.assert_close(round_trip.double(), x0, rtol=tol, atol=tol * 5)


def test_half_precision_is_converted_in_float32():
    x = torch.randn(2, 4, 8, 8).half()
    pred = torch.randn(2, 4, 8, 8).half()
    out = to_x0(pred, x, 0.01, math.sqrt(1 - 1e-4), "epsilon")  # divides by a small alpha: fp16 would lose digits
    assert out.dtype == torch.float32
    torch.testing.assert_close(out, (x.float() - math.sqrt(1 - 1e-4) * pred.float()) / 0.01)


def test_unknown_prediction_type_is_refused():
    x = torch.zeros(1, 2)
    with pytest.raises(ValueError, match="prediction_type"):
        to_x0(x, x, 0.5, 0.5, "velocity")
    with pytest.raises(ValueError, match="prediction_type"):
        from_x0(x, x, 0.5, 0.5, "velocity")


# ---------------------------------------------------------------- 2. the loop's x0 = each scheduler's x0


def fake_model(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A fixed smooth 'network' (output depends on the input, the timestep and the label)."""
    shift = label.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.5 * x + 0.3 * torch.sin(2 * x + shift) + 2e-4 * float(t) * (1 + shift)


class RecordX0(Guidance):
    """Test-local rule: unguided, but records ``step.to_x0`` of the conditional prediction at every evaluation."""

    def __init__(self) -> None:
        self.x0: list[torch.Tensor] = []

    def combine(self, preds, step):
        self.x0.append(step.to_x0(preds["cond"]))
        return preds["cond"]


def record_scheduler_x0(scheduler) -> list[torch.Tensor]:
    """Wrap ``scheduler.step`` to record the scheduler's own x0 for every call.

    Schedulers with a ``pred_original_sample`` return it; DPM-Solver++ gives it through ``convert_model_output``
    (read at the scheduler's own ``sigmas[step_index]``).
    """
    recorded: list[torch.Tensor] = []
    original = scheduler.step

    def step(model_output, timestep, sample, *args, return_dict=True, **kwargs):
        if isinstance(scheduler, DPMSolverMultistepScheduler):
            if scheduler.step_index is None:
                scheduler._init_step_index(timestep)
            recorded.append(scheduler.convert_model_output(model_output, sample=sample))
            return original(model_output, timestep, sample, *args, return_dict=return_dict, **kwargs)
        out = original(model_output, timestep, sample, *args, return_dict=True, **kwargs)
        recorded.append(out.pred_original_sample)
        return out if return_dict else (out.prev_sample,)

    scheduler.step = step
    return recorded


SCHEDULERS = {
    "ddim": lambda: DDIMScheduler(clip_sample=False),
    "ddim-v": lambda: DDIMScheduler(clip_sample=False, prediction_type="v_prediction"),
    "euler": lambda: EulerDiscreteScheduler(),
    "euler-karras": lambda: EulerDiscreteScheduler(use_karras_sigmas=True),
    "euler-v": lambda: EulerDiscreteScheduler(prediction_type="v_prediction"),
    "heun": lambda: HeunDiscreteScheduler(),
    "dpm++": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++"),
    "dpm++-karras": lambda: DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", use_karras_sigmas=True),
}


def loop(scheduler, guidance: Guidance, steps: int, latents: torch.Tensor, labels: torch.Tensor | None = None):
    labels = torch.zeros(latents.shape[0], dtype=torch.long) if labels is None else labels
    conditioning = BranchConditioning({"cond": {"label": labels}, "uncond": {"label": torch.full_like(labels, 3)}})
    scheduler.set_timesteps(steps)
    return denoise(
        model_fn=fake_model,
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        latents=latents * scheduler.init_noise_sigma,
        guidance=guidance,
        conditioning=conditioning,
        num_inference_steps=steps,
    )


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).norm() / b.double().norm())


@pytest.mark.parametrize("name", list(SCHEDULERS))
def test_loop_x0_matches_the_schedulers_own_x0_at_every_evaluation(name):
    scheduler = SCHEDULERS[name]()
    scheduler_x0 = record_scheduler_x0(scheduler)
    recorder = RecordX0()
    steps = 8
    result = loop(scheduler, recorder, steps, torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1)))
    expected_calls = 2 * steps - 1 if name == "heun" else steps
    assert len(recorder.x0) == len(scheduler_x0) == result.model_calls == expected_calls
    errors = [relative(ours, theirs) for ours, theirs in zip(recorder.x0, scheduler_x0)]
    assert max(errors) < 5e-7, errors


# ---------------------------------------------------------------- 3. CFG is the same step in every space


class CFGIn(Guidance):
    """Test-local CFG computed in another space: output -> {x0, v, epsilon} -> CFG -> back to the model's space."""

    required_branches = frozenset({"cond", "uncond"})

    def __init__(self, scale: float, space: str) -> None:
        self.scale = scale
        self.space = space

    def branches(self, preds, step):
        return [Branch("uncond"), Branch("cond")]

    def combine(self, preds, step):
        other = replace(step, prediction_type=self.space)
        cond, uncond = (other.from_x0(step.to_x0(preds[name])) for name in ("cond", "uncond"))
        guided = uncond + self.scale * (cond - uncond)
        return step.from_x0(other.to_x0(guided))


@pytest.mark.parametrize("name", ["ddim", "euler", "dpm++", "heun"])
@pytest.mark.parametrize("space", ["sample", "v_prediction"])
def test_cfg_gives_the_same_sample_in_every_space(name, space):
    """Same final sample in float64 (1e-10). In float32 the epsilon -> x0 route divides by alpha (0.006 at t=999), so
    the two routes differ by rounding amplified by sigma/alpha: a precision effect, not a space dependence."""
    latents = torch.randn(3, 3, 8, 8, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    labels = torch.tensor([0, 1, 2])
    reference = loop(SCHEDULERS[name](), CFG(4.0), 10, latents, labels).latents
    other = loop(SCHEDULERS[name](), CFGIn(4.0, space), 10, latents, labels).latents
    assert reference.dtype == torch.float64
    assert relative(other, reference) < 1e-10
    unguided = loop(SCHEDULERS[name](), CFG(1.0), 10, latents, labels).latents
    assert relative(unguided, reference) > 1e-2  # guidance really acted


# ---------------------------------------------------------------- 4. zero-terminal-SNR


def zero_snr_ddim(prediction_type: str) -> DDIMScheduler:
    return DDIMScheduler(
        clip_sample=False, rescale_betas_zero_snr=True, timestep_spacing="trailing", prediction_type=prediction_type
    )


def test_zero_terminal_snr_first_step_with_epsilon_raises_a_clear_error():
    scheduler = zero_snr_ddim("epsilon")
    assert float(scheduler.alphas_cumprod[-1]) == 0.0
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match=r"alpha=0.*zero-terminal-SNR"):
        loop(scheduler, APG(3.0), 5, latents)
    with pytest.raises(ValueError, match="alpha"):
        to_x0(latents, latents, 0.0, 1.0, "epsilon")
    # (DDIM's own step divides by alpha there too and returns NaN for epsilon models; zero-SNR needs v-prediction)


def test_zero_terminal_snr_with_v_prediction_is_defined():
    """At alpha = 0 a v-model's x0 is -v: APG runs and stays finite."""
    latents = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    recorder = RecordX0()
    loop(zero_snr_ddim("v_prediction"), recorder, 5, latents)
    first_v = fake_model(latents, torch.tensor(999), torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(recorder.x0[0], -first_v)
    assert torch.isfinite(loop(zero_snr_ddim("v_prediction"), APG(3.0), 5, latents).latents).all()


# ---------------------------------------------------------------- 5. per-sample reductions

SHAPES = {"image": (3, 4, 5, 6), "video": (3, 2, 3, 4, 5), "tokens": (3, 7, 5)}


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_reductions_are_per_sample_over_all_non_batch_dims(shape):
    a, b = torch.randn(shape, dtype=torch.float64), torch.randn(shape, dtype=torch.float64)
    assert batch_dims(a) == tuple(range(1, len(shape)))
    norms, dots = per_sample_norm(a), per_sample_dot(a, b)
    assert norms.shape == dots.shape == (shape[0],) + (1,) * (len(shape) - 1)
    for i in range(shape[0]):
        torch.testing.assert_close(norms[i].reshape(()), torch.sqrt((a[i] ** 2).sum()))
        torch.testing.assert_close(dots[i].reshape(()), (a[i] * b[i]).sum())
    assert per_sample_dot(a.float(), b.float(), dtype=torch.float64).dtype == torch.float64


@pytest.mark.parametrize("shape", list(SHAPES.values()), ids=list(SHAPES))
def test_batched_rules_equal_per_sample_runs(shape):
    """Batch of B = B runs of batch 1 for every per-sample reduction a core rule uses."""
    cond, update = torch.randn(shape), torch.randn(shape)
    batched_apg = apg_x0(cond, update, 5.0, 0.2, 3.0)
    batched_clip = clip_factor(update, 3.0)
    batched_rescale = rescale_guidance(cond + update, cond, 0.7)
    for i in range(shape[0]):
        one = slice(i, i + 1)
        torch.testing.assert_close(batched_apg[one], apg_x0(cond[one], update[one], 5.0, 0.2, 3.0))
        torch.testing.assert_close(batched_clip[one], clip_factor(update[one], 3.0))
        torch.testing.assert_close(batched_rescale[one], rescale_guidance(cond[one] + update[one], cond[one], 0.7))
    assert (batched_clip < 1).any() and (batched_clip <= 1).all()


def test_half_precision_norms_do_not_overflow():
    """65,536 squared unit-variance values exceed fp16's maximum; the norm must still be finite (spaces.md §6.6)."""
    x = 3 * torch.randn(2, 4, 128, 128)
    torch.testing.assert_close(per_sample_norm(x.half()).float(), per_sample_norm(x), rtol=2e-3, atol=0)
    torch.testing.assert_close(clip_factor(x.half(), 15.0).float(), clip_factor(x, 15.0).float(), rtol=2e-3, atol=0)
