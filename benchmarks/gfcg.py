"""GFCG vs CFG on the embedded digits model's weaker checkpoint, measured with the *evaluation* network.

    python -m benchmarks.gfcg                 # the comparison table + plot under benchmarks/results/
    python -m benchmarks.gfcg --tune          # the sweep that chose GFCG's defaults (rule, lambda, w_max, window, input)
    python -m benchmarks.gfcg --smoke         # tiny random networks: checks the script end to end, numbers meaningless

Every configuration samples the same labels from the same initial noise (seed 0) with deterministic DDIM. GFCG guides
with ``samples.digits_nets.load_classifier()``; class accuracy, FD-digits (Frechet distance of
``DigitEvaluator.features`` against the held-out real digits) and k-NN precision/recall (k = 3, Kynkaanniemi et al.)
come from ``load_evaluator()``, a different network trained from another seed. ``guide_acc`` (the guiding
classifier's own accuracy on the samples) is reported only to show how much reading the guide's own score would
inflate the result. Images are clamped to [-1, 1] before measuring, as they would be shown.

Written: ``benchmarks/results/gfcg.{csv,md,png}`` (or ``gfcg_tune.{csv,md}``); the CSV also has wall-clock seconds
per configuration (not compared in the table: the machine the numbers come from is shared).
"""

from __future__ import annotations

import argparse
import csv
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from guidance import CFG, GFCG, Guidance
from pipelines.class_conditional import GuidedClassConditionalPipeline
from samples.digits_data import NUM_CLASSES, load_digits_split
from samples.digits_nets import WEIGHTS_DIR, DigitClassifier, DigitEvaluator, load_classifier, load_evaluator
from samples.metrics import frechet_distance
from samples.precision_recall import precision_recall

RESULTS = Path(__file__).resolve().parent / "results"


@dataclass
class Setup:
    pipe: GuidedClassConditionalPipeline
    classifier: torch.nn.Module
    evaluator: DigitEvaluator
    real_features: torch.Tensor
    source: str


@dataclass
class Row:
    method: str
    scale: str
    accuracy: float
    guide_acc: float
    fd: float
    precision: float
    recall: float
    nfe: float
    model_calls: int
    seconds: float


def load_setup(model: Path, smoke: bool) -> Setup:
    """The pipeline (DDIM from the saved scheduler config), guiding classifier, evaluator and real features."""
    from diffusers import DDIMScheduler

    if smoke:
        from diffusers import UNet2DModel

        from samples.train_digits import QUICK_UNET_CONFIG, SCHEDULER_CONFIG

        torch.manual_seed(0)
        unet = UNet2DModel(**QUICK_UNET_CONFIG).eval()
        pipe = GuidedClassConditionalPipeline(DDIMScheduler(**SCHEDULER_CONFIG), unet=unet, null_class_label=NUM_CLASSES)
        classifier, evaluator = DigitClassifier(width=8).eval(), DigitEvaluator(width=8, feature_dim=16).eval()
        source = "smoke: random tiny UNet and random classifiers (numbers meaningless)"
    else:
        pipe = GuidedClassConditionalPipeline.from_pretrained(model)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        classifier, evaluator = load_classifier(), load_evaluator()
        source = f"{model} (guide: {WEIGHTS_DIR / 'classifier'}, evaluator: {WEIGHTS_DIR / 'evaluator'})"
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        real = evaluator.features(load_digits_split().test_images)
    return Setup(pipe, classifier, evaluator, real, source)


def sample(setup: Setup, guidance: Guidance, labels: torch.Tensor, noise: torch.Tensor, steps: int):
    """Clamped samples ``[N, 1, 8, 8]`` in [-1, 1], NFE per sample, batched model calls and seconds."""
    start = time.perf_counter()
    out = setup.pipe(labels.tolist(), guidance=guidance, num_inference_steps=steps, latents=noise, output_type="latent")
    return out.images.float().clamp(-1, 1), out.nfe, out.model_calls, time.perf_counter() - start


@torch.no_grad()
def measure(setup: Setup, method: str, scale: str, guidance: Guidance, labels, noise, steps: int) -> Row:
    images, nfe, calls, seconds = sample(setup, guidance, labels, noise, steps)
    features = setup.evaluator.features(images)
    precision, recall = precision_recall(setup.real_features, features, k=3)
    return Row(
        method=method,
        scale=scale,
        accuracy=(setup.evaluator.head(features).argmax(1) == labels).float().mean().item(),
        guide_acc=(setup.classifier(images).argmax(1) == labels).float().mean().item(),
        fd=frechet_distance(features, setup.real_features),
        precision=precision,
        recall=recall,
        nfe=float(nfe),
        model_calls=calls,
        seconds=seconds,
    )


def comparison_runs(classifier: torch.nn.Module, args) -> list[tuple[str, str, Guidance]]:
    """CFG across omega (omega = 1: unguided conditional), GFCG across lambda, GFCG+CFG across omega at the default
    lambda, and both classifier inputs of GFCG+CFG (the variant measurement)."""
    runs: list[tuple[str, str, Guidance]] = [("CFG", f"w={w:g}", CFG(w)) for w in args.cfg_scales]
    runs += [("GFCG", f"lambda={lam:g}", GFCG(classifier, guidance_scale=lam)) for lam in args.gfcg_scales]
    for input_ in ("cond", "previous"):
        name = "GFCG+CFG" if input_ == "cond" else "GFCG+CFG (previous x0)"
        runs += [(name, f"w={w:g}", GFCG(classifier, cfg_scale=w, classifier_input=input_)) for w in args.cfg_scales
                 if w > 1]
    return runs


