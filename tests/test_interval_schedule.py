"""Guidance intervals and scale schedules (issue 15).

References are independent of the code under test: noise levels computed here from the scheduler's own tables
(``alphas_cumprod``, Heun's ``sigmas``), a counting model that records every row the network sees, reference rules
written in this file from the formulas, and plain base-rule runs.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from diffusers import HeunDiscreteScheduler

from guidance import (
    APG, CFG, GFCG, TAGCFG, AdaptiveGuidance, Branch, DynamicCFG, GuidanceInterval, Guidance, NLG, ScaleSchedule, TAG,
    from_config, get_guidance,
)
from guidance.schedule import cosine_scale, linear_scale
from tests.test_adaptive_guidance import crossing_at, make_scheduler, run_scripted
from tests.test_gfcg import BayesClassifier, CountingModel, sample, three_class_mixture
from tests.test_gfcg import mixture, scheduler  # noqa: F401  (fixtures)

STEPS = 12
W = 3.0


LABELS = torch.tensor([0, 1, 2, 1])


def ddim_noise_levels(scheduler, steps: int = STEPS) -> list[float]:
    """sigma / alpha = sqrt((1 - abar) / abar) at every DDIM timestep, from the scheduler's table."""
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    return ((1 - abar) / abar).sqrt().tolist()


def between(levels: list[float], i: int) -> float:
    """A noise level strictly between the i-th and (i+1)-th of a decreasing list (no ties at the boundary)."""
    return (levels[i] + levels[i + 1]) / 2


class ReferenceInterval(Guidance):
    """CFG at the evaluations listed in ``guided`` (by evaluation index), the conditional prediction elsewhere."""

    required_branches = frozenset({"cond", "uncond"})

    def __init__(self, scale: float, guided: set[int]) -> None:
        self.scale, self.guided = scale, guided

    def branches(self, preds, step):
        return [Branch("uncond"), Branch("cond")] if step.evaluation in self.guided else [Branch("cond")]

    def combine(self, preds, step):
        if step.evaluation not in self.guided:
            return preds["cond"]
        return preds["uncond"] + self.scale * (preds["cond"] - preds["uncond"])


# -- the interval ---------------------------------------------------------------------------------------------------


def test_outside_the_interval_the_output_is_cond_and_uncond_is_not_evaluated(mixture, scheduler):
    levels = ddim_noise_levels(scheduler)
    low, high = between(levels, 8), between(levels, 2)
    guided = {e for e, s in enumerate(levels) if low < s <= high}
    assert guided == set(range(3, 9))
    model = CountingModel(mixture.model_fn)
    rule = GuidanceInterval(CFG(W), sigma_range=(low, high))
    result = sample(mixture, scheduler, rule, LABELS, steps=STEPS, model_fn=model)
    null = mixture.null_label
    for e, call in enumerate(model.calls):  # one batched forward per evaluation
        has_uncond = bool((call["labels"] == null).any())
        assert has_uncond == (e in guided)
        assert call["labels"].numel() == len(LABELS) * (2 if e in guided else 1)
    assert model.rows == (STEPS + len(guided)) * len(LABELS)
    assert result.nfe == STEPS + len(guided) and result.nfe_per_sample == [STEPS + len(guided)] * len(LABELS)
    assert rule.guided_evaluations == sorted(guided)
    reference = sample(mixture, scheduler, ReferenceInterval(W, guided), LABELS, steps=STEPS)
    assert torch.equal(result.latents, reference.latents)


def test_outside_combine_returns_the_conditional_prediction_itself(mixture, scheduler):
    levels = ddim_noise_levels(scheduler)
    rule = GuidanceInterval(CFG(W), sigma_range=(0.0, between(levels, 5)))
    seen = []

    class Spy(GuidanceInterval):
        def combine(self, preds, step):
            out = super().combine(preds, step)
            seen.append((step.evaluation, out is preds["cond"], set(preds)))
            return out

    spy = Spy(rule.base, rule.sigma_range)
    sample(mixture, scheduler, spy, LABELS, steps=STEPS)
    for evaluation, is_cond, names in seen:
        assert is_cond == (evaluation <= 5) and (names == {"cond"}) == (evaluation <= 5)


