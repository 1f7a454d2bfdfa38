"""``attach(pipe, rule)`` on unmodified diffusers pipelines, against the plain pipeline and independent references.

References: the plain diffusers pipeline itself (CFG parity, detach, interrupt, CFG cutoff), and for APG and TAG a
second implementation written here from the papers, hooked into the *plain* pipeline (a forward hook on its UNet for
APG's Algorithm 1 in x0 space, a wrapper of its scheduler's step for TAG's post-step rule), so our modules are not
part of the reference. Evaluations are counted by a forward pre-hook of the test's own on the denoiser.
"""

from __future__ import annotations

import functools
import json

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMPipeline,
    EDMEulerScheduler,
    EulerDiscreteScheduler,
    FluxPipeline,
    KDPM2DiscreteScheduler,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3Pipeline,
    StableDiffusionControlNetPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionXLControlNetPipeline,
    StableDiffusionXLImg2ImgPipeline,
    StableDiffusionXLInpaintPipeline,
    StableDiffusionXLPipeline,
    UNet2DConditionModel,
    UNet2DModel,
)
from diffusers.callbacks import SDCFGCutoffCallback

from guidance import APG, CFG, NLG, TAG, AdaptiveGuidance, GFCG
from pipelines import GuidedStableDiffusionPipeline, attach
from tiny import (  # noqa: F401
    one_thread,
    tiny_controlnet,
    tiny_flux_components,
    tiny_inpainting_unet,
    tiny_sd3_components,
    tiny_sdxl_controlnet,
)

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
TOLERANCE = 1e-5
#: Flux through attach answers the negative prompt's call with u' = (s c - g) / (s - 1); the parent's u' + s (c - u')
#: then gives g up to float32 rounding. The plain Flux pipeline's own run-to-run noise on this CPU is 0 (asserted
#: below), so the bound is that rounding: measured 3e-7 on the decoded image.
FLUX_TOLERANCE = 2e-6


@pytest.fixture(scope="module")
def image():
    return torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(5))


def build(cls, components: dict, **extra):
    scheduler = components["scheduler"]
    pipe = cls(**{**components, "scheduler": type(scheduler).from_config(scheduler.config), **extra})
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe, seed: int = 0, **kwargs):
    kwargs = {"num_inference_steps": STEPS, "output_type": "np", **kwargs}
    return pipe(generator=torch.Generator().manual_seed(seed), **kwargs).images


