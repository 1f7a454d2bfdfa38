"""Images per second of every rule against plain diffusers CFG, on an SD-1.5-architecture UNet (random weights).

For each dtype and batch size, the candidates run round-robin (interleaved, ``--repeats`` rounds) on one diffusers
``StableDiffusionPipeline`` with DDIM, ``output_type="latent"`` (the denoising loop; the VAE is not timed):

* ``plain CFG``: diffusers at ``guidance_scale=7.5``;
* ``Guided* CFG``: our ``GuidedStableDiffusionPipeline`` with ``guidance=None`` (the same call through ``guidance=``);
* ``cfg``, ``apg``, ``ag``, ``tag`` (with CFG), ``tag-cfg``, ``nlg`` (with CFG, 2 refinement iterations) attached
  with ``attach``; AG's threshold is calibrated on this model so that samples switch after half of the steps;
* ``gfcg`` (with CFG) through ``GuidedStableDiffusionPipeline`` with a 10-prompt label set and a small random
  classifier on the decoded estimate (so a VAE decode per step is part of its cost).

LinearAG is not timed (its coefficients must be fitted on the model; its per-step cost is AG's plus an affine
combination). Each row gives images/s (median over rounds), the ratio to plain CFG and the NFE per image.

    python -m benchmarks.gpu_throughput --device cuda [--dtypes float16 bfloat16] [--batches 1 8] [--steps 20]
    python -m benchmarks.gpu_throughput --smoke          # tiny CPU run (tests)

Full size is SD-1.5's UNet (base width 320, 64x64 latents: 512 px, cross attention 768).
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from benchmarks.sd_layout import PROMPTS, SCALE, pipeline
from guidance import APG, CFG, GFCG, NLG, TAG, TAGCFG, AdaptiveGuidance
from pipelines import GuidedStableDiffusionPipeline, attach

LABELS = [f"a photo of object {k}" for k in range(10)]


class TinyClassifier(torch.nn.Module):
    """A random 10-way classifier on pixels (GFCG's cost, not its quality)."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 4), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                       torch.nn.Linear(8, 10))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.net(images)


def candidates(pipe: Any, guided: Any, steps: int, batch: int, device: str) -> dict[str, Callable[[], float]]:
    """name -> a call that generates one batch and returns its NFE per image."""
    prompts = (PROMPTS * batch)[:batch]

    def generator() -> torch.Generator:
        return torch.Generator(device).manual_seed(0)

    def plain() -> float:
        pipe(prompts, num_inference_steps=steps, guidance_scale=SCALE, output_type="latent", generator=generator())
        return 2.0 * steps

    def through_guided(**kwargs: Any) -> Callable[[], float]:
        def call() -> float:
            out = guided(prompts, num_inference_steps=steps, output_type="latent", generator=generator(), **kwargs)
            return float(out.nfe)

        return call

    def attached(rule: Any) -> Callable[[], float]:
        def call() -> float:
            with attach(pipe, rule) as handle:
                pipe(prompts, num_inference_steps=steps, output_type="latent", generator=generator())
            return float(handle.last_run.nfe)

        return call

    probe = AdaptiveGuidance(CFG(SCALE), record_only=True, reduce="per-sample")
    attached(probe)()
    threshold = min(max(float(probe.gamma_history[steps // 2].min()), 1e-6), 1.0)
    classifier = TinyClassifier().to(device)
    targets = [k % len(LABELS) for k in range(len(prompts))]
    return {
        "plain CFG": plain,
        "Guided* CFG": through_guided(guidance_scale=SCALE),
        "cfg": attached(CFG(SCALE)),
        "apg": attached(APG(SCALE, parallel_scale=0.0, momentum=-0.5)),
        "ag": attached(AdaptiveGuidance(CFG(SCALE), threshold=threshold, reduce="per-sample")),
        "tag": attached([CFG(SCALE), TAG(1.15)]),
        "tag-cfg": attached(TAGCFG(SCALE, tangential_weight=1.0)),
        "nlg": attached([NLG(steps=2), CFG(SCALE)]),
        "gfcg": through_guided(
            guidance=GFCG(classifier=classifier, cfg_scale=SCALE), label_prompts=LABELS, target_labels=targets,
        ),
    }


def main(argv: list[str] | None = None) -> list[dict[str, Any]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--dtypes", nargs="+", default=["float16", "bfloat16"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1, 8])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--width", type=int, default=320, help="UNet base width (SD-1.5: 320)")
    parser.add_argument("--size", type=int, default=64, help="latent size (64: 512 px)")
    parser.add_argument("--smoke", action="store_true", help="tiny float32 CPU run (tests)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/gpu_throughput"))
    args = parser.parse_args(argv)
    if args.smoke:
        args.device, args.dtypes, args.batches, args.steps, args.repeats = "cpu", ["float32"], [1, 2], 2, 1
        args.width, args.size = 32, 8
    rows = []
    print(f"SD-1.5-architecture UNet, width {args.width}, {args.size}x{args.size} latents, DDIM {args.steps} steps, "
          f"{args.device}, {args.repeats} interleaved rounds")
    print("| dtype | batch | candidate | NFE / image | images/s | / plain CFG |")
    print("|---|---|---|---|---|---|")
    for dtype_name in args.dtypes:
        dtype = getattr(torch, dtype_name)
        pipe = pipeline(args.width, args.size, args.workdir / "tokenizer").to(args.device, dtype)
        guided = GuidedStableDiffusionPipeline.from_pipe(pipe)
        guided.set_progress_bar_config(disable=True)
        for batch in args.batches:
            calls = candidates(pipe, guided, args.steps, batch, args.device)
            times: dict[str, list[float]] = {name: [] for name in calls}
            nfe: dict[str, float] = {}
            for call in calls.values():
                call()  # warm-up
            for _ in range(args.repeats):
                for name, call in calls.items():
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    start = time.perf_counter()
                    nfe[name] = call()
                    if args.device.startswith("cuda"):
                        torch.cuda.synchronize()
                    times[name].append(time.perf_counter() - start)
            base = batch / statistics.median(times["plain CFG"])
            for name, samples in times.items():
                rate = batch / statistics.median(samples)
                rows.append({"dtype": dtype_name, "batch": batch, "name": name, "nfe": nfe[name],
                             "images_per_second": rate, "ratio": rate / base})
                print(f"| {dtype_name} | {batch} | {name} | {nfe[name]:g} | {rate:.3f} | {rate / base:.3f} |",
                      flush=True)
    return rows


if __name__ == "__main__":
    main()
