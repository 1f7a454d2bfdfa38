"""CFG and APG on every scheduler family through the pipelines: finite images, and the reported NFE equals the
network evaluations actually made (counted by a hook on the UNet / transformer forward, rows / batch size)."""

from __future__ import annotations

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from guidance import APG, CFG
from pipelines import GuidedStableDiffusion3Pipeline, GuidedStableDiffusionPipeline
from tiny import one_thread, tiny_sd3_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

STEPS = 3
BATCH = 2
VP_SCHEDULERS = {
    "ddim": DDIMScheduler,
    "ddpm": DDPMScheduler,
    "euler": EulerDiscreteScheduler,
    "euler-ancestral": EulerAncestralDiscreteScheduler,
    "heun": HeunDiscreteScheduler,
    "dpm++2m": DPMSolverMultistepScheduler,
    "unipc": UniPCMultistepScheduler,
}
GUIDANCE = {"cfg": lambda: CFG(5.0), "apg": lambda: APG(5.0, momentum=-0.5, norm_threshold=1.0)}


class RowCounter:
    """Counts forward calls and the rows they process on ``module`` (a forward pre-hook; removed by ``close``)."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.rows = 0
        self.handle = module.register_forward_pre_hook(self._count, with_kwargs=True)

    def _count(self, module, args, kwargs) -> None:
        sample = args[0] if args else kwargs.get("sample", kwargs.get("hidden_states"))
        self.calls += 1
        self.rows += sample.shape[0]

    def close(self) -> None:
        self.handle.remove()


def generate(pipe, denoiser: torch.nn.Module, guidance, **kwargs):
    counter = RowCounter(denoiser)
    try:
        out = pipe(
            ["a red cat", "a dog"], num_inference_steps=STEPS, guidance=guidance, output_type="latent",
            generator=[torch.Generator().manual_seed(i) for i in range(BATCH)], **kwargs,
        )
    finally:
        counter.close()
    return out, counter


def sd_pipe(components: dict, scheduler_cls, prediction_type: str) -> GuidedStableDiffusionPipeline:
    scheduler = scheduler_cls.from_config(components["scheduler"].config, prediction_type=prediction_type)
    pipe = GuidedStableDiffusionPipeline(**{**components, "scheduler": scheduler})
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("scheduler", VP_SCHEDULERS)
@pytest.mark.parametrize("rule", GUIDANCE)
def test_vp_schedulers_give_finite_images_and_count_evaluations(sd, scheduler, prediction_type, rule):
    pipe = sd_pipe(sd, VP_SCHEDULERS[scheduler], prediction_type)
    out, counter = generate(pipe, pipe.unet, GUIDANCE[rule]())
    evaluations = len(pipe.scheduler.timesteps)  # 2N - 1 for Heun
    assert torch.isfinite(out.images).all()
    assert out.images.shape == (BATCH, 4, 16, 16)
    assert counter.calls == out.model_calls == evaluations  # one batched forward per evaluation
    assert out.nfe == counter.rows / BATCH == 2 * evaluations
    assert out.nfe_per_sample == [2 * evaluations] * BATCH


def test_heun_counts_two_stages_per_step_and_completed_steps(sd):
    pipe = sd_pipe(sd, HeunDiscreteScheduler, "epsilon")
    out, counter = generate(pipe, pipe.unet, CFG(5.0))
    assert len(pipe.scheduler.timesteps) == 2 * STEPS - 1
    assert out.nfe == counter.rows / BATCH == 2 * (2 * STEPS - 1)  # two branches, 2N - 1 evaluations each
    # completed-step index of every evaluation: both stages of a step share it; the last step is a single stage
    assert [entry["step"] for entry in out.trace] == [0, 0, 1, 1, 2]
    assert [entry["evaluation"] for entry in out.trace] == list(range(2 * STEPS - 1))
    assert all(entry["branches"] == {"uncond": BATCH, "cond": BATCH} for entry in out.trace)


def test_unguided_scale_counts_one_evaluation_per_step(sd):
    pipe = sd_pipe(sd, EulerDiscreteScheduler, "epsilon")
    out, counter = generate(pipe, pipe.unet, CFG(1.0))
    assert out.nfe == counter.rows / BATCH == STEPS
    assert all(entry["branches"] == {"cond": BATCH} for entry in out.trace)


@pytest.mark.parametrize("rule", GUIDANCE)
def test_flow_match_euler_on_sd3(tmp_path, rule):
    components = tiny_sd3_components(tmp_path, t5=False)
    components["scheduler"] = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = GuidedStableDiffusion3Pipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    out, counter = generate(pipe, pipe.transformer, GUIDANCE[rule](), max_sequence_length=16)
    assert torch.isfinite(out.images).all()
    assert counter.calls == out.model_calls == STEPS
    assert out.nfe == counter.rows / BATCH == 2 * STEPS