class RowCounter:
    """Forward calls and rows the denoiser processes (a forward pre-hook, removed on exit)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module, self.rows = module, []

    def __enter__(self) -> RowCounter:
        def count(module, args, kwargs):
            sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
            self.rows.append(sample.shape[0])

        self.handle = self.module.register_forward_pre_hook(count, with_kwargs=True)
        return self

    def __exit__(self, *exc) -> None:
        self.handle.remove()


# -- every family: attached CFG equals the plain pipeline --------------------------------------------------------
def families(sd, sdxl, image, tmp_path):
    mask = torch.zeros(1, 1, 32, 32)
    mask[..., 8:24, 8:24] = 1
    return {
        "sd": (build(StableDiffusionPipeline, sd), {"prompt": ["a red cat", "a dog"], "negative_prompt": ["x", "y"]}),
        "sd-img2img": (build(StableDiffusionImg2ImgPipeline, sd), {"prompt": "a cat", "image": image, "strength": 0.7,
                                                                  "num_inference_steps": 4}),
        "sd-inpaint": (build(StableDiffusionInpaintPipeline, sd, unet=tiny_inpainting_unet()),
                       {"prompt": "a cat", "image": image, "mask_image": mask}),
        "sd-controlnet": (build(StableDiffusionControlNetPipeline, sd, controlnet=tiny_controlnet()),
                          {"prompt": "a cat", "image": image, "negative_prompt": "blurry"}),
        "sdxl": (build(StableDiffusionXLPipeline, sdxl), {"prompt": ["a red cat", "a dog"]}),
        "sdxl-img2img": (build(StableDiffusionXLImg2ImgPipeline, sdxl, requires_aesthetics_score=False),
                         {"prompt": "a cat", "image": image, "strength": 0.8, "num_inference_steps": 4}),
        "sdxl-inpaint": (build(StableDiffusionXLInpaintPipeline, sdxl, requires_aesthetics_score=False),
                         {"prompt": "a cat", "image": image, "mask_image": mask, "strength": 0.8,
                          "num_inference_steps": 4}),
        "sdxl-controlnet": (build(StableDiffusionXLControlNetPipeline, sdxl, controlnet=tiny_sdxl_controlnet()),
                            {"prompt": ["a red cat", "a dog"], "image": image}),
        "sd3": (build(StableDiffusion3Pipeline, tiny_sd3_components(tmp_path)),
                {"prompt": "a cat", "negative_prompt": "dog", "max_sequence_length": 16}),
        "sd3-img2img": (build(StableDiffusion3Img2ImgPipeline, tiny_sd3_components(tmp_path)),
                        {"prompt": "a cat", "image": image, "strength": 0.7, "num_inference_steps": 4,
                         "max_sequence_length": 16}),
    }


FAMILIES = ["sd", "sd-img2img", "sd-inpaint", "sd-controlnet", "sdxl", "sdxl-img2img", "sdxl-inpaint",
            "sdxl-controlnet", "sd3", "sd3-img2img"]


@pytest.mark.parametrize("family", FAMILIES)
def test_attached_cfg_equals_the_plain_pipeline(sd, sdxl, image, tmp_path, family):
    pipe, args = families(sd, sdxl, image, tmp_path)[family]
    expected = run(pipe, guidance_scale=4.0, **args)
    with attach(pipe, CFG(4.0)) as handle, RowCounter(pipe.unet if hasattr(pipe, "unet") else pipe.transformer) as c:
        got = run(pipe, guidance_scale=9.0, **args)  # the rule's scale governs, whatever the call passes
    assert abs(got - expected).max() <= TOLERANCE
    batch = len(got)
    evaluations = len(c.rows)
    assert handle.last_run.nfe == sum(c.rows) / batch == 2 * evaluations
    assert handle.last_run.model_calls == evaluations


def test_flux_true_cfg_through_attach(tmp_path):
    pipe = build(FluxPipeline, tiny_flux_components(tmp_path))
    args = {"prompt": "a cat", "negative_prompt": "a dog", "height": 16, "width": 16, "max_sequence_length": 16}
    expected = run(pipe, true_cfg_scale=4.0, **args)
    assert abs(run(pipe, true_cfg_scale=4.0, **args) - expected).max() == 0  # plain run-to-run noise here
    with attach(pipe, CFG(4.0)) as handle, RowCounter(pipe.transformer) as counter:
        got = run(pipe, true_cfg_scale=1.5, **args)
    assert abs(got - expected).max() <= FLUX_TOLERANCE
    assert handle.last_run.nfe == sum(counter.rows) == 2 * STEPS and handle.last_run.model_calls == 2 * STEPS
    # a rule that needs no unconditional branch: one call per step, whatever true_cfg_scale says
    with attach(pipe, TAG(1.0)) as handle, RowCounter(pipe.transformer) as counter:
        unguided = run(pipe, true_cfg_scale=4.0, **args)
    assert len(counter.rows) == STEPS and handle.last_run.nfe == STEPS
    assert abs(unguided - run(pipe, **args)).max() <= TOLERANCE


def test_flux_uncond_is_negative_prompt_or_empty(tmp_path):
    """A rule that needs the unconditional branch gets it although the call asks for no true CFG: the empty
    negative prompt, encoded as the parent encodes negatives."""
    pipe = build(FluxPipeline, tiny_flux_components(tmp_path))
    args = {"prompt": "a cat", "height": 16, "width": 16, "max_sequence_length": 16}
    expected = run(pipe, true_cfg_scale=3.0, negative_prompt="", **args)
    with attach(pipe, CFG(3.0)):
        got = run(pipe, **args)
    assert abs(got - expected).max() <= FLUX_TOLERANCE


# -- APG against Algorithm 1 written here, on the plain pipeline ----------------------------------------------------
def apg_reference_hook(scheduler, scale: float, eta: float, threshold: float, momentum: float):
    """A forward hook on the plain pipeline's UNet: Algorithm 1 of Sadat et al. in x0 space, float64, DDIM only."""
    state = {"buffer": None}

    def hook(module, args, kwargs, output):
        x = (args[0] if args else kwargs["sample"]).double()
        t = args[1] if len(args) > 1 else kwargs["timestep"]
        abar = scheduler.alphas_cumprod[int(t)].double()
        eps_u, eps_c = output[0].double().chunk(2)
        x_half = x.chunk(2)[1]
        x0_u, x0_c = ((x_half - (1 - abar).sqrt() * e) / abar.sqrt() for e in (eps_u, eps_c))
        diff = x0_c - x0_u
        buffer = diff if state["buffer"] is None else diff + momentum * state["buffer"]
        state["buffer"] = buffer
        norm = buffer.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        update = buffer * torch.clamp(threshold / norm, max=1.0)
        unit = x0_c / x0_c.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        parallel = (update * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
        guided = x0_c + (scale - 1) * ((update - parallel) + eta * parallel)
        eps = (x_half - abar.sqrt() * guided) / (1 - abar).sqrt()
        return (torch.cat([eps, eps]).to(output[0].dtype),)

    return hook


@pytest.mark.parametrize("family", ["sd", "sd-img2img", "sd-controlnet"])
def test_apg_through_attach_equals_algorithm_1(sd, sdxl, image, tmp_path, family):
    pipe, args = families(sd, sdxl, image, tmp_path)[family]
    assert isinstance(pipe.scheduler, DDIMScheduler)
    config = {"scale": 5.0, "eta": 0.0, "threshold": 2.0, "momentum": -0.5}
    handle = pipe.unet.register_forward_hook(apg_reference_hook(pipe.scheduler, **config), with_kwargs=True)
    try:
        expected = run(pipe, guidance_scale=5.0, output_type="latent", **args)
    finally:
        handle.remove()
    rule = APG(config["scale"], parallel_scale=config["eta"], norm_threshold=config["threshold"],
               momentum=config["momentum"])
    with attach(pipe, rule):
        got = run(pipe, output_type="latent", **args)
    assert abs(got - expected).max() <= TOLERANCE * float(expected.abs().max())
    assert abs(got - run(pipe, guidance_scale=5.0, output_type="latent", **args)).max() > 1e-3  # APG is not CFG


# -- AG: fewer rows after the switch --------------------------------------------------------------------------------
def test_adaptive_guidance_processes_fewer_rows_after_the_switch(sd):
    pipe = build(StableDiffusionPipeline, sd, scheduler=EulerDiscreteScheduler.from_config(sd["scheduler"].config))
    args = {"prompt": ["a red cat", "a dog"], "num_inference_steps": 6}
    probe = AdaptiveGuidance(CFG(5.0), record_only=True, reduce="per-sample")
    with attach(pipe, probe):
        run(pipe, **args)
    gammas = torch.stack(probe.gamma_history)  # [steps, B]
    threshold = float(gammas[2].min())  # every sample has crossed it by step 2
    rule = AdaptiveGuidance(CFG(5.0), threshold=threshold, reduce="per-sample")
    with attach(pipe, rule) as handle, RowCounter(pipe.unet) as counter:
        run(pipe, **args)
    assert len(counter.rows) == 6 and counter.rows[0] == 4 and counter.rows[-1] == 2
    assert handle.last_run.nfe == sum(counter.rows) / 2 < 2 * 6
    expected = [6 + (k + 1) for k in rule.sample_switch_steps]  # T + k + 1 evaluations for a switch after step k
    assert handle.last_run.nfe_per_sample == expected


# -- TAG against the post-step rule written here; NLG's evaluation count -------------------------------------------
def tag_reference_step(scheduler, eta: float) -> None:
    """Wrap the plain scheduler's step: x_TAG = x + P Delta + eta P_perp Delta, P the projection onto the unit x."""
    original = scheduler.step

    @functools.wraps(original)
    def step(model_output, timestep, sample, *args, **kwargs):
        out = original(model_output, timestep, sample, *args, **kwargs)
        x, after = sample.double(), out[0].double()
        unit = x / (x.flatten(1).norm(dim=1).view(-1, 1, 1, 1) + 1e-8)
        delta = after - x
        radial = (delta * unit).flatten(1).sum(1).view(-1, 1, 1, 1) * unit
        return ((x + radial + eta * (delta - radial)).to(out[0].dtype), *out[1:])

    scheduler.step = step


def test_tag_through_attach(sd):
    pipe = build(StableDiffusionPipeline, sd)
    args = {"prompt": "a red cat", "output_type": "latent"}
    plain = run(pipe, guidance_scale=5.0, **args)
    with attach(pipe, [CFG(5.0), TAG(1.0)]) as handle:
        assert torch.equal(run(pipe, **args), plain)  # eta = 1 is the base sampler, bit for bit
    assert handle.last_run.nfe == 2 * STEPS  # TAG costs no evaluation
    reference = build(StableDiffusionPipeline, sd)
    tag_reference_step(reference.scheduler, 1.15)
    expected = run(reference, guidance_scale=5.0, **args)
    with attach(pipe, [CFG(5.0), TAG(1.15)]):
        got = run(pipe, **args)
    assert abs(got - expected).max() <= TOLERANCE * float(expected.abs().max())
    assert abs(got - plain).max() > 1e-3


def test_nlg_through_attach_counts_its_refinement(sd):
    pipe = build(StableDiffusionPipeline, sd)
    with attach(pipe, [NLG(steps=2, norm_threshold=1.0), CFG(3.0)]) as handle, RowCounter(pipe.unet) as counter:
        refined = run(pipe, prompt=["a cat", "a dog"], output_type="latent")
    assert handle.last_run.nfe == 2 * STEPS + 2 * 2 == sum(counter.rows) / 2
    assert [entry["step"] for entry in handle.last_run.trace] == [-1, -1, 0, 1, 2]
    plain = run(pipe, prompt=["a cat", "a dog"], output_type="latent", guidance_scale=3.0)
    assert abs(refined - plain).max() > 1e-3  # the refined noise changed the sample
    with pytest.raises(ValueError, match="refines the initial noise.*noised image"):
        attach(build(StableDiffusionImg2ImgPipeline, sd), NLG())


# -- detach, repeatability, interrupt, cutoff, saving ---------------------------------------------------------------
def test_detach_restores_the_pipeline_exactly(sd):
    pipe = build(StableDiffusionPipeline, sd)
    before = run(pipe, prompt="a cat", guidance_scale=5.0)
    handle = attach(pipe, APG(5.0))
    assert type(pipe) is not StableDiffusionPipeline and isinstance(pipe, StableDiffusionPipeline)
    assert type(pipe).__name__ == "StableDiffusionPipeline"
    first, nfe_first = run(pipe, prompt="a cat"), handle.last_run.nfe
    second, nfe_second = run(pipe, prompt="a cat"), handle.last_run.nfe
    assert (first == second).all() and nfe_first == nfe_second == 2 * STEPS  # no state leaks between calls
    assert type(pipe.unet) is UNet2DConditionModel and "step" not in pipe.scheduler.__dict__  # only during calls
    handle.detach()
    assert type(pipe) is StableDiffusionPipeline and "_guidance" not in pipe.__dict__
    assert type(pipe.unet) is UNet2DConditionModel and "forward" not in pipe.unet.__dict__
    assert not pipe.unet._forward_pre_hooks and not pipe.unet._forward_hooks and "step" not in pipe.scheduler.__dict__
    assert (run(pipe, prompt="a cat", guidance_scale=5.0) == before).all()


def test_context_manager_detaches_when_the_call_raises(sd):
    pipe = build(StableDiffusionPipeline, sd)
    with pytest.raises(ValueError, match="num_inference_steps"), attach(pipe, CFG(3.0)):
        run(pipe, prompt="a cat", num_inference_steps=0)
    assert type(pipe) is StableDiffusionPipeline
    def fail(pipe, i, t, tensors):
        raise RuntimeError("stop")

    with pytest.raises(RuntimeError, match="stop"), attach(pipe, CFG(3.0)):
        run(pipe, prompt="a cat", callback_on_step_end=fail)  # raises inside the parent's loop
    assert type(pipe) is StableDiffusionPipeline and type(pipe.unet) is UNet2DConditionModel
    assert "step" not in pipe.scheduler.__dict__


def test_interrupt_from_a_callback(sd):
    def stop_after_one(pipe, i, t, tensors):
        if i == 1:
            pipe._interrupt = True
        return {}

    pipe = build(StableDiffusionPipeline, sd)
    expected = run(pipe, prompt="a cat", guidance_scale=4.0, callback_on_step_end=stop_after_one)
    with attach(pipe, CFG(4.0)) as handle:
        got = run(pipe, prompt="a cat", callback_on_step_end=stop_after_one)
    assert (got == expected).all() and handle.last_run.nfe == 2 * 2


def test_cfg_cutoff_callback_ends_guidance(sd):
    pipe = build(StableDiffusionPipeline, sd)
    args = {"prompt": "a cat", "num_inference_steps": 4}
    expected = run(pipe, guidance_scale=4.0, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), **args)
    with attach(pipe, CFG(4.0)) as handle:
        got = run(pipe, callback_on_step_end=SDCFGCutoffCallback(cutoff_step_ratio=None, cutoff_step_index=1), **args)
    assert abs(got - expected).max() <= TOLERANCE
    assert [sum(e["branches"].values()) for e in handle.last_run.trace] == [2, 2, 1, 1]


