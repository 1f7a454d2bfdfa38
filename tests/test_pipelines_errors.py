"""Bad input at the pipeline level: a ValueError / TypeError whose message names the argument, before sampling."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, UNet2DModel

from guidance import APG, CFG, Branch, Guidance
from pipelines import GuidedClassConditionalPipeline, GuidedStableDiffusionPipeline
from tiny import one_thread, tiny_sd_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


class NeedsReference(Guidance):
    """Test rule that asks for a labelled reference branch."""

    required_branches = frozenset({"cond", "ref"})

    def branches(self, preds, step):
        return [Branch("cond"), Branch("ref", labels=step.target_labels)]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path_factory.mktemp("sd")))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def class_pipe(null_class_label: int | None) -> GuidedClassConditionalPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=4,
    ).eval()
    pipe = GuidedClassConditionalPipeline(
        scheduler=DDIMScheduler(clip_sample=False), unet=unet, null_class_label=null_class_label
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def classes():
    return class_pipe(null_class_label=3)


SD_CASES = {
    "unknown-name": ({"guidance": "nope"}, ValueError, r"unknown guidance 'nope'; available: cfg, .*apg"),
    "negative-scale": ({"guidance_scale": -1.0}, ValueError, r"guidance_scale must be in \[0\.0, inf\]"),
    "nan-scale": ({"guidance_scale": float("nan")}, ValueError, "guidance_scale must be finite"),
    "nan-scale-named": ({"guidance": "apg", "guidance_scale": float("nan")}, ValueError, "guidance_scale"),
    "string-scale": ({"guidance_scale": "7"}, TypeError, "guidance_scale must be a real number"),
    "number-as-guidance": ({"guidance": 3.5}, TypeError, "guidance must be a Guidance module"),
    "bad-list-item": ({"guidance": [CFG(2.0), 3]}, TypeError, "guidance must be a Guidance module"),
    "two-combines": ({"guidance": [CFG(2.0), APG(2.0)]}, ValueError, "guidance list has more than one module"),
    "scale-with-module": ({"guidance": CFG(2.0), "guidance_scale": 3.0}, ValueError, "guidance_scale was given"),
    "rescale-with-apg": ({"guidance": "apg", "guidance_rescale": 0.5}, ValueError, "guidance_rescale applies"),
    "rescale-out-of-range": ({"guidance_rescale": 1.5}, ValueError, r"guidance_rescale must be in \[0\.0, 1\.0\]"),
    "ref-without-label-set": ({"guidance": NeedsReference()}, ValueError, "label_prompts="),
    "labels-without-targets": (
        {"guidance": NeedsReference(), "label_prompts": ["a", "b"]}, ValueError, "needs target_labels",
    ),
    "target-out-of-range": (
        {"guidance": NeedsReference(), "label_prompts": ["a", "b"], "target_labels": [2]},
        ValueError, r"target_labels must be ints in \[0, 1\]",
    ),
    "targets-without-labels": ({"target_labels": [0]}, ValueError, "target_labels needs label_prompts"),
    "label-prompts-string": ({"label_prompts": "a cat", "target_labels": [0]}, ValueError, "label_prompts must be"),
    "zero-steps": ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an int >= 1"),
    "unknown-callback-tensor": (
        {"callback_on_step_end": lambda *a: {}, "callback_on_step_end_tensor_inputs": ["nope"]},
        ValueError, "callback_on_step_end_tensor_inputs",
    ),
}


@pytest.mark.parametrize("case", SD_CASES)
def test_text_to_image_bad_input(sd, case):
    kwargs, error, message = SD_CASES[case]
    kwargs = {"num_inference_steps": 2, **kwargs}
    with pytest.raises(error, match=message):
        sd("a cat", output_type="latent", **kwargs)


CLASS_CASES = {
    "prompt": ({"class_labels": [0], "prompt": "a cat"}, "pass class_labels=, not prompt="),
    "label-out-of-range": ({"class_labels": [0, 3]}, r"class_labels must be ints in \[0, 2\]; got 3"),
    "unknown-name": ({"class_labels": ["seven"]}, r"class_labels must be ints in \[0, 2\]; got 'seven'"),
    "empty-labels": ({"class_labels": []}, "class_labels must not be empty"),
    "output-type": ({"class_labels": [0], "output_type": "jpg"}, "output_type must be"),
    "latents-shape": ({"class_labels": [0], "latents": torch.zeros(1, 1, 4, 4)}, "latents must have shape"),
    "generator-count": (
        {"class_labels": [0, 1], "generator": [torch.Generator()]}, "generator list has 1 entries for 2 images",
    ),
}


@pytest.mark.parametrize("case", CLASS_CASES)
def test_class_conditional_bad_input(classes, case):
    kwargs, message = CLASS_CASES[case]
    with pytest.raises(ValueError, match=message):
        classes(num_inference_steps=2, **kwargs)


@pytest.mark.parametrize("guidance", ["cfg", "apg", [CFG(2.0)]], ids=["cfg", "apg", "list"])
def test_unconditional_branch_needs_a_null_label(guidance):
    pipe = class_pipe(null_class_label=None)
    with pytest.raises(ValueError, match="needs the unconditional branch.*null_class_label"):
        pipe([0], guidance=guidance, num_inference_steps=2)
    # a rule that needs only the conditional branch still samples
    assert pipe([0], guidance=Guidance(), num_inference_steps=2, output_type="np").nfe == 2
