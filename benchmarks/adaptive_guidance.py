"""Adaptive Guidance and LinearAG vs CFG: NFE, wall time and sample quality on the same pipeline and seeds.

    python -m benchmarks.adaptive_guidance               # embedded digits model + SD-architecture UNet (CPU)
    python -m benchmarks.adaptive_guidance --smoke       # tiny random networks: checks the script, numbers meaningless
    python -m benchmarks.adaptive_guidance --skip-sd     # digits only

Both parts calibrate on seeds disjoint from the evaluation seeds, then time CFG, AG and LinearAG on identical inputs,
interleaved, ``--repeats`` times (the fastest run counts; the machine may be shared, so process CPU time is printed
too):

1. **Digits** (``samples/weights/digits``, deterministic DDIM, ``--steps`` steps, CFG scale ``--scale``): AG's
   threshold is proposed by :func:`guidance.ag_calibration.propose_threshold` from gamma curves recorded on 10
   calibration images per class, so that on average ``--fraction`` of the steps are guided; LinearAG is fitted (:func:`guidance.linear_ag_fit.fit_linear_ag`, history 1,
   odd steps of the first half) on the calibration runs. Both use ``reduce="per-sample"``: the evaluation batch holds
   ``--per-class`` x 10 images and with ``"all"`` the slowest sample would hold the whole batch. Quality: mean PSNR
   of each method's images against CFG's (same initial noise; pixels in [0, 1], per-image MSE floored at 1e-10, i.e.
   100 dB for identical images), FD-digits (Frechet distance of ``DigitEvaluator.features`` to the held-out split)
   and class accuracy of the evaluation network. A sweep over switch fractions follows.
2. **SD-architecture UNet**: a ``UNet2DConditionModel`` with Stable Diffusion 1.5's block layout (3 cross-attention
   down blocks + 1 plain, mirrored up blocks, 2 layers per block, 8 heads, 768-dim cross attention on 77 tokens) but
   widths (64, 128, 256, 256) instead of (320, 640, 1280, 1280) and 32x32 latents (256 px), random weights, fed
   random prompt embeddings, so it runs on a CPU in minutes. Only cost is meaningful here (``reduce="all"``, one
   prompt per call, SD's DDIM settings); its gamma curves come from random weights.

Written: ``benchmarks/results/adaptive_guidance[_smoke].md`` (the printed tables) and the LinearAG coefficients of
each part (``linear_ag_*.safetensors``).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from diffusers import DDIMScheduler, UNet2DConditionModel, UNet2DModel

from guidance import CFG, AdaptiveGuidance, Guidance, LinearAG
from guidance.ag_calibration import calibrate_threshold, propose_threshold, record_gammas
from guidance.linear_ag_fit import alternate_steps, fit_linear_ag
from pipelines import GuidedClassConditionalPipeline, GuidedStableDiffusionPipeline
from samples.digits.data import NUM_CLASSES, load_digits_split
from samples.digits.nets import WEIGHTS_DIR, DigitEvaluator, load_evaluator
from samples.metrics.frechet import frechet_distance

RESULTS = Path(__file__).resolve().parent / "results"
SD_SCHEDULER = {
    "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear", "clip_sample": False,
    "set_alpha_to_one": False, "steps_offset": 1,
}
SD_BLOCKS = {
    "down_block_types": ("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
    "up_block_types": ("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
    "layers_per_block": 2, "attention_head_dim": 8, "cross_attention_dim": 768, "in_channels": 4, "out_channels": 4,
}


@dataclass
class Timed:
    """One method's outputs and costs (fastest of the repeats)."""

    name: str
    images: torch.Tensor
    nfe: float
    wall: float
    cpu: float