def gfcg_rule(mixture):
    return GFCG(BayesClassifier(mixture).eval(), cfg_scale=2.0)


@pytest.mark.parametrize("make", [lambda m: CFG(W), lambda m: APG(W, momentum=-0.5),
                                  lambda m: TAGCFG(W, tangential_weight=0.5),
                                  gfcg_rule, lambda m: AdaptiveGuidance(CFG(W), threshold=0.9995)],
                         ids=["cfg", "apg", "tag-cfg", "gfcg", "ag"])
def test_full_interval_equals_the_base_rule_bit_for_bit(mixture, scheduler, make):
    base = sample(mixture, scheduler, make(mixture), LABELS, steps=STEPS)
    limited = sample(mixture, scheduler, GuidanceInterval(make(mixture), (0.0, math.inf)), LABELS, steps=STEPS)
    assert torch.equal(limited.latents, base.latents)
    assert limited.nfe_per_sample == base.nfe_per_sample and limited.model_calls == base.model_calls


@pytest.mark.parametrize("empty", [(0.0, 0.0), (1.0, 1.0), (1e6, math.inf)])
def test_empty_interval_equals_conditional_sampling(mixture, scheduler, empty):
    conditional = sample(mixture, scheduler, CFG(1.0), LABELS, steps=STEPS)
    limited = sample(mixture, scheduler, GuidanceInterval(APG(W), empty), LABELS, steps=STEPS)
    assert torch.equal(limited.latents, conditional.latents) and limited.nfe == STEPS


def test_heun_stages_follow_their_own_noise_level():
    scheduler = HeunDiscreteScheduler()
    mixture = three_class_mixture(scheduler)
    steps = 5
    scheduler.set_timesteps(steps)
    sigmas = scheduler.sigmas.double().tolist()  # evaluation e runs at sigmas[e]
    evaluations = 2 * steps - 1
    # the interval starts between Heun step 0's two stages (stage 1 at s0 outside, stage 2 at s1 inside)
    low, high = (sigmas[5] + sigmas[7]) / 2, (sigmas[0] + sigmas[1]) / 2
    guided = [e for e in range(evaluations) if low < sigmas[e] <= high]
    assert 0 not in guided and 1 in guided and len(guided) < evaluations - 1
    result = sample(mixture, scheduler, GuidanceInterval(CFG(W), (low, high)), LABELS, steps=steps)
    assert len(result.trace) == evaluations
    for e, record in enumerate(result.trace):
        assert ("uncond" in record["branches"]) == (e in guided), e
    assert [r["step"] for r in result.trace][:2] == [0, 0]  # both stages of step 0
    assert result.nfe == evaluations + len(guided)


@pytest.mark.parametrize("k", [0, 4, 8])
@pytest.mark.parametrize("reduce", ["all", "per-sample"])
def test_adaptive_guidance_and_the_interval_commute(k, reduce):
    """AG(interval(CFG)) and interval(AG(CFG)) guide the same evaluations and give the same samples bit for bit."""
    scheduler = make_scheduler("ddim")
    abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    levels = ((1 - abar) / abar).sqrt().tolist()
    window = (between(levels, 6), between(levels, 1))  # steps 2..6 inside
    script = [crossing_at(k), crossing_at(min(k + 1, 9))]
    outer = AdaptiveGuidance(GuidanceInterval(CFG(W), window), threshold=0.9, reduce=reduce)
    inner = GuidanceInterval(AdaptiveGuidance(CFG(W), threshold=0.9, reduce=reduce), window)
    first, _, first_traj = run_scripted(outer, script)
    second, _, second_traj = run_scripted(inner, script)
    assert torch.equal(first.latents, second.latents) and all(map(torch.equal, first_traj, second_traj))
    assert first.nfe_per_sample == second.nfe_per_sample
    assert outer.sample_switch_steps == inner.base.sample_switch_steps
    # a sample is guided at the steps inside the window up to its switch (it is measured inside the window only)
    expected = []
    for crossing in (k, min(k + 1, 9)):
        switch = max(crossing, 2) if reduce == "per-sample" else max(k + 1, 2)
        expected.append(10 + len([s for s in range(2, 7) if s <= switch]))
    assert first.nfe_per_sample == expected


