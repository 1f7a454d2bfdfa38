"""GFCG vs CFG on the embedded digits model's weaker checkpoint, measured with the *evaluation* network.

    python -m benchmarks.gfcg                 # the comparison table + plot under benchmarks/results/
    python -m benchmarks.gfcg --tune --tune-cfg 1 --per-class 50 --gfcg-scales 1 2 4   # the sweep behind the defaults
    python -m benchmarks.gfcg --smoke         # tiny random networks: checks the script end to end, numbers meaningless

Every configuration samples the same labels from the same initial noise (``--seed``, default 0) with deterministic
DDIM. GFCG guides with ``samples.digits.nets.load_classifier()``; class accuracy, FD-digits (Frechet distance of
``DigitEvaluator.features`` against the held-out real digits) and k-NN precision/recall (k = 3, Kynkaanniemi et al.)
come from ``load_evaluator()``, a different network trained from another seed. ``guide_acc`` (the guiding
classifier's own accuracy on the samples) is reported only to show how much reading the guide's own score would
inflate the result. Images are clamped to [-1, 1] before measuring, as they would be shown.

Written: ``benchmarks/results/gfcg.{csv,md,png}`` (or ``gfcg_tune_w<cfg>.{csv,md}``); the CSV also has wall-clock
seconds per configuration (not compared in the table: the machine the numbers come from is shared).
"""

from __future__ import annotations

import argparse
import csv
import math
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from guidance import CFG, GFCG, Guidance
from pipelines.class_conditional import GuidedClassConditionalPipeline
from samples.digits.data import NUM_CLASSES, load_digits_split
from samples.digits.nets import WEIGHTS_DIR, DigitClassifier, DigitEvaluator, load_classifier, load_evaluator
from samples.metrics.frechet import frechet_distance
from samples.metrics.precision_recall import precision_recall

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"


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
    correct: torch.Tensor = field(repr=False)  # [N] bool: the evaluator's verdict per sample (paired tests)
    nfe_per_network: dict[str, float] = field(default_factory=dict)  # NFE per sample of each network


def load_setup(weights: Path, smoke: bool, checkpoint: str = "digits-weak") -> Setup:
    """The pipeline (``checkpoint`` under ``weights``, DDIM from its saved scheduler config), guiding classifier,
    evaluator and real features."""
    from diffusers import DDIMScheduler

    if smoke:
        from diffusers import UNet2DModel

        from scripts.train_digits import QUICK_UNET_CONFIG, SCHEDULER_CONFIG

        torch.manual_seed(0)
        unet = UNet2DModel(**QUICK_UNET_CONFIG).eval()
        scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
        pipe = GuidedClassConditionalPipeline(scheduler, unet=unet, null_class_label=NUM_CLASSES)
        classifier, evaluator = DigitClassifier(width=8).eval(), DigitEvaluator(width=8, feature_dim=16).eval()
        source = "smoke: random tiny UNet and random classifiers (numbers meaningless)"
    else:
        pipe = GuidedClassConditionalPipeline.from_pretrained(weights / checkpoint)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        classifier, evaluator = load_classifier(weights / "classifier"), load_evaluator(weights / "evaluator")
        shown = weights.resolve().relative_to(ROOT) if weights.resolve().is_relative_to(ROOT) else weights
        source = f"{shown}/{checkpoint} (guide: classifier/, evaluator: evaluator/)"
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        real = evaluator.features(load_digits_split().test_images)
    return Setup(pipe, classifier, evaluator, real, source)


def sample(setup: Setup, guidance: Guidance, labels: torch.Tensor, noise: torch.Tensor, steps: int):
    """Clamped samples ``[N, 1, 8, 8]`` in [-1, 1], the pipeline output (NFE, model calls) and seconds."""
    start = time.perf_counter()
    out = setup.pipe(labels.tolist(), guidance=guidance, num_inference_steps=steps, latents=noise, output_type="latent")
    return out.images.float().clamp(-1, 1), out, time.perf_counter() - start


@torch.no_grad()
def measure(setup: Setup, method: str, scale: str, guidance: Guidance, labels, noise, steps: int) -> Row:
    images, out, seconds = sample(setup, guidance, labels, noise, steps)
    features = setup.evaluator.features(images)
    precision, recall = precision_recall(setup.real_features, features, k=3)
    correct = setup.evaluator.head(features).argmax(1) == labels
    return Row(
        method=method,
        scale=scale,
        accuracy=correct.float().mean().item(),
        guide_acc=(setup.classifier(images).argmax(1) == labels).float().mean().item(),
        fd=frechet_distance(features, setup.real_features),
        precision=precision,
        recall=recall,
        nfe=float(out.nfe),
        model_calls=out.model_calls,
        seconds=seconds,
        correct=correct,
        nfe_per_network={name: float(value) for name, value in out.nfe_per_network.items()},
    )