def tuning_runs(classifier: torch.nn.Module, args) -> list[tuple[str, str, Guidance]]:
    """The sweep behind the defaults: each option varied around the default, GFCG+CFG at one CFG scale."""
    w = args.tune_cfg
    runs: list[tuple[str, str, Guidance]] = [("CFG", f"w={w:g}", CFG(w))]
    variants: dict[str, dict] = {"default": {}}
    for rule in ("ratio", "one_minus_p", "indicator"):
        for lam in args.gfcg_scales:
            variants[f"{rule} lambda={lam:g}"] = {"scale_rule": rule, "guidance_scale": lam}
    variants["include_target"] = {"reference": "include_target"}
    variants["w_max=1"] = {"w_max": 1.0}
    variants["w_max=8 (ratio, lambda=4)"] = {"w_max": 8.0, "scale_rule": "ratio", "guidance_scale": 4.0}
    variants["sigma_window=(0,1)"] = {"sigma_window": (0.0, 1.0)}
    variants["sigma_window=(0,4)"] = {"sigma_window": (0.0, 4.0)}
    variants["previous x0"] = {"classifier_input": "previous"}
    runs += [("GFCG+CFG", name, GFCG(classifier, cfg_scale=w, **kw)) for name, kw in variants.items()]
    return runs


def write_table(rows: list[Row], out: Path, stem: str, header: str) -> Path:
    """CSV of every row, and a markdown table with ratios against CFG at the same scale (GFCG alone: against the
    unguided conditional run, CFG w=1)."""
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"{stem}.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(asdict(rows[0])))
        writer.writeheader()
        writer.writerows(asdict(row) for row in rows)
    cfg = {row.scale: row for row in rows if row.method == "CFG"}
    lines = [header, "", "| method | scale | accuracy | acc - CFG | guide_acc | FD-digits | FD / CFG | precision | "
             "recall | NFE | model calls |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        ref = cfg.get(row.scale) or next(iter(cfg.values()))
        lines.append(
            f"| {row.method} | {row.scale} | {row.accuracy:.3f} | {row.accuracy - ref.accuracy:+.3f} | "
            f"{row.guide_acc:.3f} | {row.fd:.4g} | {row.fd / ref.fd:.2f} | {row.precision:.3f} | {row.recall:.3f} | "
            f"{row.nfe:g} | {row.model_calls} |"
        )
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows: list[Row], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.2))
    for method in dict.fromkeys(row.method for row in rows):
        picked = [row for row in rows if row.method == method]
        xs = [float(row.scale.split("=")[1]) for row in picked]
        style = {"marker": "o", "label": method}
        axes[0].plot(xs, [row.accuracy for row in picked], **style)
        axes[1].plot(xs, [row.fd for row in picked], **style)
        axes[2].plot([row.fd for row in picked], [row.accuracy for row in picked], **style)
    axes[0].set(xlabel="scale (CFG: w, GFCG: lambda)", ylabel="class accuracy (evaluator)")
    axes[1].set(xlabel="scale (CFG: w, GFCG: lambda)", ylabel="FD-digits (lower is better)")
    axes[2].set(xlabel="FD-digits", ylabel="class accuracy", title="trade-off (up-left is better)")
    for ax in axes:
        ax.grid(alpha=0.3)
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", type=Path, default=WEIGHTS_DIR / "digits-weak")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 500 samples)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.5, 2.0, 3.0])
    parser.add_argument("--gfcg-scales", type=float, nargs="+", default=[1.0, 2.0, 4.0])
    parser.add_argument("--tune", action="store_true", help="run the default-choosing sweep instead")
    parser.add_argument("--tune-cfg", type=float, default=2.0, help="CFG scale of the sweep")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.per_class, args.steps = 4, 3
    setup = load_setup(args.model, args.smoke)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(0))
    build: Callable = tuning_runs if args.tune else comparison_runs
    rows = []
    for method, scale, guidance in build(setup.classifier, args):
        rows.append(measure(setup, method, scale, guidance, labels, noise, args.steps))
        r = rows[-1]
        print(f"{method:24s} {scale:28s} acc {r.accuracy:.3f} (guide {r.guide_acc:.3f}) FD {r.fd:.3f} "
              f"P {r.precision:.3f} R {r.recall:.3f} NFE {r.nfe:g} calls {r.model_calls} {r.seconds:.0f}s", flush=True)
    stem = "gfcg_tune" if args.tune else "gfcg"
    out = args.out or (Path(tempfile.mkdtemp(prefix="gfcg-smoke-")) if args.smoke else RESULTS)
    header = (f"GFCG benchmark ({'tuning sweep, ' if args.tune else ''}{len(labels)} samples, {args.steps} DDIM steps, "
              f"seed 0) on {setup.source}. Defaults: {GFCG(setup.classifier).config()}")
    path = write_table(rows, out, stem, header)
    if not args.tune:
        plot(rows, out / f"{stem}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
