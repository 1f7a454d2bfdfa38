"""Rules and attached pipelines under ``torch.compile``.

* The combine / after-step of CFG, APG, TAG and TAG-cfg trace as one graph (``fullgraph=True``: a graph break is an
  error) and the compiled function equals eager. The ``aot_eager`` backend traces through AOTAutograd exactly as
  inductor does, without generating C++ (seconds instead of minutes on this CPU).
* A compiled denoiser (``unet.compile()`` or ``torch.compile(unet)``) is compiled once for a 10-step attached run:
  no recompilation per step (counted by a counting backend).
"""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import StableDiffusionPipeline
from torch._dynamo.testing import CompileCounter

from guidance import APG, CFG, TAG, TAGCFG
from guidance.base import Step
from pipelines import attach
from tiny import one_thread, tiny_sd_components  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")


def record(sample: torch.Tensor, sigma: float = 0.6, evaluation: int = 0) -> Step:
    return Step(index=evaluation, num_steps=10, evaluation=evaluation, first_stage=True, timestep=torch.tensor(500),
                alpha=math.sqrt(1 - sigma**2), sigma=sigma, sample=sample, prediction_type="epsilon")


def tensors(seed: int = 0):
    generator = torch.Generator().manual_seed(seed)
    return [torch.randn(2, 4, 8, 8, generator=generator) for _ in range(3)]


@pytest.mark.parametrize(
    "make",
    [lambda: CFG(5.0), lambda: CFG(5.0, guidance_rescale=0.7), lambda: APG(5.0, momentum=-0.5, norm_threshold=1.0),
     lambda: TAGCFG(4.0, tangential_weight=1.5), lambda: TAGCFG(4.0, tangential_weight=1.5, adaptive=True)],
    ids=["cfg", "cfg-rescale", "apg", "tag-cfg", "tag-cfg-adaptive"],
)
def test_combine_compiles_as_one_graph_and_matches_eager(make):
    torch._dynamo.reset()
    eager_rule, compiled_rule = make(), make()
    compiled = torch.compile(compiled_rule.combine, fullgraph=True, backend="aot_eager")
    for evaluation in range(3):  # APG's momentum buffer carries state across calls
        cond, uncond, sample = tensors(evaluation)
        step = record(sample, sigma=0.8 - 0.2 * evaluation, evaluation=evaluation)
        expected = eager_rule.combine({"cond": cond, "uncond": uncond}, step)
        got = compiled({"cond": cond, "uncond": uncond}, step)
        assert torch.allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_tag_after_step_compiles_as_one_graph_and_matches_eager():
    torch._dynamo.reset()
    rule = TAG(1.15)
    compiled = torch.compile(rule.after_step, fullgraph=True, backend="aot_eager")
    before, after, _ = tensors(3)
    step = record(before)
    assert torch.allclose(compiled(before, after, step), rule.after_step(before, after, step), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("how", ["method", "wrapper"])
def test_a_compiled_denoiser_is_compiled_once_for_an_attached_run(tmp_path, how):
    torch._dynamo.reset()
    components = tiny_sd_components(tmp_path)
    pipe = StableDiffusionPipeline(**components)
    pipe.set_progress_bar_config(disable=True)
    args = {"prompt": "a cat", "num_inference_steps": 10, "output_type": "latent"}
    with attach(pipe, APG(5.0)):
        eager = pipe(generator=torch.Generator().manual_seed(0), **args).images
    counter = CompileCounter()
    if how == "method":
        pipe.unet.compile(backend=counter)
    else:
        pipe.unet = torch.compile(pipe.unet, backend=counter)
    with attach(pipe, APG(5.0)) as handle:
        compiled = pipe(generator=torch.Generator().manual_seed(0), **args).images
    assert counter.frame_count == 1 and handle.last_run.model_calls == 10
    assert torch.allclose(compiled, eager, atol=1e-5)
