"""Autoguidance and GFCG + Autoguidance on the embedded pair: ``samples/weights/digits`` (the main, "good" model)
guided by ``samples/weights/digits-weak`` (the same network trained for fewer steps), against unguided sampling and CFG.

    python -m benchmarks.autoguidance            # the table + plot under benchmarks/results/
    python -m benchmarks.autoguidance --smoke    # tiny random networks: checks the script end to end

Every configuration samples the same labels from the same initial noise (``--seed``) with deterministic DDIM.
FD-digits, k-NN precision / recall (k = 3) and class accuracy come from the separate evaluation network
(``load_evaluator()``), never from the classifier GFCG guides with (``load_classifier()``), as in
``benchmarks/gfcg.py`` (whose measurement this reuses). The claims checked (issue 14, the papers' claims at this
scale) are printed under the table, whether they hold or not.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.gfcg import RESULTS, ROOT, Row, Setup, mcnemar_p, measure, write_rows_csv
from guidance import CFG, GFCG, AutoGuidance, Guidance
from pipelines.class_conditional import GuidedClassConditionalPipeline
from pipelines.schedulers import prediction_type_of
from samples.digits.data import NUM_CLASSES, load_digits_split
from samples.digits.nets import WEIGHTS_DIR, DigitClassifier, DigitEvaluator, load_classifier, load_evaluator

UNGUIDED = "unguided"


def load_pair(weights: Path, smoke: bool) -> tuple[Setup, torch.nn.Module, str]:
    """The good pipeline (DDIM), the guiding UNet and its prediction type, the classifiers and the real features."""
    from diffusers import DDIMScheduler

    if smoke:
        from diffusers import UNet2DModel

        from scripts.train_digits import QUICK_UNET_CONFIG, SCHEDULER_CONFIG

        torch.manual_seed(0)
        good, bad = UNet2DModel(**QUICK_UNET_CONFIG).eval(), UNet2DModel(**QUICK_UNET_CONFIG).eval()
        pipe = GuidedClassConditionalPipeline(DDIMScheduler(**SCHEDULER_CONFIG), unet=good, null_class_label=NUM_CLASSES)
        classifier, evaluator = DigitClassifier(width=8).eval(), DigitEvaluator(width=8, feature_dim=16).eval()
        source, prediction_type = "smoke: random tiny UNets and random classifiers (numbers meaningless)", "epsilon"
    else:
        pipe = GuidedClassConditionalPipeline.from_pretrained(weights / "digits")
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        weak = GuidedClassConditionalPipeline.from_pretrained(weights / "digits-weak")
        bad, prediction_type = weak.unet.eval(), prediction_type_of(weak.scheduler)
        classifier, evaluator = load_classifier(weights / "classifier"), load_evaluator(weights / "evaluator")
        shown = weights.resolve().relative_to(ROOT) if weights.resolve().is_relative_to(ROOT) else weights
        source = f"{shown}/digits guided by {shown}/digits-weak (GFCG classifier: classifier/, evaluator: evaluator/)"
    pipe.set_progress_bar_config(disable=True)
    with torch.no_grad():
        real = evaluator.features(load_digits_split().test_images)
    return Setup(pipe, classifier, evaluator, real, source), bad, prediction_type


def runs(setup: Setup, bad: torch.nn.Module, prediction_type: str, args) -> list[tuple[str, str, Guidance]]:
    """Unguided (CFG at 1), then CFG, Autoguidance and GFCG + Autoguidance (lambda ``--gfcg-lambda``, GFCG's
    defaults otherwise) at every w; at ``--variant-scale`` also the other readings: the additive form, and the shared
    form with ``reference="exclude_target"``."""
    out: list[tuple[str, str, Guidance]] = [(UNGUIDED, "w=1", CFG(1.0))]
    for w in args.scales:
        autoguidance = AutoGuidance(w, model=bad, prediction_type=prediction_type)
        out += [
            ("CFG", f"w={w:g}", CFG(w)),
            ("Autoguidance", f"w={w:g}", autoguidance),
            ("GFCG+Autoguidance", f"w={w:g}", GFCG(setup.classifier, confusion_scale=args.gfcg_lambda,
                                                   autoguidance=autoguidance)),
        ]
    if args.variant_scale is not None:
        autoguidance = AutoGuidance(args.variant_scale, model=bad, prediction_type=prediction_type)
        for name, options in (("additive", {"autoguidance_form": "additive"}),
                              ("exclude_target", {"reference": "exclude_target"})):
            rule = GFCG(setup.classifier, confusion_scale=args.gfcg_lambda, autoguidance=autoguidance, **options)
            out.append((f"GFCG+Autoguidance ({name})", f"w={args.variant_scale:g}", rule))
    return out


def claims(rows: list[Row], steps: int) -> list[str]:
    """The issue's claims, each with the numbers it rests on and whether it holds."""
    table = {(row.method, row.scale): row for row in rows}
    unguided = table[UNGUIDED, "w=1"]
    scales = [row.scale for row in rows if row.method == "Autoguidance"]
    lines = []
    first = []
    for scale in scales:
        ag, cfg = table["Autoguidance", scale], table["CFG", scale]
        if float(scale.split("=")[1]) <= 1:
            continue
        holds = ag.fd <= unguided.fd and ag.fd < 0.8 * cfg.fd and ag.recall > cfg.recall
        first.append(holds)
        lines.append(f"- Autoguidance {scale}: FD {ag.fd:.2f} vs unguided {unguided.fd:.2f} and CFG {cfg.fd:.2f}; "
                     f"recall {ag.recall:.3f} vs CFG {cfg.recall:.3f}: {'holds' if holds else 'does not hold'}")
    verdict = "holds" if any(first) else "DOES NOT HOLD"
    other = table.get((f"{UNGUIDED} (other seed)", "w=1"))
    if other is not None:
        lines.append(f"- seed noise: unguided sampling from other initial noise has FD {other.fd:.2f} "
                     f"({other.fd / unguided.fd - 1:+.1%} vs the same-seed unguided run)")
    lines.insert(0, f"Claim 1 (Autoguidance at some w > 1: FD-digits <= unguided, clearly (< 0.8x) below CFG's at "
                    f"the same w, recall above CFG's): **{verdict}** ({sum(first)} of {len(first)} scales)")
    second = []
    detail = []
    for scale in scales:
        ag, both = table["Autoguidance", scale], table["GFCG+Autoguidance", scale]
        holds = both.accuracy > ag.accuracy and both.fd <= 1.05 * ag.fd and both.nfe == 2 * steps
        second.append(holds)
        detail.append(f"- {scale}: accuracy {100 * both.accuracy:.2f}% vs {100 * ag.accuracy:.2f}% (McNemar "
                      f"p={mcnemar_p(both.correct, ag.correct):.2g}), FD {both.fd:.2f} vs {ag.fd:.2f} "
                      f"({both.fd / ag.fd - 1:+.1%}), NFE/step {both.nfe / steps:g} "
                      f"({both.nfe_per_network}): {'holds' if holds else 'does not hold'}")
    verdict = "holds" if any(second) else "DOES NOT HOLD"
    lines += ["", f"Claim 2 (GFCG+Autoguidance: higher class accuracy than Autoguidance alone at FD within 5%, at 2 "
                  f"evaluations per step): **{verdict}** ({sum(second)} of {len(second)} scales)", *detail]
    return lines


