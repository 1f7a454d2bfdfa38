"""Quality of every registered guidance method on the embedded digits model, with ``guidance-evaluate``.

    python -m benchmarks.quality            # 8 methods x 3 scales x 1,000 samples -> benchmarks/results/quality/
    python -m benchmarks.quality --weights DIR   # the same with digits/, evaluator/, classifier/ from DIR
    python -m benchmarks.quality --smoke    # tiny random networks, 20 samples: checks the script end to end

Every method (every registered name; rules without a scale of their own composed with CFG: ``nlg+cfg``,
``cfg+tag``) runs at each scale on the same 1,000 seeds and labels (image ``i``: seed ``i``, class ``i % 10``) with
deterministic DDIM with 8 steps: the step count that keeps the whole table (about 470,000 network evaluations) inside
15 minutes on 2 CPU cores; on this model FD-digits of CFG at w = 3 is no worse at 8 steps than at 10 or 25. The tool
writes FD-digits (Frechet distance of the embedded evaluation network's features against the 360 held-out real
digits), precision/recall (k = 3), class accuracy (evaluation network, never GFCG's guidance classifier), saturation
(grayscale: fraction of pixel values outside [-1, 1] before the clamp), NFE per image and images/s. This script then
prints the table and, side by side, each method's FD, NFE and saturation as ratios to CFG at the same scale, measured
in the same run. Shards live in ``outputs/quality`` (a re-run resumes); the table, plots and grids are copied to
``benchmarks/results/quality/`` together with ``quality.md``.

The scale is each rule's own ``guidance_scale``: CFG's w for CFG, APG, AG, LinearAG, TAG and NLG (with CFG), TAG-cfg's
w, and GFCG's lambda (its confusion factor; GFCG alone adds no CFG). Scales of different rules are therefore not the
same knob: compare methods along their curves (FD against NFE, precision against recall), not column by column.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

from samples.evaluate.command import main as evaluate

RESULTS = Path(__file__).resolve().parent / "results" / "quality"
WORK = Path("outputs") / "quality"
SCALES = ("1.5", "3", "6")
STEPS = 8
SAMPLES = 1000
COPIED = ("results.csv", "results.json", "fd_vs_scale.png", "precision_recall.png", "saturation_vs_scale.png")


def smoke_model(root: Path) -> list[str]:
    """Tiny random stand-ins for the embedded model, classifier and evaluator; the arguments that select them."""
    from diffusers import DDIMScheduler, UNet2DModel

    from pipelines import GuidedClassConditionalPipeline
    from samples.digits.nets import DigitClassifier, DigitEvaluator, save_network
    from scripts.train_digits import NULL_LABEL, QUICK_UNET_CONFIG, SCHEDULER_CONFIG

    torch.manual_seed(0)
    unet = UNet2DModel(**QUICK_UNET_CONFIG)
    scheduler = DDIMScheduler(**SCHEDULER_CONFIG)
    GuidedClassConditionalPipeline(scheduler, unet=unet, null_class_label=NULL_LABEL).save_pretrained(root / "model")
    save_network(DigitEvaluator(width=8, feature_dim=16), root / "evaluator")
    save_network(DigitClassifier(width=8), root / "classifier")
    return ["--model", str(root / "model"), "--evaluator", str(root / "evaluator"), "--classifier",
            str(root / "classifier"), "--scheduler", "ddim"]


def ratio(value: float | None, reference: float | None) -> str:
    if value is None or reference is None or reference == 0 or math.isnan(value) or math.isnan(reference):
        return "-"
    return f"{value / reference:.2f}"


def ratio_table(rows: list[dict]) -> str:
    """Each method against CFG at the same scale: FD, NFE and saturation ratios (same run, same seeds)."""
    cfg = {row["scale"]: row for row in rows if row["method"] == "cfg"}
    lines = ["| method | scale | FD / CFG | NFE / CFG | saturation / CFG | class acc. - CFG |", "|---|---|---|---|---|---|"]
    for row in rows:
        ref = cfg.get(row["scale"])
        if ref is None:
            continue
        acc = row["class_accuracy"], ref["class_accuracy"]
        delta = "-" if None in acc else f"{acc[0] - acc[1]:+.3f}"
        lines.append(f"| {row['method']} | {row['scale']:g} | {ratio(row['fd'], ref['fd'])} | "
                     f"{ratio(row['nfe_per_image'], ref['nfe_per_image'])} | "
                     f"{ratio(row['saturation'], ref['saturation'])} | {delta} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny random networks, 20 samples (numbers meaningless)")
    parser.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: %(default)s)")
    parser.add_argument("--weights", type=Path, help="folder with digits/, evaluator/, classifier/ (default: "
                        "samples/weights)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    with tempfile.TemporaryDirectory() as tmp:
        work, results, samples = WORK, RESULTS, SAMPLES
        extra: list[str] = []
        if args.weights:
            extra = ["--model", str(args.weights / "digits"), "--evaluator", str(args.weights / "evaluator"),
                     "--classifier", str(args.weights / "classifier"), "--scheduler", "ddim"]
        if args.smoke:
            extra = smoke_model(Path(tmp))
            work, results, samples = Path(tmp) / "run", RESULTS.with_name("quality_smoke"), 20
        command = [*extra, "--scale", *SCALES, "-n", str(samples), "--steps", str(STEPS), "--batch-size", "500",
                   "--shard-size", "500", "--seed", "0", "--out", str(work)]
        start, cpu_start = time.perf_counter(), time.process_time()
        code = evaluate(command)
        seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - cpu_start
        if code != 0 or not (work / "results.json").is_file():
            return code or 1
        results.mkdir(parents=True, exist_ok=True)
        for name in COPIED:
            shutil.copy(work / name, results / name)
        for grid in work.glob("grid_*.png"):
            shutil.copy(grid, results / grid.name)

    from samples.evaluate.report import markdown_table

    data = json.loads((results / "results.json").read_text())
    rows = data["rows"]
    generation = sum(row["num_samples"] / row["images_per_s"] for row in rows)
    setting = (
        f"`python -m benchmarks.quality{' --smoke' if args.smoke else ''}`: {samples} samples per cell, DDIM "
        f"{STEPS} steps, seed 0, extractor `{data['extractor']}`, reference: {data['reference']['source']}; "
        f"saturation = {data['saturation']['definition']}. Generation took {generation / 60:.1f} min of wall time "
        f"(sum over the shards, including earlier runs this one resumed); this invocation: {seconds / 60:.1f} min "
        f"wall, {cpu_seconds / 60:.1f} min CPU (all threads) with {args.threads} threads. On a shared machine the "
        "wall times overstate the cost."
    )
    report = "\n\n".join([
        f"# Guidance quality on the embedded digits model ({'SMOKE: random networks' if args.smoke else 'trained'})",
        setting,
        markdown_table(rows),
        "Ratios to CFG at the same scale (same run, same seeds):",
        ratio_table(rows),
    ])
    (results / "quality.md").write_text(report + "\n")
    print(report)
    print(f"wrote {results}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