def test_save_pretrained_of_an_attached_pipeline_writes_the_plain_files(sd, tmp_path):
    pipe = build(StableDiffusionPipeline, sd)
    pipe.save_pretrained(tmp_path / "plain")
    with attach(pipe, APG(5.0)):
        run(pipe, prompt="a cat")
        pipe.save_pretrained(tmp_path / "attached")
    plain = sorted(p.relative_to(tmp_path / "plain") for p in (tmp_path / "plain").rglob("*") if p.is_file())
    attached = sorted(p.relative_to(tmp_path / "attached") for p in (tmp_path / "attached").rglob("*") if p.is_file())
    assert plain == attached
    for name in plain:
        assert (tmp_path / "plain" / name).read_bytes() == (tmp_path / "attached" / name).read_bytes(), name
    assert json.loads((tmp_path / "attached" / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"


# -- refusals at attach time ----------------------------------------------------------------------------------------
def test_what_attach_cannot_serve_is_refused_at_once(sd):
    class CustomLoop(StableDiffusionPipeline):
        def __call__(self, *args, **kwargs):
            return super().__call__(*args, **kwargs)

    with pytest.raises(ValueError, match="overrides StableDiffusionPipeline.__call__"):
        attach(build(CustomLoop, sd), CFG(3.0))
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(8, 8), norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))
    with pytest.raises(ValueError, match="unknown denoiser layout"):
        attach(DDPMPipeline(unet=unet, scheduler=DDIMScheduler()), CFG(3.0))
    torch.manual_seed(0)
    distilled = UNet2DConditionModel(**{**sd["unet"].config, "time_cond_proj_dim": 8})
    with pytest.raises(ValueError, match="time_cond_proj_dim"):
        attach(build(StableDiffusionPipeline, sd, unet=distilled), CFG(3.0))
    for scheduler, name in [(EDMEulerScheduler(), "EDM"), (KDPM2DiscreteScheduler(), "interpolated")]:
        with pytest.raises(ValueError, match=name):
            attach(build(StableDiffusionPipeline, sd, scheduler=scheduler), CFG(3.0))
    with pytest.raises(ValueError, match="needs the branch.*'ref'"):
        attach(build(StableDiffusionPipeline, sd), GFCG(classifier=torch.nn.Linear(2, 2)))
    pipe = build(StableDiffusionPipeline, sd)
    attach(pipe, CFG(3.0))
    with pytest.raises(ValueError, match="guided already"):
        attach(pipe, CFG(3.0))
    with pytest.raises(ValueError, match="guided already"):
        attach(build(GuidedStableDiffusionPipeline, sd), CFG(3.0))
    with pytest.raises(TypeError, match="diffusers pipeline"):
        attach(sd["unet"], CFG(3.0))


