"""Non-finite network output is detected: every rule raises ``FloatingPointError`` naming the step and branch,
through our loop (class-conditional pipeline) and through ``attach`` (diffusers' own loop); ``check_finite=False``
skips the check."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, StableDiffusionPipeline

from guidance import (
    APG, CFG, GFCG, NLG, TAG, AdaptiveGuidance, AutoGuidance, DynamicCFG, GuidanceInterval, ScaleSchedule, TAGCFG, available_guidance,
)
from pipelines import attach
from tests.tag_nlg_fakes import tiny_class_pipeline
from tiny import one_thread, tiny_sd_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class PoisonAfter:
    """A forward hook that puts NaN into the first row of the ``uncond`` half from forward number ``start`` on."""

    def __init__(self, module: torch.nn.Module, start: int) -> None:
        self.calls, self.start = 0, start
        self.handle = module.register_forward_hook(self.hook)

    def hook(self, module, args, output):
        self.calls += 1
        if self.calls <= self.start:
            return None
        sample = output[0] if isinstance(output, tuple) else output.sample
        sample = sample.clone()
        sample[0] = float("nan")
        return (sample,) if isinstance(output, tuple) else type(output)(sample=sample)


def rules() -> dict:
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10))
    return {
        "cfg": CFG(3.0), "apg": APG(3.0), "ag": AdaptiveGuidance(CFG(3.0)), "tag": [CFG(3.0), TAG(1.15)],
        "tag-cfg": TAGCFG(3.0), "nlg": [NLG(steps=2), CFG(3.0)], "gfcg": GFCG(classifier=classifier.eval()),
        "interval": GuidanceInterval(CFG(3.0), (0.0, float("inf"))), "schedule": ScaleSchedule(CFG(3.0), "cosine"),
        "dynamic-cfg": DynamicCFG((1.0, 3.0), classifier=classifier.eval()),
        "autoguidance": AutoGuidance(3.0, model=tiny_class_pipeline(DDIMScheduler(clip_sample=False)).unet),
    }


def test_every_registered_rule_is_covered():
    assert set(available_guidance()) - {"linear-ag"} <= set(rules())  # LinearAG needs fitted coefficients


@pytest.mark.parametrize("name", list(rules()))
def test_nan_from_the_network_raises_in_our_loop(name):
    pipe = tiny_class_pipeline(DDIMScheduler(clip_sample=False))
    poison = PoisonAfter(pipe.unet, start=3)
    try:
        with pytest.raises(FloatingPointError, match=r"non-finite values .* at step \d+ .*: \d+(\.\d)?%"):
            pipe([1, 2], guidance=rules()[name], num_inference_steps=6, output_type="np")
    finally:
        poison.handle.remove()


def test_nan_from_the_guiding_network_names_its_branch():
    pipe = tiny_class_pipeline(DDIMScheduler(clip_sample=False))
    guide = tiny_class_pipeline(DDIMScheduler(clip_sample=False)).unet
    poison = PoisonAfter(guide, start=2)
    try:
        with pytest.raises(FloatingPointError, match=r"at step 2 .*guiding: 50\.0%"):
            pipe([1, 2], guidance=AutoGuidance(2.0, model=guide), num_inference_steps=6, output_type="np")
    finally:
        poison.handle.remove()


def test_nan_through_attach_names_the_branch_and_the_fraction(tmp_path):
    pipe = StableDiffusionPipeline(**tiny_sd_components(tmp_path))
    pipe.set_progress_bar_config(disable=True)
    poison = PoisonAfter(pipe.unet, start=1)
    with attach(pipe, CFG(3.0)):
        # the uncond half's first row: 1 of 2 rows of the uncond branch, batch of 2 prompts
        with pytest.raises(FloatingPointError, match=r"at step 1 \(evaluation 1\).*uncond: 50\.0%"):
            pipe(["a cat", "a dog"], num_inference_steps=3, output_type="latent")
    with attach(pipe, CFG(3.0), check_finite=False) as handle:
        out = pipe(["a cat", "a dog"], num_inference_steps=3, output_type="latent")  # no check: NaN passes
    poison.handle.remove()
    assert torch.isnan(out.images).any() and handle.last_run.nfe == 6


def test_finite_outputs_pass_and_the_check_reads_back_every_ten_evaluations():
    from pipelines.run import FiniteCheck

    pipe = tiny_class_pipeline(DDIMScheduler(clip_sample=False))
    assert torch.isfinite(pipe([1], guidance=CFG(2.0), num_inference_steps=12, output_type="pt").images).all()
    check = FiniteCheck()
    reads = []
    original = check.check
    check.check = lambda: (reads.append(len(check.pending)), original())
    step = type("S", (), {"index": 0, "evaluation": 0})()
    for _ in range(25):
        check.add(torch.zeros(2, 3), step, [("cond", 2)])
    assert reads == [10, 10]  # batched read-backs, not one per evaluation
