"""The guidance core: registry, configs, composition, hook order, argument checks, resets between generations."""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import DDIMScheduler

from guidance import (
    APG,
    CFG,
    ComposedGuidance,
    Guidance,
    available_guidance,
    from_config,
    get_guidance,
    registry,
)
from guidance.base import Step
from pipelines.conditioning import BranchConditioning
from pipelines.loop import denoise
from tests.gmm import two_class_mixture
from tests.tiny import one_thread  # noqa: F401  (fixture)

pytestmark = pytest.mark.usefixtures("one_thread")


def make_step(sample: torch.Tensor, sigma: float = 0.6, prediction_type: str = "epsilon", **kw) -> Step:
    """A VP evaluation record at noise ``sigma`` (alpha = sqrt(1 - sigma^2))."""
    fields = {"index": 0, "num_steps": 10, "evaluation": 0, "first_stage": True, "timestep": torch.tensor(500)}
    fields.update(kw)
    return Step(
        alpha=math.sqrt(1 - sigma**2),
        sigma=sigma,
        sample=sample,
        prediction_type=prediction_type,
        **fields,
    )


def fake_model(x: torch.Tensor, t: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
    """A fixed smooth 'network': a different epsilon prediction per label."""
    shift = label.to(x.dtype).reshape(-1, *([1] * (x.ndim - 1)))
    return 0.4 * x + 0.3 * torch.sin(3 * x + shift) + 0.001 * float(t) * shift


def run(guidance: Guidance, steps: int = 6, batch: int = 3, seed: int = 0):
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(steps)
    latents = torch.randn(batch, 2, 4, 4, generator=torch.Generator().manual_seed(seed))
    labels = torch.arange(batch) % 2
    conditioning = BranchConditioning({"cond": {"label": labels}, "uncond": {"label": torch.full_like(labels, 5)}})
    return denoise(
        model_fn=fake_model,
        scheduler=scheduler,
        timesteps=scheduler.timesteps,
        latents=latents,
        guidance=guidance,
        conditioning=conditioning,
        num_inference_steps=steps,
    )


# ---------------------------------------------------------------- registry and configs


def test_registry_lists_cfg_first_and_names_the_available_ones_on_error():
    names = available_guidance()
    assert names[0] == "cfg" and "apg" in names
    with pytest.raises(ValueError) as err:
        get_guidance("no-such-rule")
    assert "no-such-rule" in str(err.value)
    for name in names:
        assert name in str(err.value)
    assert isinstance(get_guidance("apg", guidance_scale=4.0), APG)
    assert get_guidance("cfg", guidance_scale=3.0).guidance_scale == 3.0


@pytest.mark.parametrize(
    "guidance",
    [
        CFG(3.5),
        CFG(2.0, guidance_rescale=0.7),
        APG(),
        APG(5.0, parallel_scale=0.3, norm_threshold=2.5, momentum=-0.25, momentum_per="step"),
    ],
    ids=["cfg", "cfg-rescale", "apg-default", "apg-all-args"],
)
def test_config_round_trips_through_dict_and_json(guidance):
    config = guidance.config()
    assert config["name"] == guidance.name
    for rebuilt in (from_config(config), from_config(json.dumps(config))):
        assert type(rebuilt) is type(guidance)
        assert rebuilt.config() == config
    assert json.loads(json.dumps(config)) == config


class FlipCoordinates(Guidance):
    """Test-local noise edit: swap the first two channels (unit variance in, unit variance out)."""

    def __init__(self, tag: str = "flip") -> None:
        self.tag = tag
        self.log: list = []

    def prepare_noise(self, noise, context):
        self.log.append(("noise", self.tag))
        return noise[:, [1, 0, *range(2, noise.shape[1])]]

    def after_step(self, before, after, step):
        self.log.append(("after", self.tag))
        return after * 2


class NegateFirst(Guidance):
    """Test-local noise edit: negate channel 0; after a step, add one."""

    def __init__(self, tag: str = "negate") -> None:
        self.tag = tag
        self.log: list = []

    def prepare_noise(self, noise, context):
        self.log.append(("noise", self.tag))
        out = noise.clone()
        out[:, 0] = -out[:, 0]
        return out

    def after_step(self, before, after, step):
        self.log.append(("after", self.tag))
        return after + 1


def test_list_config_round_trips(monkeypatch):
    monkeypatch.setitem(registry._REGISTRY, "test-flip", FlipCoordinates)
    monkeypatch.setattr(FlipCoordinates, "name", "test-flip")
    composed = ComposedGuidance([FlipCoordinates(tag="a"), APG(4.0, momentum=0.0)])
    config = composed.config()
    assert config == [{"name": "test-flip", "tag": "a"}, APG(4.0, momentum=0.0).config()]
    rebuilt = from_config(json.dumps(config))
    assert isinstance(rebuilt, ComposedGuidance)
    assert [type(m) for m in rebuilt.modules] == [FlipCoordinates, APG]
    assert rebuilt.config() == config


# ---------------------------------------------------------------- composition


def test_two_combine_rules_are_refused_naming_both():
    with pytest.raises(ValueError) as err:
        ComposedGuidance([CFG(3.0), APG(3.0)])
    assert "CFG" in str(err.value) and "APG" in str(err.value)
    with pytest.raises(ValueError, match="CFG.*APG"):
        from_config([CFG(3.0).config(), APG(3.0).config()])


def test_prepare_noise_and_after_step_chain_in_list_order():
    log: list = []
    first, second = FlipCoordinates(), NegateFirst()
    first.log = second.log = log
    composed = ComposedGuidance([first, second, CFG(2.0)])
    noise = torch.randn(2, 3, 2, 2)
    out = composed.prepare_noise(noise, context=None)
    expected = noise[:, [1, 0, 2]].clone()
    expected[:, 0] = -expected[:, 0]  # flip first, then negate: the reverse order gives a different tensor
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    reverse = ComposedGuidance([NegateFirst(), FlipCoordinates()]).prepare_noise(noise, context=None)
    assert not torch.equal(reverse, out)

    after = composed.after_step(noise, torch.ones(1), step=None)
    assert after.item() == 3.0  # (1 * 2) + 1, not (1 + 1) * 2
    assert log == [("noise", "flip"), ("noise", "negate"), ("after", "flip"), ("after", "negate")]


def test_chain_order_inside_the_loop_and_combine_from_the_one_rule():
    log: list = []
    composed = [FlipCoordinates(), NegateFirst(), CFG(2.5)]
    composed[0].log = composed[1].log = log
    result = run(ComposedGuidance(composed), steps=3)
    assert log[:2] == [("noise", "flip"), ("noise", "negate")]
    assert log[2:] == [("after", "flip"), ("after", "negate")] * 3
    assert result.nfe == 2 * 3  # CFG's two branches at every step, nothing extra for the noise edits
    # the same loop with only CFG differs: the hooks really ran
    plain = run(CFG(2.5), steps=3)
    assert not torch.allclose(plain.latents, result.latents)


# ---------------------------------------------------------------- bad input


NOT_FINITE = [(float("nan"), ValueError), (float("inf"), ValueError), (float("-inf"), ValueError)]
NOT_NUMBERS = [("7", TypeError), (True, TypeError), ([1.0], TypeError)]
BUILDERS = {
    "cfg.guidance_scale": (lambda v: CFG(v), [(-1.0, ValueError), (None, TypeError)]),
    "cfg.guidance_rescale": (lambda v: CFG(2.0, guidance_rescale=v), [(-0.1, ValueError), (None, TypeError)]),
    "apg.guidance_scale": (lambda v: APG(v), [(-1.0, ValueError), (None, TypeError)]),
    "apg.parallel_scale": (lambda v: APG(parallel_scale=v), [(None, TypeError)]),  # any finite value is allowed
    "apg.norm_threshold": (lambda v: APG(norm_threshold=v), [(-1.0, ValueError)]),  # None: size-scaled default
    "apg.momentum": (lambda v: APG(momentum=v), [(-1.5, ValueError), (-1.0, ValueError), (None, TypeError)]),
}
CASES = [
    (key, value, error)
    for key, (_, specific) in BUILDERS.items()
    for value, error in specific + NOT_FINITE + NOT_NUMBERS
]


@pytest.mark.parametrize("key,value,error", CASES, ids=[f"{k}={v!r}" for k, v, _ in CASES])
def test_bad_numbers_name_the_argument(key, value, error):
    build, _ = BUILDERS[key]
    with pytest.raises(error) as err:
        build(value)
    assert key.split(".")[1] in str(err.value)


@pytest.mark.parametrize(
    "build,argument,allowed",
    [
        (lambda: CFG(2.0, guidance_rescale=1.5), "guidance_rescale", "[0.0, 1.0]"),
        (lambda: APG(0.5), "guidance_scale", "[1.0, inf]"),
        (lambda: APG(momentum=1.0), "momentum", "(-1.0, 1.0)"),
        (lambda: APG(momentum=-1.0), "momentum", "(-1.0, 1.0)"),
        (lambda: APG(momentum_per="call"), "momentum_per", "'evaluation', 'step'"),
    ],
)
def test_out_of_range_values_name_the_allowed_range(build, argument, allowed):
    with pytest.raises(ValueError) as err:
        build()
    assert argument in str(err.value) and allowed in str(err.value)


def test_guidance_rescale_of_a_constant_guided_output_is_finite():
    """Zero std of the guided output (0/0 in Lin et al.'s ratio): nothing to rescale, the output stays finite."""
    cond = torch.randn(2, 4, 4, 4)
    uncond = cond.clone()
    uncond[0] = 0.3  # sample 0 at w = 0: the guided output is out_u = 0.3 everywhere, std 0
    step = Step(index=0, num_steps=1, evaluation=0, first_stage=True, timestep=torch.tensor(500), alpha=0.6,
                sigma=0.8, sample=torch.randn(2, 4, 4, 4), prediction_type="epsilon")
    out = CFG(0.0, guidance_rescale=0.7).combine({"cond": cond, "uncond": uncond}, step)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out[0], torch.full_like(out[0], 0.3))
    torch.testing.assert_close(out[1], cond[1])  # cond = uncond: the guided output is cond, std ratio 1