def test_a_scheduler_swapped_in_after_attach_is_checked_at_call_time(sd):
    pipe = build(StableDiffusionPipeline, sd)
    with attach(pipe, CFG(3.0)):
        pipe.scheduler = EDMEulerScheduler()
        with pytest.raises(ValueError, match="EDM"):
            run(pipe, prompt="a cat")


def test_call_arguments_that_would_change_the_rule_are_refused(sd):
    pipe = build(StableDiffusionPipeline, sd)
    with attach(pipe, CFG(3.0)), pytest.raises(ValueError, match="guidance_rescale is part of the attached rule"):
        run(pipe, prompt="a cat", guidance_rescale=0.5)


def test_guided_pipelines_read_guidance_strings_like_attach(sd):
    """``guidance="nlg+apg+tag"`` and ``name@key=value`` terms work in ``guidance=`` as in ``attach``."""
    pipe = build(GuidedStableDiffusionPipeline, sd)
    composed = pipe("a cat", guidance="nlg+apg+tag", guidance_scale=4.0, num_inference_steps=STEPS,
                    output_type="latent", generator=torch.Generator().manual_seed(0))
    explicit = pipe("a cat", guidance=[NLG(), APG(4.0), TAG()], num_inference_steps=STEPS, output_type="latent",
                    generator=torch.Generator().manual_seed(0))
    assert torch.equal(composed.images, explicit.images) and composed.nfe == explicit.nfe == 2 * STEPS + 2 * 20
    interval = pipe("a cat", guidance="cfg@interval=0,1", guidance_scale=4.0, num_inference_steps=STEPS,
                    output_type="latent")
    assert interval.nfe < 2 * STEPS  # outside (0, 1] only the conditional row is evaluated
    with pytest.raises(ValueError, match="takes no guidance_scale"):
        pipe("a cat", guidance="tag", guidance_scale=4.0, num_inference_steps=STEPS)


