"""Batching independence (issue 12): every registered rule at its defaults gives a sample the same image and NFE
whether it is generated alone or in a batch of 4, through the pipeline on the embedded digits model. The one
documented exception, AG's batch-coupled ``reduce="all"``, is shown to differ."""

from __future__ import annotations

import pytest
import torch

from guidance import AdaptiveGuidance, Guidance, LinearAG, available_guidance, get_guidance
from guidance.cfg import CFG
from guidance.linear_ag_fit import alternate_steps, fit_linear_ag
from pipelines import GuidedClassConditionalPipeline
from samples.digits.nets import WEIGHTS_DIR, load_classifier

STEPS = 6
LABELS = [3, 8, 1, 5]
SEEDS = [11, 12, 13, 14]


@pytest.fixture(scope="module")
def digits() -> GuidedClassConditionalPipeline:
    pipe = GuidedClassConditionalPipeline.from_pretrained(WEIGHTS_DIR / "digits")
    pipe.set_progress_bar_config(disable=True)
    return pipe


def generate(pipe, rule: Guidance, rows: list[int]):
    generators = [torch.Generator().manual_seed(SEEDS[i]) for i in rows]
    out = pipe([LABELS[i] for i in rows], guidance=rule, num_inference_steps=STEPS, generator=generators,
               output_type="latent")
    return out.images, out.nfe_per_sample


def default_rule(name: str, pipe) -> Guidance:
    """``name`` at its defaults; arguments without a default are what the tools supply."""
    if name in ("gfcg", "dynamic-cfg"):
        return get_guidance(name, classifier=load_classifier())
    if name == "autoguidance":  # the tools' guiding model for the embedded checkpoints
        weak = GuidedClassConditionalPipeline.from_pretrained(WEIGHTS_DIR / "digits-weak").unet
        return get_guidance(name, model=weak, prediction_type="epsilon")
    if name == "linear-ag":
        def run(guidance):
            pipe(list(range(10)), guidance=guidance, num_inference_steps=STEPS,
                 generator=[torch.Generator().manual_seed(1000 + i) for i in range(10)], output_type="latent")

        fitted = fit_linear_ag(run, steps=alternate_steps(STEPS), model_id="digits", scheduler=pipe.scheduler,
                               base=CFG())
        return LinearAG(fitted, model_id="digits", scheduler=pipe.scheduler)
    return get_guidance(name)


def batch_and_single(pipe, rule: Guidance):
    images, nfe = generate(pipe, rule, list(range(len(LABELS))))
    singles = [generate(pipe, rule, [i]) for i in range(len(LABELS))]
    return images, nfe, torch.cat([image for image, _ in singles]), [n for _, (n,) in singles]


@pytest.mark.parametrize("name", available_guidance())
def test_batch_of_4_equals_4_single_runs_at_the_defaults(digits, name):
    rule = default_rule(name, digits)
    images, nfe, single_images, single_nfe = batch_and_single(digits, rule)
    assert nfe == single_nfe
    # float32 kernels differ by batch size at the ~1e-5 level (amplified by CFG's w = 7.5); batch coupling shows as
    # 1e-2 (AG's reduce="all": 6/255 in the issue), and guidance-evaluate's uint8 images are compared exactly
    assert float((images - single_images).abs().max()) < 1e-4


def test_the_batch_coupled_option_does_depend_on_the_batch(digits):
    """AG with reduce="all" (documented as batch-coupled): the batch switches when its slowest sample does."""
    rule = AdaptiveGuidance(CFG(), threshold=0.991, reduce="all")
    images, nfe, single_images, single_nfe = batch_and_single(digits, rule)
    assert len(set(single_nfe)) > 1 and nfe != single_nfe
    assert float((images - single_images).abs().max()) > 1e-3
    assert AdaptiveGuidance.couples_batch(rule.config()) and not AdaptiveGuidance.couples_batch(
        AdaptiveGuidance().config())
