"""Our SD, SDXL and SD3 pipelines with plain CFG give diffusers' own images (same seed), and label sets feed ``ref``.

The reference is diffusers itself: ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline`` /
``StableDiffusion3Pipeline`` built from the same tiny random components, with ``guidance_scale=w``.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from guidance import CFG, Branch, Guidance
from pipelines import GuidedStableDiffusion3Pipeline, GuidedStableDiffusionPipeline, GuidedStableDiffusionXLPipeline
from tiny import one_thread, tiny_sd3_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

TOLERANCE = 1e-5
STEPS = 3
SCHEDULERS = {
    "ddim": DDIMScheduler,
    "euler": EulerDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
}
#: (name, arguments of both pipelines, our guidance=, diffusers' guidance_scale / guidance_rescale)
CASES = {
    "cfg": ({"prompt": "a red cat"}, None, {"guidance_scale": 6.0}),
    "rescale-negative-batch": (
        {"prompt": ["a red cat", "a dog"], "negative_prompt": ["blurry", "dark"], "num_images_per_prompt": 2},
        CFG(4.0, guidance_rescale=0.7),
        {"guidance_scale": 4.0, "guidance_rescale": 0.7},
    ),
}


def build(cls, components: dict, scheduler_cls=None):
    """A pipeline of ``cls`` with its own copy of the scheduler (schedulers keep per-run state)."""
    scheduler = components["scheduler"]
    scheduler = (scheduler_cls or type(scheduler)).from_config(scheduler.config)
    pipe = cls(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def images(pipe, seed: int = 0, **kwargs):
    out = pipe(generator=torch.Generator().manual_seed(seed), num_inference_steps=STEPS, output_type="np", **kwargs)
    return out.images, out


def assert_parity(parent, guided, args: dict, guidance, parent_guidance: dict, ours: dict | None = None) -> None:
    expected, _ = images(parent, **args, **parent_guidance)
    ours = ours if ours is not None else ({"guidance": guidance} if guidance is not None else parent_guidance)
    got, out = images(guided, **args, **ours)
    assert got.shape == expected.shape
    assert abs(got - expected).max() <= TOLERANCE
    scale = parent_guidance["guidance_scale"]
    assert out.nfe == (2 if scale > 1 else 1) * STEPS


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sd_cfg_matches_diffusers(sd, scheduler, case):
    args, guidance, parent_guidance = CASES[case]
    parent = build(StableDiffusionPipeline, sd, SCHEDULERS[scheduler])
    guided = build(GuidedStableDiffusionPipeline, sd, SCHEDULERS[scheduler])
    assert_parity(parent, guided, args, guidance, parent_guidance)


def test_sd_scale_one_is_the_unguided_parent(sd):
    """w = 1: diffusers skips CFG, we evaluate only the conditional branch (1 NFE per step)."""
    parent, guided = build(StableDiffusionPipeline, sd), build(GuidedStableDiffusionPipeline, sd)
    assert_parity(parent, guided, {"prompt": "a red cat"}, None, {"guidance_scale": 1.0})


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_sdxl_cfg_matches_diffusers(sdxl, scheduler, case):
    args, guidance, parent_guidance = CASES[case]
    parent = build(StableDiffusionXLPipeline, sdxl, SCHEDULERS[scheduler])
    guided = build(GuidedStableDiffusionXLPipeline, sdxl, SCHEDULERS[scheduler])
    assert_parity(parent, guided, args, guidance, parent_guidance)


def test_sdxl_negative_micro_conditioning_matches_diffusers(sdxl):
    """The uncond branch gets the negative time ids (and zeroed embeddings for an empty negative prompt)."""
    args = {"prompt": "a red cat", "negative_original_size": (16, 16), "negative_target_size": (24, 24)}
    parent, guided = build(StableDiffusionXLPipeline, sdxl), build(GuidedStableDiffusionXLPipeline, sdxl)
    assert_parity(parent, guided, args, None, {"guidance_scale": 5.0})
    plain, _ = images(guided, prompt="a red cat", guidance_scale=5.0)
    assert abs(images(guided, **args, guidance_scale=5.0)[0] - plain).max() > 1e-3  # the condition matters


def test_sdxl_batched_negative_micro_conditioning_equals_single_images(sdxl):
    """With several images, every uncond row gets the negative time ids: the batch equals one call per image.

    (diffusers' own batched call repeats ``[negative, positive]`` time ids per image, which pairs half of the rows
    with the other branch's micro-conditioning, so it is not the reference here.)
    """
    guided = build(GuidedStableDiffusionXLPipeline, sdxl)
    micro = {"negative_original_size": (16, 16), "negative_target_size": (24, 24), "guidance_scale": 5.0}
    prompts, negatives = ["a red cat", "a dog"], ["blurry", "dark"]
    latents = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(3))
    batch, _ = images(guided, prompt=prompts, negative_prompt=negatives, latents=latents, **micro)
    for i in range(2):
        single, _ = images(guided, prompt=prompts[i], negative_prompt=negatives[i], latents=latents[i : i + 1], **micro)
        assert abs(batch[i : i + 1] - single).max() <= TOLERANCE


@pytest.mark.parametrize("case", ["cfg", "negative-batch"])
def test_sd3_cfg_matches_diffusers(sd3, case):
    args = {"prompt": "a red cat", "max_sequence_length": 16}
    if case == "negative-batch":
        args.update(prompt=["a red cat", "a dog"], negative_prompt=["blurry", "dark"], num_images_per_prompt=2)
    parent = build(StableDiffusion3Pipeline, sd3, FlowMatchEulerDiscreteScheduler)
    guided = build(GuidedStableDiffusion3Pipeline, sd3, FlowMatchEulerDiscreteScheduler)
    guidance = None if case == "cfg" else CFG(5.0)
    assert_parity(parent, guided, args, guidance, {"guidance_scale": 5.0})


def test_sd3_without_t5_matches_diffusers(tmp_path):
    components = tiny_sd3_components(tmp_path, t5=False)
    parent, guided = build(StableDiffusion3Pipeline, components), build(GuidedStableDiffusion3Pipeline, components)
    ours = {"guidance": "cfg", "guidance_scale": 5.0}
    assert_parity(parent, guided, {"prompt": "a red cat"}, None, {"guidance_scale": 5.0}, ours=ours)


class ReferenceOnly(Guidance):
    """Test rule: the output is the ``ref`` branch at each sample's target label (``cond`` rides along)."""

    required_branches = frozenset({"cond", "ref"})

    def branches(self, preds, step):
        return [Branch("cond"), Branch("ref", labels=step.target_labels)]

    def combine(self, preds, step):
        return preds["ref"]


@pytest.mark.parametrize(
    "cls, components, extra",
    [
        (GuidedStableDiffusionPipeline, "sd", {}),
        (GuidedStableDiffusionXLPipeline, "sdxl", {}),
        (GuidedStableDiffusion3Pipeline, "sd3", {"max_sequence_length": 16}),
    ],
)
def test_label_set_feeds_the_reference_branch(request, cls, components, extra):
    """``ref`` at label k denoises with ``label_prompts[k]`` exactly as ``cond`` does with that prompt (SDXL: with
    its pooled embedding and the positive time ids)."""
    pipe = build(cls, request.getfixturevalue(components))
    labels = ["a red cat", "a green dog", "a boat"]
    got, out = images(
        pipe, prompt=["something", "else"], guidance=ReferenceOnly(), label_prompts=labels, target_labels=[2, 0],
        **extra,
    )
    assert out.nfe == 2 * STEPS
    expected, _ = images(pipe, prompt=[labels[2], labels[0]], guidance_scale=1.0, **extra)
    assert abs(got - expected).max() <= TOLERANCE


def test_sdxl_denoising_end_matches_diffusers(sdxl):
    parent, guided = build(StableDiffusionXLPipeline, sdxl), build(GuidedStableDiffusionXLPipeline, sdxl)
    assert_parity(parent, guided, {"prompt": "a red cat", "denoising_end": 0.999}, None, {"guidance_scale": 5.0})
    partial, out = images(guided, prompt="a red cat", denoising_end=0.5, guidance_scale=5.0)
    expected, _ = images(parent, prompt="a red cat", denoising_end=0.5, guidance_scale=5.0)
    assert out.nfe < 2 * STEPS and abs(partial - expected).max() <= TOLERANCE


@pytest.mark.parametrize(
    "parent_cls, guided_cls, components, extra",
    [
        (StableDiffusionPipeline, GuidedStableDiffusionPipeline, "sd", {}),
        (StableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline, "sdxl", {}),
        (StableDiffusion3Pipeline, GuidedStableDiffusion3Pipeline, "sd3", {"max_sequence_length": 16}),
    ],
    ids=["sd", "sdxl", "sd3"],
)
def test_callback_on_step_end_matches_diffusers(request, parent_cls, guided_cls, components, extra):
    """The callback sees every evaluation index and may replace the latents, as in the parent."""
    parts = request.getfixturevalue(components)

    def run(cls):
        seen = []

        def callback(pipe, i, t, tensors):
            seen.append((i, tuple(tensors)))
            return {"latents": tensors["latents"] * 0.9} if i == 1 else {}

        result, _ = images(
            build(cls, parts), prompt="a red cat", guidance_scale=5.0, callback_on_step_end=callback,
            callback_on_step_end_tensor_inputs=["latents", "prompt_embeds"], **extra,
        )
        return result, seen

    (expected, seen_parent), (got, seen) = run(parent_cls), run(guided_cls)
    assert seen == seen_parent == [(i, ("latents", "prompt_embeds")) for i in range(STEPS)]
    assert abs(got - expected).max() <= TOLERANCE