@pytest.mark.parametrize("family", ["sdxl", "flux"])
def test_autoguidance_through_attach_on_sdxl_and_flux(sdxl, tmp_path, family):
    """The guiding network gets its own batched forward per step (rows counted by pre-hooks on both networks), on
    SDXL's added conditioning and on Flux's sequential layout; w = 1 is the main network alone, bit for bit."""
    from guidance import AutoGuidance

    if family == "flux":
        pipe, args = build(FluxPipeline, tiny_flux_components(tmp_path)), {"height": 16, "width": 16,
                                                                             "max_sequence_length": 16}
    else:
        pipe, args = build(StableDiffusionXLPipeline, sdxl), {}
    main_network = pipe.transformer if family == "flux" else pipe.unet
    torch.manual_seed(123)  # the components were built from seed 0
    guide = type(main_network).from_config(main_network.config).eval()  # another random network of the same layout
    prompts = ["a red cat", "a dog"]
    with attach(pipe, AutoGuidance(2.0, model=guide)) as handle, RowCounter(main_network) as main_rows, \
            RowCounter(guide) as guide_rows:
        guided = run(pipe, prompt=prompts, output_type="latent", **args)
    assert main_rows.rows == guide_rows.rows == [2] * STEPS
    assert handle.last_run.nfe == 2 * STEPS and handle.last_run.nfe_per_network == {"main": STEPS, "guiding": STEPS}
    unguided = run(pipe, prompt=prompts, output_type="latent", guidance_scale=1.0, true_cfg_scale=1.0, **args)
    assert torch.isfinite(guided).all() and abs(guided - unguided).max() > 1e-4
    with attach(pipe, AutoGuidance(1.0, model=guide)), RowCounter(guide) as unused:
        assert torch.equal(run(pipe, prompt=prompts, output_type="latent", guidance_scale=1.0, true_cfg_scale=1.0,
                               **args), unguided)
    assert unused.rows == []