def mcnemar_p(a: torch.Tensor, b: torch.Tensor) -> float:
    """Exact two-sided McNemar test on paired per-sample verdicts: the binomial tail of the discordant pairs."""
    only_a, only_b = int((a & ~b).sum()), int((b & ~a).sum())
    discordant = only_a + only_b
    tail = sum(math.comb(discordant, i) for i in range(min(only_a, only_b) + 1))
    return min(1.0, 2 * tail / 2**discordant)


def comparison_runs(classifier: torch.nn.Module, args) -> list[tuple[str, str, Guidance]]:
    """CFG across omega (omega = 1: unguided conditional), GFCG alone across lambda, GFCG+CFG across omega at each
    lambda of ``--combined-lambdas``, and GFCG+CFG reading the previous guided x0 (the ``classifier_input`` variant)
    at ``--variant-lambda``."""
    runs: list[tuple[str, str, Guidance]] = [("CFG", f"w={w:g}", CFG(w)) for w in args.cfg_scales]
    runs += [("GFCG", f"lambda={lam:g}", GFCG(classifier, confusion_scale=lam)) for lam in args.gfcg_scales]
    combined = [(f"GFCG+CFG (lambda={lam:g})", lam, "cond") for lam in args.combined_lambdas]
    combined.append((f"GFCG+CFG (lambda={args.variant_lambda:g}, previous x0)", args.variant_lambda, "previous"))
    for name, lam, input_ in combined:
        runs += [(name, f"w={w:g}", GFCG(classifier, confusion_scale=lam, cfg_scale=w, classifier_input=input_))
                 for w in args.cfg_scales if w > 1]
    return runs


def tuning_runs(classifier: torch.nn.Module, args) -> list[tuple[str, str, Guidance]]:
    """The sweep behind the defaults at one CFG scale (``--tune-cfg``; 1 = GFCG alone): every scale rule at every
    lambda of ``--gfcg-scales``, then the other options varied one at a time around the default."""
    w = args.tune_cfg
    runs: list[tuple[str, str, Guidance]] = [("CFG", f"w={w:g}", CFG(w))]
    variants: dict[str, dict] = {}
    for rule in ("ratio", "one_minus_p", "indicator"):
        for lam in args.gfcg_scales:
            variants[f"{rule} lambda={lam:g}"] = {"scale_rule": rule, "confusion_scale": lam}
    default = GFCG(classifier)
    prefix = f"{default.scale_rule} lambda={default.confusion_scale:g} (default)"
    variants[f"{prefix}, include_target"] = {"reference": "include_target"}
    variants[f"{prefix}, w_max=1"] = {"w_max": 1.0}
    variants[f"{prefix}, sigma_window=(0,1)"] = {"sigma_window": (0.0, 1.0)}
    variants[f"{prefix}, previous x0"] = {"classifier_input": "previous"}
    method = "GFCG" if w == 1 else f"GFCG+CFG (w={w:g})"
    runs += [(method, name, GFCG(classifier, cfg_scale=w, **kw)) for name, kw in variants.items()]
    return runs


def best_cfg_at_fd(rows: list[Row], fd: float) -> Row | None:
    """The most accurate CFG row whose FD-digits is at most ``fd`` (None: every CFG row has a worse FD)."""
    matched = [row for row in rows if row.method == "CFG" and row.fd <= fd]
    return max(matched, key=lambda row: row.accuracy) if matched else None


