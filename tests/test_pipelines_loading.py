"""Guided pipelines load like diffusers pipelines: ``save_pretrained`` / ``from_pretrained`` on a local directory
(offline, safetensors) and ``from_pipe`` on an existing diffusers pipeline; the loaded pipelines then generate."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDPMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
    UNet2DModel,
)

from guidance import APG
from pipelines import (
    GuidedClassConditionalPipeline,
    GuidedStableDiffusion3Pipeline,
    GuidedStableDiffusionPipeline,
    GuidedStableDiffusionXLPipeline,
)
from tiny import one_thread, tiny_sd3_components, tiny_sd_components, tiny_sdxl_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 2


def generate(pipe, *args, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    generator = torch.Generator().manual_seed(0)
    return pipe(*args, num_inference_steps=STEPS, generator=generator, output_type="np", **kwargs)


def test_sd_save_and_from_pretrained(tmp_path):
    pipe = GuidedStableDiffusionPipeline(**tiny_sd_components(tmp_path / "parts"))
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    assert list((tmp_path / "saved" / "unet").glob("*.safetensors"))
    loaded = GuidedStableDiffusionPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert type(loaded) is GuidedStableDiffusionPipeline
    expected = generate(pipe, "a red cat", guidance="apg", guidance_scale=3.0)
    out = generate(loaded, "a red cat", guidance="apg", guidance_scale=3.0)
    assert (out.images == expected.images).all() and out.nfe == 2 * STEPS


def test_class_conditional_save_and_from_pretrained(tmp_path):
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=4,
    ).eval()
    pipe = GuidedClassConditionalPipeline(
        scheduler=DDPMScheduler(clip_sample=False), unet=unet, null_class_label=3,
        id2label={"0": "zero", "1": "one", "2": "two"},
    )
    pipe.save_pretrained(tmp_path / "saved", safe_serialization=True)
    loaded = GuidedClassConditionalPipeline.from_pretrained(tmp_path / "saved", local_files_only=True)
    assert loaded.config.null_class_label == 3 and loaded.num_classes == 3
    assert loaded.transformer is None and loaded.vae is None
    expected = generate(pipe, [0, 2], guidance=APG(3.0, norm_threshold=1.0))
    out = generate(loaded, ["zero", "two"], guidance=APG(3.0, norm_threshold=1.0))
    assert (out.images == expected.images).all() and out.nfe == 2 * STEPS


@pytest.mark.parametrize(
    "parent_cls, guided_cls, build",
    [
        (StableDiffusionPipeline, GuidedStableDiffusionPipeline, tiny_sd_components),
        (StableDiffusionXLPipeline, GuidedStableDiffusionXLPipeline, tiny_sdxl_components),
        (StableDiffusion3Pipeline, GuidedStableDiffusion3Pipeline, tiny_sd3_components),
    ],
    ids=["sd", "sdxl", "sd3"],
)
def test_from_pipe_shares_the_components_and_matches_the_parent(tmp_path, parent_cls, guided_cls, build):
    parent = parent_cls(**build(tmp_path))
    guided = guided_cls.from_pipe(parent)
    assert type(guided) is guided_cls and guided.vae is parent.vae
    extra = {"max_sequence_length": 16} if guided_cls is GuidedStableDiffusion3Pipeline else {}
    expected = generate(parent, "a red cat", guidance_scale=4.0, **extra)
    out = generate(guided, "a red cat", guidance_scale=4.0, **extra)
    assert abs(out.images - expected.images).max() <= 1e-5 and out.nfe == 2 * STEPS
