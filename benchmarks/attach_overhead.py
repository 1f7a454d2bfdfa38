"""Wall time of a diffusers pipeline with an attached rule against the plain pipeline, side by side.

The pipeline is diffusers' own ``StableDiffusionPipeline`` (DDIM) around a ``UNet2DConditionModel`` of the SD-1.5
layout (4 levels, 2 layers per block, cross attention in the first three) with reduced widths and random weights, a
small CLIP text encoder and VAE (no download). Candidates, timed round-robin in one run (interleaved, so load on a
shared machine hits them alike), ``output_type="latent"`` so the denoising loop dominates:

* ``plain CFG``: ``pipe(prompt, guidance_scale=7.5)``, no attachment;
* ``attached CFG``: ``attach(pipe, CFG(7.5))``: the same two rows per step, through our interception;
* ``attached APG``: APG (w 7.5, parallel_scale 0, momentum -0.5, size-scaled clip);
* ``attached AG``: AdaptiveGuidance(CFG(7.5)) at a threshold calibrated on this model so that every sample switches
  after half of the steps: fewer rows, so it should be faster than plain CFG;
* ``attached CFG+TAG``: ``[CFG(7.5), TAG(1.15)]``.

Each row gives the median and best seconds per call over ``--repeats`` rounds and the ratio of medians to plain CFG.
Target: attached CFG within 3 % of plain CFG.

    python -m benchmarks.attach_overhead [--repeats 7] [--steps 20] [--size 32] [--threads 2] [--smoke]
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import StableDiffusionPipeline

from benchmarks.sd_layout import PROMPTS, SCALE, pipeline
from guidance import APG, CFG, TAG, AdaptiveGuidance, Guidance
from pipelines import attach

def calibrated_ag(pipe: StableDiffusionPipeline, call: Callable[[], object], steps: int) -> AdaptiveGuidance:
    """AG whose threshold makes every sample switch after step ``steps // 2`` on this model (gamma measured once)."""
    probe = AdaptiveGuidance(CFG(SCALE), record_only=True, reduce="per-sample")
    with attach(pipe, probe):
        call()
    threshold = float(probe.gamma_history[steps // 2].min())
    return AdaptiveGuidance(CFG(SCALE), threshold=min(max(threshold, 1e-6), 1.0), reduce="per-sample")


def main(argv: list[str] | None = None) -> list[dict[str, float]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--size", type=int, default=32, help="latent size (32: 256 px images)")
    parser.add_argument("--width", type=int, default=64, help="base channels of the UNet (SD-1.5: 320)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--smoke", action="store_true", help="a tiny, fast run (tests)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/attach_overhead"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.repeats, args.steps, args.size, args.width, args.threads = 1, 4, 8, 32, 1
    torch.set_num_threads(args.threads)
    pipe = pipeline(args.width, args.size, args.workdir / "tokenizer", cross_attention_dim=64)

    def call(**kwargs: object) -> object:
        return pipe(PROMPTS, num_inference_steps=args.steps, output_type="latent",
                    generator=torch.Generator().manual_seed(0), **kwargs)

    rules: dict[str, Guidance | None] = {
        "plain CFG": None,
        "attached CFG": CFG(SCALE),
        "attached APG": APG(SCALE, parallel_scale=0.0, momentum=-0.5),
        "attached AG": calibrated_ag(pipe, call, args.steps),
        "attached CFG+TAG": [CFG(SCALE), TAG(1.15)],
    }
    times: dict[str, list[float]] = {name: [] for name in rules}
    nfe: dict[str, float] = {"plain CFG": 2.0 * args.steps}
    call(guidance_scale=SCALE)  # warm-up
    for _ in range(args.repeats):
        for name, rule in rules.items():
            if rule is None:
                start = time.perf_counter()
                call(guidance_scale=SCALE)
                times[name].append(time.perf_counter() - start)
                continue
            with attach(pipe, rule) as handle:
                start = time.perf_counter()
                call()
                times[name].append(time.perf_counter() - start)
            nfe[name] = float(handle.last_run.nfe)
    base = statistics.median(times["plain CFG"])
    rows = []
    print(f"SD-1.5-layout UNet, width {args.width}, {args.size}x{args.size} latents, batch {len(PROMPTS)}, "
          f"DDIM {args.steps} steps, {args.threads} threads, {args.repeats} interleaved rounds")
    print("| candidate | NFE / image | median s | best s | median / plain CFG |")
    print("|---|---|---|---|---|")
    for name, samples in times.items():
        median = statistics.median(samples)
        rows.append({"name": name, "nfe": nfe[name], "median": median, "best": min(samples), "ratio": median / base})
        print(f"| {name} | {nfe[name]:g} | {median:.3f} | {min(samples):.3f} | {median / base:.3f} |")
    return rows


if __name__ == "__main__":
    main()
