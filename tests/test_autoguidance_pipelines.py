"""Autoguidance in the pipelines: ``GuidedClassConditionalPipeline`` (our loop) and ``attach`` on a diffusers Stable
Diffusion pipeline (its own loop), each with a second tiny network as the guiding model.

References: a plain scheduler loop written here (class-conditional), and the *plain* diffusers pipeline whose UNet
gets a forward hook of the test's own returning ``D_0 + w (D_1 - D_0)`` (attach). Rows are counted by forward
pre-hooks of the test's own on both networks.
"""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler, DiTTransformer2DModel, StableDiffusionPipeline, UNet2DConditionModel, UNet2DModel
from diffusers.utils.torch_utils import randn_tensor

from guidance import GFCG, AutoGuidance
from pipelines import GuidedClassConditionalPipeline, attach
from tiny import one_thread, tiny_sd_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 4
NULL = 3
TOLERANCE = 1e-5


def class_unet(seed: int, **overrides) -> UNet2DModel:
    torch.manual_seed(seed)
    config = dict(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=(16, 32), layers_per_block=1,
        down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=8, num_class_embeds=NULL + 1,
    )
    return UNet2DModel(**{**config, **overrides}).eval()


def sd_unet(seed: int, cross_attention_dim: int = 32) -> UNet2DConditionModel:
    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(16, 32), layers_per_block=1, sample_size=16, in_channels=4, out_channels=4,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim, attention_head_dim=4, norm_num_groups=8,
    ).eval()


class Rows:
    """Rows of every forward of some modules (forward pre-hooks, removed on exit)."""

    def __init__(self, **modules: torch.nn.Module) -> None:
        self.modules = modules
        self.rows: dict[str, list[int]] = {name: [] for name in modules}

    def __enter__(self) -> Rows:
        def hook(name):
            def count(module, args, kwargs):
                sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
                self.rows[name].append(sample.shape[0])
            return count

        self.handles = [m.register_forward_pre_hook(hook(n), with_kwargs=True) for n, m in self.modules.items()]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()


@pytest.fixture(scope="module")
def pair():
    return class_unet(0), class_unet(1)


def class_pipeline(unet) -> GuidedClassConditionalPipeline:
    pipe = GuidedClassConditionalPipeline(DDIMScheduler(clip_sample=False), unet=unet, null_class_label=NULL)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def reference_loop(good, bad, labels, w, seed):
    scheduler = DDIMScheduler(clip_sample=False)
    scheduler.set_timesteps(STEPS)
    generator = torch.Generator().manual_seed(seed)
    x = randn_tensor((len(labels), 1, 8, 8), generator=generator)
    cond = torch.tensor(labels)
    for t in scheduler.timesteps:
        d1, d0 = good(x, t, class_labels=cond).sample, bad(x, t, class_labels=cond).sample
        x = scheduler.step(d0 + w * (d1 - d0), t, x).prev_sample
    return x


def test_class_conditional_autoguidance_matches_a_reference_loop_and_counts_both_networks(pair):
    good, bad = pair
    pipe = class_pipeline(good)
    labels = [0, 1, 2, 1]
    with Rows(main=good, guiding=bad) as counted:
        out = pipe(labels, guidance=AutoGuidance(2.0, model=bad), num_inference_steps=STEPS, output_type="latent",
                   generator=torch.Generator().manual_seed(0))
    expected = reference_loop(good, bad, labels, 2.0, 0)
    assert (out.images - expected).abs().max() <= TOLERANCE
    assert counted.rows == {"main": [4] * STEPS, "guiding": [4] * STEPS}  # one batched forward of each per step
    assert out.nfe == 2 * STEPS and out.nfe_per_network == {"main": STEPS, "guiding": STEPS}
    assert out.model_calls == 2 * STEPS
    assert out.trace[0]["branches"] == {"cond": 4, "guiding": 4}
    plain = pipe(labels, guidance="cfg", guidance_scale=1.0, num_inference_steps=STEPS, output_type="latent",
                 generator=torch.Generator().manual_seed(0))
    assert plain.nfe_per_network == {"main": STEPS}
    assert (plain.images - out.images).abs().max() > 1e-3