def timed_runs(methods: dict[str, Callable[[], Any]], repeats: int) -> dict[str, Timed]:
    """Run every method ``repeats`` times, interleaved; keep the last output and the fastest wall / CPU time."""
    walls: dict[str, list[float]] = {name: [] for name in methods}
    cpus: dict[str, list[float]] = {name: [] for name in methods}
    outputs: dict[str, Any] = {}
    for _ in range(repeats):
        for name, call in methods.items():
            wall, cpu = time.perf_counter(), time.process_time()
            outputs[name] = call()
            walls[name].append(time.perf_counter() - wall)
            cpus[name].append(time.process_time() - cpu)
    return {
        name: Timed(name, out.images, float(out.nfe), min(walls[name]), min(cpus[name]))
        for name, out in outputs.items()
    }


def psnr(images: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over images of ``10 log10(1 / MSE)`` for pixels in [0, 1] (MSE floored at 1e-10)."""
    mse = (images.double() - reference.double()).pow(2).flatten(1).mean(1).clamp_min(1e-10)
    return float((10 * torch.log10(1 / mse)).mean())


def table(header: list[str], rows: list[list[Any]]) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def cost_rows(results: dict[str, Timed]) -> list[list[Any]]:
    cfg = results["CFG"]
    return [
        [r.name, r.nfe, r.nfe / cfg.nfe, r.wall, r.wall / cfg.wall, r.cpu / cfg.cpu] for r in results.values()
    ]


COST_HEADER = ["method", "NFE / image", "NFE ratio", "wall s", "wall ratio", "CPU ratio"]


# -- part 1: digits ----------------------------------------------------------------------------------------------
def digits_pipeline(smoke: bool, weights: Path) -> tuple[GuidedClassConditionalPipeline, DigitEvaluator, str]:
    if smoke:
        from scripts.train_digits import QUICK_UNET_CONFIG, SCHEDULER_CONFIG

        torch.manual_seed(0)
        unet = UNet2DModel(**QUICK_UNET_CONFIG).eval()
        pipe = GuidedClassConditionalPipeline(DDIMScheduler(**SCHEDULER_CONFIG), unet=unet, null_class_label=NUM_CLASSES)
        return pipe, DigitEvaluator(width=8, feature_dim=16).eval(), "smoke-digits"
    pipe = GuidedClassConditionalPipeline.from_pretrained(weights / "digits")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    model_id = "samples/weights/digits" if weights == WEIGHTS_DIR else str(weights / "digits")
    return pipe, load_evaluator(weights / "evaluator"), model_id


def digits_part(args: argparse.Namespace, out: list[str]) -> None:
    pipe, evaluator, model_id = digits_pipeline(args.smoke, args.weights)
    pipe.set_progress_bar_config(disable=True)
    steps, base = args.steps, CFG(args.scale)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class).tolist()
    calibration_labels = torch.arange(NUM_CLASSES).repeat_interleave(args.calibration_per_class).tolist()

    def runner(class_labels: list[int], seed: int, output_type: str = "latent") -> Callable[[Guidance], Any]:
        def run(guidance: Guidance) -> Any:
            return pipe(
                class_labels=class_labels, guidance=guidance, num_inference_steps=steps, output_type=output_type,
                generator=torch.Generator().manual_seed(seed),
            )

        return run

    gammas = record_gammas(runner(calibration_labels, 1000), base=base)
    fitted = fit_linear_ag(
        [runner(calibration_labels, 1000)], steps=alternate_steps(steps), model_id=model_id, scheduler=pipe.scheduler,
        base=base, history=1, held_out=runner(calibration_labels, 2000),
    )
    RESULTS.mkdir(parents=True, exist_ok=True)
    fitted.save(RESULTS / f"linear_ag_digits{'_smoke' if args.smoke else ''}.safetensors")
    threshold = propose_threshold(gammas, args.fraction)
    ag = AdaptiveGuidance(base, threshold=threshold, reduce="per-sample")
    lag = LinearAG(fitted, model_id=model_id, scheduler=pipe.scheduler, threshold=threshold, reduce="per-sample")
    evaluate = runner(labels, 0, "pt")
    results = timed_runs({"CFG": lambda: evaluate(base), "AG": lambda: evaluate(ag), "LinearAG": lambda: evaluate(lag)}, args.repeats)

    split = load_digits_split()
    with torch.no_grad():
        real = evaluator.features(split.test_images)

    def quality(images: torch.Tensor) -> tuple[float, float]:
        pixels = images * 2 - 1
        with torch.no_grad():
            accuracy = float((evaluator(pixels).argmax(1) == torch.tensor(labels)).double().mean())
            return frechet_distance(evaluator.features(pixels), real), accuracy

    residual = fitted.metadata["held_out_relative_residual"]
    out.append(
        f"## Digits ({model_id}, DDIM, {steps} steps, CFG scale {args.scale}, {len(labels)} images, seed 0)\n\n"
        f"AG threshold 1 - {1 - threshold:.2e}: proposed for {args.fraction:.0%} guided steps on average over "
        f"{len(calibration_labels)} calibration samples (seed 1000); LinearAG estimates steps "
        f"{fitted.metadata['steps']} (held-out relative residual {min(residual):.2e} - {max(residual):.2e}).\n"
    )
    rows = []
    for row, timed in zip(cost_rows(results), results.values()):
        fd, accuracy = quality(timed.images)
        rows.append([*row, psnr(timed.images, results["CFG"].images), fd, accuracy])
    other_seed = runner(labels, 1, "pt")(base).images  # how much FD-digits moves with the noise alone
    fd, accuracy = quality(other_seed)
    rows.append(["CFG, seed 1 (noise reference)", "", "", "", "", "", psnr(other_seed, results["CFG"].images), fd, accuracy])
    out.append(table([*COST_HEADER, "PSNR vs CFG dB", "FD-digits", "accuracy"], rows) + "\n")

    sweep = []
    for fraction in args.sweep:
        proposal = propose_threshold(gammas, fraction)
        output = evaluate(AdaptiveGuidance(base, threshold=proposal, reduce="per-sample"))
        fd, accuracy = quality(output.images)
        sweep.append([fraction, f"1 - {1 - proposal:.2e}", float(output.nfe) / results["CFG"].nfe,
                      psnr(output.images, results["CFG"].images), fd, accuracy])
    out.append("AG per target fraction of guided steps (same calibration and evaluation seeds):\n\n" + table(
        ["target fraction", "threshold", "NFE ratio", "PSNR vs CFG dB", "FD-digits", "accuracy"], sweep) + "\n")


# -- part 2: SD-architecture UNet ---------------------------------------------------------------------------------
def sd_pipeline(smoke: bool) -> GuidedStableDiffusionPipeline:
    torch.manual_seed(0)
    widths = (32, 32, 64, 64) if smoke else (64, 128, 256, 256)
    unet = UNet2DConditionModel(block_out_channels=widths, sample_size=16 if smoke else 32, **SD_BLOCKS).eval()
    pipe = GuidedStableDiffusionPipeline(
        vae=None, text_encoder=None, tokenizer=None, unet=unet, scheduler=DDIMScheduler(**SD_SCHEDULER),
        safety_checker=None, feature_extractor=None, image_encoder=None, requires_safety_checker=False,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sd_part(args: argparse.Namespace, out: list[str]) -> None:
    pipe = sd_pipeline(args.smoke)
    steps, base = args.sd_steps, CFG(7.5)

    def embeddings(count: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
        generator = torch.Generator().manual_seed(seed)
        return torch.randn(count, 77, 768, generator=generator), torch.randn(count, 77, 768, generator=generator)

    def runner(count: int, seed: int) -> Callable[[Guidance], Any]:
        prompt, negative = embeddings(count, seed)

        def run(guidance: Guidance) -> Any:
            return pipe(
                prompt_embeds=prompt, negative_prompt_embeds=negative, guidance=guidance, num_inference_steps=steps,
                output_type="latent", generator=torch.Generator().manual_seed(seed),
            )

        return run

    calibration = calibrate_threshold(runner(3, 100), base=base, fraction=args.fraction)
    model_id = f"sd15-layout-random-{'smoke' if args.smoke else '64-128-256-256'}"
    fitted = fit_linear_ag(
        [runner(2, 100)], steps=alternate_steps(steps), model_id=model_id, scheduler=pipe.scheduler, base=base,
        history=1, held_out=runner(1, 200),
    )
    fitted.save(RESULTS / f"linear_ag_sd_layout{'_smoke' if args.smoke else ''}.safetensors")
    threshold = calibration.threshold
    ag = AdaptiveGuidance(base, threshold=threshold)
    lag = LinearAG(fitted, model_id=model_id, scheduler=pipe.scheduler, threshold=threshold)
    evaluate = runner(1, 0)
    results = timed_runs({"CFG": lambda: evaluate(base), "AG": lambda: evaluate(ag), "LinearAG": lambda: evaluate(lag)}, args.repeats)
    params = sum(p.numel() for p in pipe.unet.parameters()) / 1e6
    residual = fitted.metadata["held_out_relative_residual"]
    out.append(
        f"## SD-1.5-layout UNet ({params:.1f} M parameters, random weights, {pipe.unet.config.sample_size}x"
        f"{pipe.unet.config.sample_size} latents, DDIM, {steps} steps, CFG 7.5, one prompt)\n\n"
        f"AG threshold 1 - {1 - threshold:.2e} (proposed for {args.fraction:.0%} guided steps on 3 calibration "
        f"prompts; here it switches after step {ag.switch_step}); LinearAG estimates steps {fitted.metadata['steps']} (held-out relative "
        f"residual {min(residual):.2e} - {max(residual):.2e}).\n"
    )
    reference = results["CFG"].images.double()
    rows = [
        [*row, float((t.images.double() - reference).norm() / reference.norm())]
        for row, t in zip(cost_rows(results), results.values())
    ]
    out.append(table([*COST_HEADER, "latents: relative L2 to CFG (random weights)"], rows) + "\n")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random networks (checks the script only)")
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder with digits/ and evaluator/")
    parser.add_argument("--skip-sd", action="store_true", help="digits part only")
    parser.add_argument("--steps", type=int, default=30, help="digits sampling steps (default 30)")
    parser.add_argument("--sd-steps", type=int, default=25, help="SD-layout sampling steps (default 25)")
    parser.add_argument("--scale", type=float, default=3.0, help="digits CFG scale (default 3)")
    parser.add_argument("--fraction", type=float, default=0.4, help="AG's target mean fraction of guided steps")
    parser.add_argument("--sweep", type=float, nargs="*", default=[0.3, 0.4, 0.5, 0.6, 0.7])
    parser.add_argument("--per-class", type=int, default=50, help="digits evaluation images per class")
    parser.add_argument("--calibration-per-class", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args(argv)
    if args.smoke:
        args.steps, args.sd_steps, args.per_class, args.calibration_per_class = 10, 6, 3, 2
        args.repeats, args.sweep = 1, [0.5]
    torch.set_num_threads(args.threads)
    out = [f"# Adaptive Guidance benchmark{' (SMOKE: random networks, numbers meaningless)' if args.smoke else ''}\n",
           f"torch threads: {args.threads}; times are the fastest of {args.repeats} interleaved runs.\n"]
    print("\n".join(out), flush=True)
    for part in (digits_part,) if args.skip_sd else (digits_part, sd_part):
        start = len(out)
        part(args, out)
        print("\n".join(out[start:]), flush=True)
    text = "\n".join(out)
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / f"adaptive_guidance{'_smoke' if args.smoke else ''}.md").write_text(text)


if __name__ == "__main__":
    main()