def write_rows_csv(rows: list[Row], path: Path) -> None:
    """``rows`` as CSV at ``path`` (every field but the per-sample verdicts), creating its folder."""
    path.parent.mkdir(parents=True, exist_ok=True)
    columns = [name for name in asdict(rows[0]) if name != "correct"]
    with open(path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows({name: getattr(row, name) for name in columns} for row in rows)


def write_table(rows: list[Row], out: Path, stem: str, header: str) -> Path:
    """CSV of every row, and a markdown table with two comparisons against CFG: at the same scale (GFCG alone: against
    the unguided conditional run, CFG w=1), and against the most accurate CFG run at equal or better FD-digits, with
    the exact McNemar p-value of that accuracy difference (same seeds and labels, so the samples are paired)."""
    write_rows_csv(rows, out / f"{stem}.csv")
    cfg = {row.scale: row for row in rows if row.method == "CFG"}
    lines = [header, "", "| method | scale | accuracy | acc - CFG same scale | best CFG at <= FD (acc, p) | "
             "guide_acc | FD-digits | FD / CFG same scale | precision | recall | NFE | model calls |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    wins = []
    for row in rows:
        ref = cfg.get(row.scale) or next(iter(cfg.values()))
        match = best_cfg_at_fd(rows, row.fd)
        versus = "none" if match is None else f"{match.scale}: {match.accuracy:.3f}"
        if match is not None and row.method != "CFG":
            versus += f", p={mcnemar_p(row.correct, match.correct):.2g}"
        if row.method.startswith("GFCG+CFG"):
            wins.append(match is None or row.accuracy > match.accuracy)
        lines.append(
            f"| {row.method} | {row.scale} | {row.accuracy:.4f} | {row.accuracy - ref.accuracy:+.4f} | {versus} | "
            f"{row.guide_acc:.4f} | {row.fd:.4g} | {row.fd / ref.fd:.2f} | {row.precision:.3f} | {row.recall:.3f} | "
            f"{row.nfe:g} | {row.model_calls} |"
        )
    if wins:
        lines += ["", f"GFCG+CFG rows more accurate than every CFG run with equal or better FD-digits: "
                  f"{sum(wins)} of {len(wins)} ('none': no CFG run reaches that FD; p: exact McNemar test of the "
                  "paired accuracy difference)."]
    path = out / f"{stem}.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows: list[Row], path: Path) -> None:
    """Class error and FD-digits against the scale, and the error-FD trade-off (log FD axis)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.6))
    for method in dict.fromkeys(row.method for row in rows):
        picked = [row for row in rows if row.method == method]
        xs = [float(row.scale.split("=")[1]) for row in picked]
        errors = [100 * (1 - row.accuracy) for row in picked]
        style = {"marker": "o", "label": method, "linestyle": "--" if method == "CFG" else "-"}
        axes[0].plot(xs, errors, **style)
        axes[1].plot(xs, [row.fd for row in picked], **style)
        axes[2].plot([row.fd for row in picked], errors, **style)
    axes[0].set(xlabel="scale (CFG, GFCG+CFG: omega; GFCG: lambda)", ylabel="class error % (evaluation network)")
    axes[1].set(xlabel="scale (CFG, GFCG+CFG: omega; GFCG: lambda)", ylabel="FD-digits (lower is better)")
    axes[2].set(xlabel="FD-digits (log)", ylabel="class error %", title="trade-off (lower left is better)",
                xscale="log")
    axes[2].xaxis.set_major_formatter(matplotlib.ticker.ScalarFormatter())
    axes[2].xaxis.set_minor_formatter(matplotlib.ticker.NullFormatter())
    axes[2].set_xticks([10, 15, 20, 30, 50, 80])
    for ax in axes:
        ax.grid(alpha=0.3, which="both")
    axes[2].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder with digits-weak/, classifier/ "
                        "and evaluator/ (default samples/weights)")
    parser.add_argument("--per-class", type=int, default=200, help="samples per class (default 200: 2,000 samples)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--cfg-scales", type=float, nargs="+", default=[1.0, 1.05, 1.1, 1.25, 1.5, 2.0, 3.0])
    parser.add_argument("--gfcg-scales", type=float, nargs="+", default=[0.5, 1.0, 2.0, 4.0])
    parser.add_argument("--combined-lambdas", type=float, nargs="+", default=[0.5, 1.0, 2.0],
                        help="GFCG's lambda in the GFCG+CFG rows")
    parser.add_argument("--variant-lambda", type=float, default=2.0, help="lambda of the previous-x0 GFCG+CFG rows")
    parser.add_argument("--tune", action="store_true", help="run the default-choosing sweep instead")
    parser.add_argument("--tune-cfg", type=float, default=2.0, help="CFG scale of the sweep")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every configuration)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.per_class, args.steps = 4, 3
    setup = load_setup(args.weights, args.smoke)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    build: Callable = tuning_runs if args.tune else comparison_runs
    rows = []
    for method, scale, guidance in build(setup.classifier, args):
        rows.append(measure(setup, method, scale, guidance, labels, noise, args.steps))
        r = rows[-1]
        print(f"{method:24s} {scale:28s} acc {r.accuracy:.3f} (guide {r.guide_acc:.3f}) FD {r.fd:.3f} "
              f"P {r.precision:.3f} R {r.recall:.3f} NFE {r.nfe:g} calls {r.model_calls} {r.seconds:.0f}s", flush=True)
    stem = f"gfcg_tune_w{args.tune_cfg:g}" if args.tune else "gfcg"
    out = args.out or (Path(tempfile.mkdtemp(prefix="gfcg-smoke-")) if args.smoke else RESULTS)
    header = (f"GFCG benchmark ({'tuning sweep, ' if args.tune else ''}{len(labels)} samples, {args.steps} DDIM steps, "
              f"seed {args.seed}) on {setup.source}. Defaults: {GFCG(setup.classifier).config()}")
    path = write_table(rows, out, stem, header)
    if not args.tune:
        plot(rows, out / f"{stem}.png")
    print(path.read_text())


if __name__ == "__main__":
    main()
