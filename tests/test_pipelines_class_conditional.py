"""The class-conditional pipeline: UNet2DModel with a null label and DiT, against independent references.

References: a plain diffusers scheduler loop written here (UNet2DModel, CFG with the null label), and diffusers' own
``DiTPipeline`` (DiT, deterministic DDIM).
"""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    EulerDiscreteScheduler,
    UNet2DModel,
)
from diffusers.utils.torch_utils import randn_tensor

from guidance import APG, CFG
from pipelines import GuidedClassConditionalPipeline
from tiny import one_thread, tiny_vae  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
NULL = 3  # three real classes, label 3 is the null label


def tiny_class_unet() -> UNet2DModel:
    """8x8x1 pixels, 3 classes + a null embedding row."""
    torch.manual_seed(0)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=NULL + 1,
    ).eval()


def tiny_dit(num_classes: int = 1000) -> DiTTransformer2DModel:
    """A 1-layer DiT on 8x8x4 latents with learned variance (8 output channels); ``num_classes`` + 1 label rows."""
    torch.manual_seed(0)
    return DiTTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=1, sample_size=8,
        patch_size=2, num_embeds_ada_norm=num_classes,
    ).eval()


@pytest.fixture(scope="module")
def unet():
    return tiny_class_unet()


def reference_cfg(unet: UNet2DModel, scheduler, labels: list[int], scale: float, seed: int) -> torch.Tensor:
    """Textbook CFG sampling loop: [null; cond] in one forward, ``u + w (c - u)``, ``scheduler.step``."""
    generator = torch.Generator().manual_seed(seed)
    scheduler.set_timesteps(STEPS)
    cond = torch.tensor(labels)
    x = randn_tensor((len(labels), 1, 8, 8), generator=generator) * scheduler.init_noise_sigma
    for t in scheduler.timesteps:
        model_input = scheduler.scale_model_input(torch.cat([x, x]), t)
        out = unet(model_input, t, class_labels=torch.cat([torch.full_like(cond, NULL), cond])).sample
        uncond, conditional = out.chunk(2)
        x = scheduler.step(uncond + scale * (conditional - uncond), t, x, generator=generator).prev_sample
    return x


@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, EulerDiscreteScheduler], ids=["ddpm", "euler"])
def test_unet_cfg_matches_a_reference_loop(unet, scheduler_cls):
    config = {"num_train_timesteps": 1000, "clip_sample": False} if scheduler_cls is DDPMScheduler else {}
    pipe = GuidedClassConditionalPipeline(scheduler=scheduler_cls(**config), unet=unet, null_class_label=NULL)
    pipe.set_progress_bar_config(disable=True)
    labels = [0, 2, 1]
    out = pipe(labels, guidance=CFG(3.0), num_inference_steps=STEPS, generator=torch.Generator().manual_seed(7),
               output_type="latent")
    expected = reference_cfg(unet, scheduler_cls(**config), labels, 3.0, seed=7)
    assert (out.images - expected).abs().max() <= 1e-5
    assert out.nfe == 2 * STEPS


def test_unet_class_names_and_output_types(unet):
    pipe = GuidedClassConditionalPipeline(
        scheduler=DDIMScheduler(clip_sample=False), unet=unet, null_class_label=NULL,
        id2label={"0": "zero", "1": "one", "2": "two"},
    )
    pipe.set_progress_bar_config(disable=True)
    by_name = pipe(["two", "zero"], guidance_scale=2.0, num_inference_steps=2, output_type="np",
                   generator=torch.Generator().manual_seed(0)).images
    by_id = pipe([2, 0], guidance_scale=2.0, num_inference_steps=2, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert by_name.shape == (2, 8, 8, 1) and (by_name == by_id).all()
    assert 0 <= by_name.min() and by_name.max() <= 1


def test_dit_null_label_is_its_extra_embedding_row():
    pipe = GuidedClassConditionalPipeline(scheduler=DDIMScheduler(), transformer=tiny_dit(10), vae=tiny_vae())
    assert pipe.config.null_class_label == 10 and pipe.num_classes == 10


def test_dit_cfg_matches_diffusers_dit_pipeline():
    transformer, vae = tiny_dit(), tiny_vae()
    parent = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler())
    guided = GuidedClassConditionalPipeline(scheduler=DDIMScheduler(), transformer=transformer, vae=vae)
    for pipe in (parent, guided):
        pipe.set_progress_bar_config(disable=True)
    labels = [3, 999]
    expected = parent(labels, guidance_scale=4.0, num_inference_steps=STEPS, output_type="np",
                      generator=torch.Generator().manual_seed(1)).images
    out = guided(labels, guidance_scale=4.0, num_inference_steps=STEPS, output_type="np",
                 generator=torch.Generator().manual_seed(1))
    assert out.images.shape == expected.shape == (2, 16, 16, 3)
    assert abs(out.images - expected).max() <= 1e-5
    assert out.nfe == 2 * STEPS


@pytest.mark.parametrize("rule", [CFG(4.0), APG(4.0, norm_threshold=2.0)], ids=["cfg", "apg"])
@pytest.mark.parametrize("scheduler_cls", [DDPMScheduler, EulerDiscreteScheduler], ids=["ddpm", "euler"])
def test_dit_runs_with_cfg_and_apg(rule, scheduler_cls):
    pipe = GuidedClassConditionalPipeline(scheduler=scheduler_cls(), transformer=tiny_dit(10), vae=tiny_vae())
    pipe.set_progress_bar_config(disable=True)
    out = pipe([1, 7], guidance=rule, num_inference_steps=STEPS, output_type="pt",
               generator=torch.Generator().manual_seed(0))
    assert out.images.shape == (2, 3, 16, 16) and torch.isfinite(out.images).all()
    assert out.nfe == 2 * STEPS and out.model_calls == STEPS