@pytest.mark.parametrize("bad", [(2.0, 1.0), (-0.1, 1.0), (0.1, -1.0), (math.nan, 1.0), (0.1,), "0.1,2", None])
def test_bad_intervals_are_refused(bad):
    with pytest.raises((ValueError, TypeError), match=r"sigma_range"):
        GuidanceInterval(CFG(W), bad)


def test_interval_refuses_a_base_with_other_hooks():
    for base in (TAG(), NLG(), [CFG(W), TAG()]):
        with pytest.raises(ValueError, match="wraps a combine rule only"):
            GuidanceInterval(base, (0.1, 1.0))


def test_interval_by_name_and_config_round_trip(mixture, scheduler):
    rule = get_guidance("interval", guidance_scale=W, sigma_range=(0.3, 2.0))
    assert isinstance(rule.base, CFG) and rule.base.guidance_scale == W
    for original in (rule, GuidanceInterval(AdaptiveGuidance(APG(W)), (0.3, math.inf))):
        text = json.dumps(original.config())
        rebuilt = from_config(text)
        assert json.dumps(rebuilt.config()) == text
        a = sample(mixture, scheduler, original, LABELS, steps=STEPS)
        b = sample(mixture, scheduler, rebuilt, LABELS, steps=STEPS)
        assert torch.equal(a.latents, b.latents)
    with pytest.raises(ValueError, match="contradicts"):
        GuidanceInterval(CFG(2.0), (0.1, 1.0), guidance_scale=3.0)


# -- the schedule ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("make", [lambda m: CFG(W), lambda m: APG(W, momentum=-0.5),
                                  lambda m: TAGCFG(W, tangential_weight=0.5),
                                  gfcg_rule, lambda m: AdaptiveGuidance(CFG(W), threshold=0.9995)],
                         ids=["cfg", "apg", "tag-cfg", "gfcg", "ag"])
def test_constant_schedule_equals_the_base_rule_bit_for_bit(mixture, scheduler, make):
    base = sample(mixture, scheduler, make(mixture), LABELS, steps=STEPS)
    rule = ScaleSchedule(make(mixture), "constant")
    scheduled = sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    assert torch.equal(scheduled.latents, base.latents) and scheduled.nfe_per_sample == base.nfe_per_sample
    assert [s for _, _, s in rule.scale_history] == [rule.guidance_scale] * STEPS


def test_schedule_sets_gfcg_lambda_not_a_cfg_scale(mixture, scheduler):
    """A schedule on GFCG varies its strength, lambda (``confusion_scale``): lambda 0 at every step is CFG at GFCG's
    cfg_scale, bit for bit (GFCG at lambda 0 is exactly CFG), not GFCG at its default lambda."""
    rule = ScaleSchedule(gfcg_rule(mixture), lambda index, count, sigma: 0.0)
    scheduled = sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    cfg = sample(mixture, scheduler, CFG(2.0), LABELS, steps=STEPS)
    default = sample(mixture, scheduler, gfcg_rule(mixture), LABELS, steps=STEPS)
    assert torch.equal(scheduled.latents, cfg.latents) and not torch.equal(default.latents, cfg.latents)
    assert rule.guidance_scale == rule.base.confusion_scale == 2.0  # restored after every call


def test_callable_schedule_receives_step_index_num_steps_and_noise_level(mixture, scheduler):
    calls = []

    def schedule(step_index, num_steps, sigma):
        calls.append((step_index, num_steps, sigma))
        return 1.5 + step_index / num_steps

    sample(mixture, scheduler, ScaleSchedule(CFG(W), schedule), LABELS, steps=STEPS)
    levels = ddim_noise_levels(scheduler)
    assert [(i, n) for i, n, _ in calls] == [(i, STEPS) for i in range(STEPS)]  # once per evaluation
    torch.testing.assert_close(torch.tensor([s for _, _, s in calls]), torch.tensor(levels), rtol=1e-6, atol=0)


