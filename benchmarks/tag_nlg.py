"""TAG, TAG-cfg and NLG on the embedded digits model: FD-digits and class accuracy from the same seeds (issue #5).

Every method samples the same labels (``--per-class`` per digit) from the same per-sample seeds with deterministic DDIM
(``clip_sample=False``). Samples are clamped to [-1, 1] as they would be shown; FD-digits is the Frechet distance of
the evaluation network's features to the held-out test split, class accuracy is the evaluation network's. The
table (markdown and CSV under ``benchmarks/results/``) gives every row's ratios to the unguided conditional base.

    python -m benchmarks.tag_nlg [--model samples/weights/digits] [--per-class 100] [--steps 25] [--scale 2]
        [--tangential-scale 1.15] [--tangential-weight 1]  (TAG's and TAG-cfg's eta in the paper)
        [--only "ROW NAME" ...]  (only these rows, by their printed name; the base row is always run)
"""

from __future__ import annotations

import argparse
import csv
import time
from collections.abc import Callable
from pathlib import Path

import torch
from diffusers import DDIMScheduler

from guidance import APG, CFG, NLG, TAG, TAGCFG, Guidance, resolve_guidance
from guidance.nlg import scaled_norm_threshold
from pipelines.class_conditional import GuidedClassConditionalPipeline
from samples.digits.data import NUM_CLASSES, load_digits_split
from samples.digits.nets import load_evaluator
from samples.metrics.frechet import frechet_distance

ROOT = Path(__file__).resolve().parents[1]


def methods(
    scale: float, tangential_scale: float, tangential_weight: float, nlg_threshold: float, nlg_taus: list[float]
) -> dict[str, Callable[[], Guidance | list[Guidance]]]:
    """The compared rules; ``scale`` is diffusers' CFG scale w (APG's ``D_c + (w - 1) U`` is CFG at the same w),
    ``tangential_scale`` TAG's and ``tangential_weight`` TAG-cfg's (both the paper's eta).

    NLG runs once in the official configuration (absolute clip tau = 0.5, :meth:`NLG.official`) and otherwise at
    its default (tau = 0.5 scaled to the image size), shown as ``nlg_threshold``; ``nlg_taus`` add rows with other
    absolute clips, and one row shows the default clip evaluated at the schedule's first timestep.
    """
    tau = f"default tau={nlg_threshold:.3g}"
    tag = f"TAG tangential_scale={tangential_scale:g}"
    tag_cfg = f"w={scale:g} tangential_weight={tangential_weight:g}"
    return {
        "base (cond only)": lambda: CFG(1.0),
        tag: lambda: [CFG(1.0), TAG(tangential_scale)],
        f"CFG w={scale:g}": lambda: CFG(scale),
        f"TAG-cfg {tag_cfg}": lambda: TAGCFG(scale, tangential_weight=tangential_weight),
        f"TAG-cfg adaptive {tag_cfg}": lambda: TAGCFG(scale, tangential_weight=tangential_weight, adaptive=True),
        "NLG official (tau=0.5 absolute)": lambda: [NLG.official(), CFG(1.0)],
        f"NLG {tau}": lambda: [NLG(), CFG(1.0)],
        f"NLG {tau}, timestep=first": lambda: [NLG(timestep="first"), CFG(1.0)],
        **{f"NLG tau={t:g} (absolute)": (lambda t=t: [NLG(norm_threshold=t), CFG(1.0)]) for t in nlg_taus},
        f"NLG {tau} + CFG w={scale:g}": lambda: [NLG(), CFG(scale)],
        f"NLG {tau} + APG w={scale:g} + {tag}": lambda: [NLG(), APG(scale), TAG(tangential_scale)],
    }


def sample(
    pipe: GuidedClassConditionalPipeline, rule: Guidance, labels: torch.Tensor, seed: int, steps: int, batch: int
) -> tuple[torch.Tensor, float]:
    """Samples in [-1, 1] (clamped) for ``labels``, sample i from its own generator seeded ``seed + i``; and the NFE."""
    images, nfe = [], []
    for start in range(0, len(labels), batch):
        chunk = labels[start : start + batch]
        generators = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        out = pipe(chunk.tolist(), guidance=rule, num_inference_steps=steps, generator=generators, output_type="latent")
        images.append(out.images.float().clamp(-1.0, 1.0))
        nfe.extend(out.nfe_per_sample)
    return torch.cat(images), sum(nfe) / len(nfe)