def test_gfcg_with_autoguidance_in_the_class_conditional_pipeline(pair):
    """2 rows per sample and step, one of each network; the guide sees the classifier's reference labels."""
    good, bad = pair

    class Rival(torch.nn.Module):  # always names class 2 most likely
        def forward(self, x):
            return torch.tensor([0.0, 0.0, 3.0]).expand(x.shape[0], 3)

    labels = [0, 1, 2]
    for reference, guide_labels, branches in [
        ("exclude_target", [2, 2, 0], {"cond": 3, "ref": 3}),  # class 2's rival: 0 (tie with 1, the first)
        ("include_target", [2, 2, 2], {"cond": 3, "ref": 2, "guiding": 1}),  # class 2: plain Autoguidance
    ]:
        seen = []
        handle = bad.register_forward_pre_hook(lambda m, a, k: seen.append(k["class_labels"].tolist()),
                                               with_kwargs=True)
        rule = GFCG(Rival(), reference=reference, autoguidance=AutoGuidance(2.0, model=bad))
        try:
            with Rows(main=good, guiding=bad) as counted:
                out = class_pipeline(good)(labels, guidance=rule, num_inference_steps=STEPS, output_type="latent",
                                           generator=torch.Generator().manual_seed(0))
        finally:
            handle.remove()
        assert out.nfe == 2 * STEPS and out.nfe_per_network == {"main": STEPS, "guiding": STEPS}
        assert counted.rows == {"main": [3] * STEPS, "guiding": [3] * STEPS}
        assert seen == [guide_labels] * STEPS
        assert all(entry["branches"] == branches for entry in out.trace)


def test_class_conditional_pipeline_refuses_a_mismatched_guiding_model(pair):
    good, _ = pair
    pipe = class_pipeline(good)
    call = dict(class_labels=[0], num_inference_steps=2, output_type="latent")
    cases = {
        "out_channels=2 where": class_unet(1, out_channels=2),
        "num_class_embeds=6 where": class_unet(1, num_class_embeds=6),
        "pipeline's own denoiser": good,
        "not called like": DiTTransformer2DModel(
            num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1, num_layers=1, sample_size=8,
            patch_size=2, num_embeds_ada_norm=3),
    }
    for message, guide in cases.items():
        with pytest.raises(ValueError, match=message):
            pipe(**call, guidance=AutoGuidance(2.0, model=guide))
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        pipe(**call, guidance=AutoGuidance(2.0, model=class_unet(1), prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="guidance_scale"):
        pipe(**call, guidance="autoguidance", guidance_scale=-1.0)


# -- attach --------------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    return tiny_sd_components(tmp_path_factory.mktemp("sd"))


def sd_pipeline(components) -> StableDiffusionPipeline:
    scheduler = components["scheduler"]
    pipe = StableDiffusionPipeline(**{**components, "scheduler": type(scheduler).from_config(scheduler.config)})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def autoguidance_hook(bad, w):
    """The plain pipeline's UNet (called on the conditional rows only at guidance_scale 1) returns D_0 + w (D_1 - D_0)."""

    def hook(module, args, kwargs, output):
        good = output[0] if isinstance(output, tuple) else output.sample
        worse = bad(*args, **{**kwargs, "return_dict": False})[0]
        guided = worse + w * (good - worse)
        return (guided,) if isinstance(output, tuple) else type(output)(sample=guided)

    return hook


def test_autoguidance_through_attach_equals_a_hooked_plain_pipeline(sd):
    pipe = sd_pipeline(sd)
    bad = sd_unet(1)
    args = dict(prompt=["a red cat", "a dog"], num_inference_steps=STEPS, output_type="latent")
    handle = pipe.unet.register_forward_hook(autoguidance_hook(bad, 2.5), with_kwargs=True)
    try:
        expected = pipe(**args, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    finally:
        handle.remove()
    with attach(pipe, AutoGuidance(2.5, model=bad, prediction_type="epsilon")) as attached, \
            Rows(main=pipe.unet, guiding=bad) as counted:
        got = pipe(**args, guidance_scale=7.5, generator=torch.Generator().manual_seed(0)).images
    assert (got - expected).abs().max() <= TOLERANCE * float(expected.abs().max())
    assert counted.rows == {"main": [2] * STEPS, "guiding": [2] * STEPS}  # no unconditional rows
    run = attached.last_run
    assert run.nfe == 2 * STEPS and run.nfe_per_network == {"main": STEPS, "guiding": STEPS}
    plain = pipe(**args, guidance_scale=1.0, generator=torch.Generator().manual_seed(0)).images
    assert (plain - got).abs().max() > 1e-3


def test_attach_refuses_a_mismatched_guiding_model_at_attach_time(sd):
    pipe = sd_pipeline(sd)
    with pytest.raises(ValueError, match="cross_attention_dim=16 where"):
        attach(pipe, AutoGuidance(2.0, model=sd_unet(1, cross_attention_dim=16)))
    with pytest.raises(ValueError, match="predicts 'v_prediction'"):
        attach(pipe, AutoGuidance(2.0, model=sd_unet(1), prediction_type="v_prediction"))
    with pytest.raises(ValueError, match="not called like"):
        attach(pipe, AutoGuidance(2.0, model=class_unet(1)))
    assert type(pipe) is StableDiffusionPipeline  # nothing was attached