# ---------------------------------------------------------------- resets between generations


class CountsSinceReset(Guidance):
    """Test-local stateful rule: records how many evaluations it has seen since its last reset."""

    def __init__(self) -> None:
        self.seen: list[int] = []
        self.reset()

    def reset(self) -> None:
        self._count = 0

    def combine(self, preds, step):
        self._count += 1
        self.seen.append(self._count)
        return preds["cond"]


def test_the_loop_resets_state_at_every_generation():
    rule = CountsSinceReset()
    run(rule, steps=4)
    run(rule, steps=4)
    assert rule.seen == [1, 2, 3, 4, 1, 2, 3, 4]


def test_two_identical_generations_give_identical_results_with_apg_momentum():
    apg = APG(4.0, parallel_scale=0.0, norm_threshold=0.5, momentum=-0.5)
    first, second = run(apg, steps=8), run(apg, steps=8)
    torch.testing.assert_close(first.latents, second.latents, rtol=0, atol=0)
    # momentum matters here, so equality is not trivial
    no_momentum = run(APG(4.0, parallel_scale=0.0, norm_threshold=0.5, momentum=0.0), steps=8)
    assert (no_momentum.latents - first.latents).abs().max() > 1e-4


def test_apg_restarts_its_momentum_when_the_noise_level_rises():
    """A rise of sigma (a new generation without a reset call) starts the running sum again (spaces.md §4)."""
    torch.manual_seed(1)
    x = torch.randn(2, 3, 4, 4)
    cond, uncond = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    apg = APG(3.0, parallel_scale=0.2, norm_threshold=0.0, momentum=-0.5)
    fresh = apg.combine({"cond": cond, "uncond": uncond}, make_step(x, sigma=0.9))
    apg.combine({"cond": uncond, "uncond": cond}, make_step(x, sigma=0.5))
    again = apg.combine({"cond": cond, "uncond": uncond}, make_step(x, sigma=0.9))
    torch.testing.assert_close(again, fresh, rtol=0, atol=0)


def test_gmm_denoise_with_apg_twice_is_deterministic():
    scheduler = DDIMScheduler(clip_sample=False)
    gmm = two_class_mixture(scheduler.alphas_cumprod)
    labels = torch.tensor([0, 1, 0, 1])
    outs = []
    for _ in range(2):
        scheduler.set_timesteps(10)
        outs.append(
            denoise(
                model_fn=gmm.model_fn,
                scheduler=scheduler,
                timesteps=scheduler.timesteps,
                latents=torch.randn(4, 2, generator=torch.Generator().manual_seed(3), dtype=torch.float64),
                guidance=APG(5.0, norm_threshold=0.3),
                conditioning=gmm.conditioning(labels),
                num_inference_steps=10,
            ).latents
        )
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0)