def ddim_pipeline(model: str) -> GuidedClassConditionalPipeline:
    """The class-conditional pipeline at ``model`` with deterministic DDIM (``clip_sample=False``), quiet, float32."""
    pipe = GuidedClassConditionalPipeline.from_pretrained(model, dtype=torch.float32)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "samples/weights/digits"), help="pipeline folder")
    parser.add_argument("--evaluator", default=None, help="evaluation network folder (default: the committed one)")
    parser.add_argument("--per-class", type=int, default=100)
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=2.0, help="CFG / APG / TAG-cfg scale w")
    parser.add_argument("--tangential-scale", type=float, default=1.15,
                        help="TAG's factor on the tangential part of each step (the paper's eta)")
    parser.add_argument("--tangential-weight", type=float, default=1.0,
                        help="TAG-cfg's additive weight of the aligned tangential residual (the paper's eta)")
    parser.add_argument("--nlg-taus", nargs="*", type=float, default=[], help="extra NLG rows with these clips")
    parser.add_argument("--only", nargs="+", default=None, help="run only these rows (exact names)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--batch", type=int, default=500)
    parser.add_argument("--out", default=str(ROOT / "benchmarks/results/tag_nlg"), help="output path without suffix")
    args = parser.parse_args(argv)
    torch.set_num_threads(2)

    pipe = ddim_pipeline(args.model)
    evaluator = load_evaluator(args.evaluator)
    data = load_digits_split()
    with torch.no_grad():
        test_features = evaluator.features(data.test_images)
        floor = frechet_distance(evaluator.features(data.train_images), test_features)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    config = pipe.unet.config
    nlg_threshold = scaled_norm_threshold(config.in_channels * config.sample_size**2)

    rows = []
    rules = methods(args.scale, args.tangential_scale, args.tangential_weight, nlg_threshold, args.nlg_taus)
    for index, (name, build) in enumerate(rules.items()):
        if index > 0 and args.only and name not in args.only:
            continue
        rule = resolve_guidance(build())
        began = time.perf_counter()
        images, nfe = sample(pipe, rule, labels, args.seed, args.steps, args.batch)
        seconds = time.perf_counter() - began
        with torch.no_grad():
            fd = frechet_distance(evaluator.features(images), test_features)
            accuracy = (evaluator(images).argmax(1) == labels).float().mean().item()
        rows.append({"method": name, "config": repr(rule), "fd_digits": fd, "accuracy": accuracy, "nfe": nfe,
                     "seconds": seconds})
        print(f"{name:52s} FD {fd:8.3f}  acc {accuracy:.3f}  NFE {nfe:5.1f}  {seconds:6.1f} s", flush=True)
    base = rows[0]
    for row in rows:
        row["fd_ratio"] = row["fd_digits"] / base["fd_digits"]
        row["accuracy_ratio"] = row["accuracy"] / base["accuracy"]

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fields = ["method", "fd_digits", "fd_ratio", "accuracy", "accuracy_ratio", "nfe", "seconds", "config"]
    with open(out.with_suffix(".csv"), "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)
    model = Path(args.model).resolve()
    shown = model.relative_to(ROOT) if model.is_relative_to(ROOT) else model
    setting = (f"`{shown}`, DDIM {args.steps} steps (clip_sample=False), {args.per_class} samples per class, "
               f"per-sample seeds {args.seed}..{args.seed + len(labels) - 1}, the same for every method")
    lines = [
        "# TAG, TAG-cfg and NLG on the digits model",
        "",
        f"{setting}. FD-digits: evaluation-network features vs the held-out split (train split vs held-out: "
        f"{floor:.3f}); ratios are to the first row.",
        "",
        "| method | FD-digits | FD ratio | class accuracy | accuracy ratio | NFE / sample | seconds |",
        "|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['method']} | {r['fd_digits']:.3f} | {r['fd_ratio']:.3f} | {r['accuracy']:.3f} | "
        f"{r['accuracy_ratio']:.3f} | {r['nfe']:g} | {r['seconds']:.1f} |"
        for r in rows
    ]
    out.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
