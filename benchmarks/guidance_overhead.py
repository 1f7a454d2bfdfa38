"""Cost of the guidance combine step: our CFG and APG against diffusers' APG, and against one SD-1.5 UNet forward.

All candidates get the same float32 CPU tensors (SD-size latents, batch 2x4x64x64 and 4x4x128x128) and are timed
round-robin in one run (interleaved, so load on a shared machine hits them alike); the tables give the median and the
best of ``--repeats`` calls and the ratios between them. APG settings: w = 7.5 (paper form), parallel_scale = 0
(diffusers' eta), beta = -0.5 and r = 15 * sqrt(N / 65536) (our size-scaled default); diffusers is called with
``use_original_formulation=True`` at w - 1, which is the same rule (checked: the outputs agree to ~1e-7), so both do
the same work:

* ``CFG``: ``CFG(w).combine`` on epsilon predictions;
* ``APG eps``: ``APG.combine`` on epsilon predictions, including the epsilon -> x0 -> epsilon conversions;
* ``APG x0``: ``APG.combine`` on x0 predictions: difference, momentum, clip, projection (diffusers' work exactly);
* ``diffusers fn``: ``diffusers.guiders.adaptive_projected_guidance.normalized_guidance`` with a ``MomentumBuffer``;
* ``diffusers guider``: the ``AdaptiveProjectedGuidance`` guider object's ``forward``;
* ``float64 listing``: Algorithm 1 with the whole tensors in float64 (what diffusers and our previous version did).

The precision row gives each APG's relative L2 error against the float64 listing run on float64 inputs. The UNet part
builds a ``UNet2DConditionModel`` from the published SD-1.5 UNet config with random weights (no download) and times
``--unet-forwards`` forwards at 2x4x64x64 (one image's cond + uncond pair). The combine at 2x4x64x64 handles two
images, whose CFG step needs a batch-4 forward, so the fractions printed are upper bounds (about twice the real one).

    python -m benchmarks.guidance_overhead [--repeats 200] [--unet-forwards 2] [--no-unet]
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from collections.abc import Callable

import torch
from diffusers import UNet2DConditionModel
from diffusers.guiders import AdaptiveProjectedGuidance
from diffusers.guiders.adaptive_projected_guidance import (
    MomentumBuffer,
    normalized_guidance,
)

from guidance import APG, CFG
from guidance.base import Step

SHAPES = [(2, 4, 64, 64), (4, 4, 128, 128)]
SCALE, PARALLEL_SCALE, MOMENTUM = 7.5, 0.0, -0.5
SIGMA = 0.6  # a mid-schedule VP noise level for the epsilon <-> x0 conversions

#: the published SD-1.5 UNet config (runwayml/stable-diffusion-v1-5, unet/config.json)
SD15_UNET = {
    "sample_size": 64,
    "in_channels": 4,
    "out_channels": 4,
    "layers_per_block": 2,
    "block_out_channels": (320, 640, 1280, 1280),
    "down_block_types": ("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    "up_block_types": ("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    "cross_attention_dim": 768,
    "attention_head_dim": 8,
    "norm_num_groups": 32,
    "norm_eps": 1e-5,
    "act_fn": "silu",
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "downsample_padding": 1,
    "mid_block_scale_factor": 1,
    "center_input_sample": False,
}


def step_for(sample: torch.Tensor, prediction_type: str) -> Step:
    return Step(index=0, num_steps=50, evaluation=0, first_stage=True, timestep=torch.tensor(500),
                alpha=math.sqrt(1 - SIGMA**2), sigma=SIGMA, sample=sample, prediction_type=prediction_type)


def listing_float64(cond: torch.Tensor, uncond: torch.Tensor, threshold: float) -> torch.Tensor:
    """Algorithm 1 for one evaluation (momentum buffer empty), whole tensors in float64."""
    c, d = cond.double(), (cond - uncond).double()
    dims = tuple(range(1, c.ndim))
    d = d * torch.clamp(threshold / torch.linalg.vector_norm(d, dim=dims, keepdim=True), max=1.0)
    unit = c / torch.linalg.vector_norm(c, dim=dims, keepdim=True)
    parallel = (d * unit).sum(dims, keepdim=True) * unit
    return c + (SCALE - 1) * ((d - parallel) + PARALLEL_SCALE * parallel)


def interleaved_times(candidates: dict[str, Callable[[], object]], repeats: int) -> dict[str, list[float]]:
    """Seconds per call of every candidate, measured round-robin after two warm-up calls each."""
    for fn in candidates.values():
        fn(), fn()
    times: dict[str, list[float]] = {name: [] for name in candidates}
    for _ in range(repeats):
        for name, fn in candidates.items():
            start = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - start)
    return times


def relative_error(out: torch.Tensor, reference: torch.Tensor) -> float:
    return float((out.double() - reference).norm() / reference.norm())


def combine_candidates(shape: tuple[int, ...]) -> tuple[dict[str, Callable[[], object]], dict[str, float]]:
    """The timed callables for one shape and their precision against the float64 listing."""
    gen = torch.Generator().manual_seed(0)
    x0_cond = torch.randn(shape, generator=gen)
    x0_uncond = x0_cond + 0.5 * torch.randn(shape, generator=gen)
    x = math.sqrt(1 - SIGMA**2) * x0_cond + SIGMA * torch.randn(shape, generator=gen)
    eps_step, x0_step = step_for(x, "epsilon"), step_for(x, "sample")
    eps = {"cond": eps_step.from_x0(x0_cond), "uncond": eps_step.from_x0(x0_uncond)}
    x0 = {"cond": x0_cond, "uncond": x0_uncond}
    threshold = APG().threshold_for(x0_cond)

    def apg() -> APG:
        return APG(SCALE, parallel_scale=PARALLEL_SCALE, norm_threshold=threshold, momentum=MOMENTUM)

    cfg, apg_eps, apg_x0 = CFG(SCALE), apg(), apg()
    buffer = MomentumBuffer(MOMENTUM)
    guider = AdaptiveProjectedGuidance(
        guidance_scale=SCALE - 1, adaptive_projected_guidance_momentum=MOMENTUM,
        adaptive_projected_guidance_rescale=threshold, eta=PARALLEL_SCALE, use_original_formulation=True,
    )
    guider.set_state(step=0, num_inference_steps=50, timestep=torch.tensor(500))
    guider.momentum_buffer = MomentumBuffer(MOMENTUM)  # what the guider's prepare_inputs does at step 0

    reference = listing_float64(x0_cond.double(), x0_uncond.double(), threshold)
    errors = {
        "APG x0": relative_error(apg().combine(x0, x0_step), reference),
        "APG eps": relative_error(eps_step.to_x0(apg().combine(eps, eps_step)), reference),
        "diffusers fn": relative_error(
            normalized_guidance(
                x0_cond, x0_uncond, SCALE - 1, MomentumBuffer(MOMENTUM), PARALLEL_SCALE, threshold, True
            ),
            reference,
        ),
        "float64 listing": relative_error(listing_float64(x0_cond, x0_uncond, threshold), reference),
    }
    candidates = {
        "CFG": lambda: cfg.combine(eps, eps_step),
        "APG eps": lambda: apg_eps.combine(eps, eps_step),
        "APG x0": lambda: apg_x0.combine(x0, x0_step),
        "diffusers fn": lambda: normalized_guidance(
            x0_cond, x0_uncond, SCALE - 1, buffer, PARALLEL_SCALE, threshold, True
        ),
        "diffusers guider": lambda: guider.forward(x0_cond, x0_uncond),
        "float64 listing": lambda: listing_float64(x0_cond, x0_uncond, threshold),
    }
    return candidates, errors


def time_unet(forwards: int) -> float:
    """Median seconds of one SD-1.5 UNet forward at 2x4x64x64 (random weights), after one warm-up forward."""
    torch.manual_seed(0)
    unet = UNet2DConditionModel(**SD15_UNET).eval()
    sample = torch.randn(2, 4, 64, 64)
    text = torch.randn(2, 77, 768)
    times = []
    with torch.inference_mode():
        for i in range(forwards + 1):
            start = time.perf_counter()
            unet(sample, torch.tensor(500), encoder_hidden_states=text)
            if i:
                times.append(time.perf_counter() - start)
    return statistics.median(times)


def fmt_ms(seconds: float) -> str:
    return f"{seconds * 1e3:.3f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per candidate and shape")
    parser.add_argument("--unet-forwards", type=int, default=2, help="timed SD-1.5 UNet forwards (after a warm-up)")
    parser.add_argument("--no-unet", action="store_true", help="skip the UNet forward")
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    threads = torch.get_num_threads()
    print(f"torch {torch.__version__}, {threads} threads, float32 CPU, {args.repeats} interleaved calls")

    medians: dict[tuple[int, ...], dict[str, float]] = {}
    for shape in SHAPES:
        candidates, errors = combine_candidates(shape)
        times = interleaved_times(candidates, args.repeats)
        med = {name: statistics.median(t) for name, t in times.items()}
        best = {name: min(t) for name, t in times.items()}
        medians[shape] = med
        print(f"\n### combine at {'x'.join(map(str, shape))} (ms; ratio = time / our APG x0)")
        print("| candidate | median ms | best ms | median ratio | best ratio | rel. error vs float64 |")
        print("|---|---|---|---|---|---|")
        for name in candidates:
            error = f"{errors[name]:.1e}" if name in errors else "-"
            print(f"| {name} | {fmt_ms(med[name])} | {fmt_ms(best[name])} | {med[name] / med['APG x0']:.2f} | "
                  f"{best[name] / best['APG x0']:.2f} | {error} |")
        print(f"diffusers fn / our APG x0: {med['diffusers fn'] / med['APG x0']:.2f}x (median), "
              f"{best['diffusers fn'] / best['APG x0']:.2f}x (best); "
              f"diffusers guider / our APG x0: {med['diffusers guider'] / med['APG x0']:.2f}x (median)")

    if args.no_unet:
        return
    forward = time_unet(args.unet_forwards)
    shape = SHAPES[0]
    print(f"\n### combine vs one SD-1.5 UNet forward at {'x'.join(map(str, shape))} "
          f"(random weights; median of {args.unet_forwards} forwards: {forward:.2f} s)")
    print("| candidate | combine ms | fraction of one forward |")
    print("|---|---|---|")
    for name in ("CFG", "APG eps", "APG x0", "diffusers fn", "diffusers guider"):
        print(f"| {name} | {fmt_ms(medians[shape][name])} | {medians[shape][name] / forward:.1e} |")


if __name__ == "__main__":
    main()