def test_callable_schedule_on_heun_shares_the_step_index_and_follows_each_stage_sigma():
    scheduler = HeunDiscreteScheduler()
    mixture = three_class_mixture(scheduler)
    steps = 4
    calls = []
    rule = ScaleSchedule(CFG(W), lambda i, n, s: calls.append((i, n, s)) or 2.0)
    sample(mixture, scheduler, rule, LABELS, steps=steps)
    sigmas = scheduler.sigmas.double().tolist()
    assert [i for i, _, _ in calls] == [0, 0, 1, 1, 2, 2, 3] and {n for _, n, _ in calls} == {steps}
    torch.testing.assert_close(torch.tensor([s for _, _, s in calls]), torch.tensor(sigmas[:7]), rtol=1e-5, atol=0)


class ReferenceSchedule(Guidance):
    """CFG whose scale at step i is ``table[i]`` (the closed forms evaluated in the test)."""

    required_branches = frozenset({"cond", "uncond"})

    def __init__(self, table):
        self.table = table

    def branches(self, preds, step):
        return [Branch("uncond"), Branch("cond")]

    def combine(self, preds, step):
        w = self.table[step.index]
        return preds["uncond"] + w * (preds["cond"] - preds["uncond"])


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_increasing_schedules_match_their_closed_form_keep_the_mean_scale_and_cfgs_nfe(mixture, scheduler, name):
    p = [(i + 0.5) / STEPS for i in range(STEPS)]
    table = [1 + 2 * (W - 1) * x for x in p] if name == "linear" else [1 + (W - 1) * (1 - math.cos(math.pi * x)) for x in p]
    assert sum(table) / STEPS == pytest.approx(W, rel=1e-12) and min(table) > 1 and table == sorted(table)
    rule = ScaleSchedule(CFG(W), name)
    result = sample(mixture, scheduler, rule, LABELS, steps=STEPS)
    torch.testing.assert_close(torch.tensor([s for _, _, s in rule.scale_history]), torch.tensor(table), rtol=1e-14,
                               atol=0)
    reference = sample(mixture, scheduler, ReferenceSchedule(table), LABELS, steps=STEPS)
    torch.testing.assert_close(result.latents, reference.latents, rtol=1e-12, atol=1e-12)
    assert result.nfe == 2 * STEPS
    assert (linear_scale if name == "linear" else cosine_scale)(W, 0, 1) == pytest.approx(W)  # one step: w itself


def test_interval_schedule_equals_the_guidance_interval_for_cfg(mixture, scheduler):
    levels = ddim_noise_levels(scheduler)
    window = (between(levels, 8), between(levels, 2))
    scheduled = sample(mixture, scheduler, ScaleSchedule(CFG(W), "interval", sigma_range=window), LABELS, steps=STEPS)
    limited = sample(mixture, scheduler, GuidanceInterval(CFG(W), window), LABELS, steps=STEPS)
    assert torch.equal(scheduled.latents, limited.latents) and scheduled.nfe == limited.nfe == STEPS + 6


def test_the_scheduled_scale_has_the_base_rules_own_meaning_and_is_restored():
    """At a step where the schedule gives w_i, the combine is exactly Rule(guidance_scale=w_i)'s."""
    from tests.test_adaptive_guidance import vp_step

    x = torch.randn(2, 3, 4, 4, dtype=torch.float64)
    preds = {"cond": torch.randn_like(x), "uncond": torch.randn_like(x)}
    step = vp_step(x, 0.6)
    for make in (lambda w: APG(w, parallel_scale=0.3, norm_threshold=0.5),
                 lambda w: TAGCFG(w, tangential_weight=0.7), CFG):
        rule = ScaleSchedule(make(W), lambda i, n, s: 1.75)
        rule.reset()
        reference = make(1.75)
        reference.reset()
        assert torch.equal(rule.combine(preds, step), reference.combine(preds, step))
        assert rule.base.guidance_scale == W and rule.config()["base"]["guidance_scale"] == W