def write(rows: list[Row], out: Path, header: str, steps: int) -> Path:
    write_rows_csv(rows, out / "autoguidance.csv")
    lines = [header, "", "| method | scale | FD-digits | precision | recall | class accuracy | NFE / image (main + "
             "guiding) |", "|---|---|---|---|---|---|---|"]
    for row in rows:
        split = " + ".join(f"{value:g}" for value in row.nfe_per_network.values())
        lines.append(f"| {row.method} | {row.scale} | {row.fd:.2f} | {row.precision:.3f} | {row.recall:.3f} | "
                     f"{100 * row.accuracy:.2f}% | {row.nfe:g} ({split}) |")
    lines += ["", *claims(rows, steps)]
    path = out / "autoguidance.md"
    path.write_text("\n".join(lines) + "\n")
    return path


def plot(rows: list[Row], path: Path) -> None:
    """FD-digits, recall and class error against w (the unguided run as a horizontal line)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4.3))
    unguided = next(row for row in rows if row.method == UNGUIDED)
    metrics = [("fd", "FD-digits (lower is better)"), ("recall", "recall (k = 3)"),
               ("error", "class error % (evaluation network)")]
    value = {"fd": lambda r: r.fd, "recall": lambda r: r.recall, "error": lambda r: 100 * (1 - r.accuracy)}
    for ax, (key, label) in zip(axes, metrics):
        for method in ("CFG", "Autoguidance", "GFCG+Autoguidance"):
            picked = [row for row in rows if row.method == method]
            ax.plot([float(row.scale.split("=")[1]) for row in picked], [value[key](row) for row in picked],
                    marker="o", label=method, linestyle="--" if method == "CFG" else "-")
        ax.axhline(value[key](unguided), color="gray", linestyle=":", label="unguided")
        ax.set(xlabel="guidance scale w", ylabel=label)
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[Row]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder with digits/, digits-weak/, "
                        "classifier/ and evaluator/ (default samples/weights)")
    parser.add_argument("--per-class", type=int, default=100, help="samples per class (default 100: 1,000 samples)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scales", type=float, nargs="+", default=[1.5, 2.0, 3.0], help="w of CFG and Autoguidance")
    parser.add_argument("--gfcg-lambda", type=float, default=2.0, help="GFCG's lambda on top of Autoguidance")
    parser.add_argument("--variant-scale", type=float, default=2.0, help="w of the alternative GFCG+Autoguidance "
                        "readings (additive form, exclude_target reference)")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; --smoke: "
                        "a temporary folder)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the 8x8 model's operations "
                        "gain nothing from more, and lose badly on a shared machine)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every configuration)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.per_class, args.steps = 4, 3
    setup, bad, prediction_type = load_pair(args.weights, args.smoke)
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    other_noise = torch.randn(noise.shape, generator=torch.Generator().manual_seed(args.seed + 1))
    configurations = [(*run, noise) for run in runs(setup, bad, prediction_type, args)]
    configurations.append((f"{UNGUIDED} (other seed)", "w=1", CFG(1.0), other_noise))  # the FD's seed noise
    rows = []
    for method, scale, guidance, start in configurations:
        rows.append(measure(setup, method, scale, guidance, labels, start, args.steps))
        r = rows[-1]
        print(f"{method:18s} {scale:6s} FD {r.fd:.3f} P {r.precision:.3f} R {r.recall:.3f} acc {r.accuracy:.4f} "
              f"NFE {r.nfe:g} {r.nfe_per_network} {r.seconds:.1f}s", flush=True)
    out = args.out or (Path(tempfile.mkdtemp(prefix="autoguidance-smoke-")) if args.smoke else RESULTS)
    header = (f"Autoguidance benchmark ({len(labels)} samples, {args.per_class} per class, {args.steps} DDIM steps, "
              f"seed {args.seed}) on {setup.source}; GFCG lambda {args.gfcg_lambda:g}, otherwise GFCG's defaults.")
    path = write(rows, out, header, args.steps)
    plot(rows, out / "autoguidance.png")
    print(path.read_text())
    return rows


if __name__ == "__main__":
    main()