def test_schedule_through_adaptive_guidance_sets_the_wrapped_rules_scale(mixture, scheduler):
    direct = sample(mixture, scheduler, ScaleSchedule(CFG(W), "cosine"), LABELS, steps=STEPS)
    wrapped = sample(mixture, scheduler, ScaleSchedule(AdaptiveGuidance(CFG(W), threshold=1.0), "cosine"), LABELS,
                     steps=STEPS)
    assert torch.equal(direct.latents, wrapped.latents)


def test_bad_schedules_are_refused(mixture, scheduler):
    with pytest.raises(ValueError, match="schedule must be one of"):
        ScaleSchedule(CFG(W), "exponential")
    with pytest.raises(ValueError, match="needs sigma_range"):
        ScaleSchedule(CFG(W), "interval")
    with pytest.raises(ValueError, match="sigma_range is used by schedule='interval' only"):
        ScaleSchedule(CFG(W), "linear", sigma_range=(0.1, 1.0))
    with pytest.raises(ValueError, match="sigma_range"):
        ScaleSchedule(CFG(W), "interval", sigma_range=(2.0, 1.0))
    for base in (DynamicCFG(scorer=lambda c, s: c.flatten(2).mean(2)), GuidanceInterval(Guidance(), (0.1, 1.0))):
        with pytest.raises(ValueError, match="hooks read guidance_scale"):
            ScaleSchedule(base)
    with pytest.raises(ValueError, match="wraps a combine rule only"):
        ScaleSchedule(TAG())
    for value, match in ((0.5, r"schedule value at step 0 must be in \[1.0, inf\]"), (math.nan, "finite")):
        with pytest.raises(ValueError, match=match):
            sample(mixture, scheduler, ScaleSchedule(APG(W), lambda i, n, s, v=value: v), LABELS, steps=2)


def test_schedule_by_name_and_config_round_trip(mixture, scheduler):
    rule = get_guidance("schedule", guidance_scale=W, schedule="cosine")
    assert isinstance(rule.base, CFG) and rule.schedule == "cosine"
    text = json.dumps(rule.config())
    assert json.dumps(from_config(text).config()) == text
    interval = ScaleSchedule(APG(W), "interval", sigma_range=(0.2, 3.0))
    assert from_config(json.loads(json.dumps(interval.config()))).config() == interval.config()
    fn = lambda i, n, s: 2.0  # noqa: E731
    callable_rule = ScaleSchedule(CFG(W), fn)
    rebuilt = from_config(callable_rule.config())  # a dict round trip keeps the callable
    assert rebuilt.schedule is fn
    a = sample(mixture, scheduler, callable_rule, LABELS, steps=4)
    b = sample(mixture, scheduler, rebuilt, LABELS, steps=4)
    assert torch.equal(a.latents, b.latents)


def test_interval_inside_an_attached_text_to_image_pipeline(tmp_path):
    """Through attach (an unmodified diffusers __call__): the full interval is CFG bit for bit, an empty one evaluates
    the conditional rows only."""
    from pipelines.stable_diffusion import GuidedStableDiffusionPipeline
    from tests.tiny import tiny_sd_components

    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path / "sd"))
    pipe.set_progress_bar_config(disable=True)
    steps = 3

    def run(rule):
        return pipe(["a cat", "a car"], num_inference_steps=steps, guidance=rule,
                    generator=torch.Generator().manual_seed(0), output_type="pt")

    cfg, full, empty = run(CFG(W)), run(GuidanceInterval(CFG(W), (0.0, math.inf))), run(GuidanceInterval(CFG(W), (0, 0)))
    assert torch.equal(full.images, cfg.images) and full.nfe == cfg.nfe == 2 * steps
    assert empty.nfe == steps
