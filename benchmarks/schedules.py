"""When to guide and how much: CFG vs a guidance interval vs scale schedules vs DynamicCFG on the embedded digits model.

    python -m benchmarks.schedules                # the table + plot under benchmarks/results/
    python -m benchmarks.schedules --smoke        # tiny random networks: checks the script end to end

Every configuration samples the same labels (``--per-class`` per digit) from the same initial noise with
deterministic DDIM (``--steps``, default 25) on ``samples/weights/digits``. DynamicCFG scores its candidates with the
guiding classifier (``load_classifier()``); accuracy, FD-digits and k-NN precision/recall (k = 3) come from the
separate evaluation network (``load_evaluator()``), as in ``benchmarks/gfcg.py``. Rows at CFG's NFE (schedules,
DynamicCFG) are compared with CFG directly; the interval saves evaluations, so it is also compared with CFG run with
fewer steps at (about) the same NFE.

The issue's claim is checked and printed: CFG w = 3 limited to sigma in (0.28, 2] has FD-digits <= 0.75x plain CFG
w = 3's, accuracy >= 99% and NFE <= 0.8x.

Written: ``benchmarks/results/schedules.{csv,md}`` and ``schedules_chosen_scales.png`` (the distribution of the scale
DynamicCFG chose at every step).
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from benchmarks.gfcg import RESULTS, Row, Setup, load_setup, measure, write_rows_csv
from guidance import CFG, DynamicCFG, Guidance, GuidanceInterval, ScaleSchedule
from samples.digits.data import NUM_CLASSES
from samples.digits.nets import WEIGHTS_DIR

INTERVAL = (0.28, 2.0)
#: the claim of issue 15 for CFG w = 3 in (0.28, 2]: FD ratio at most, accuracy at least, NFE ratio at most
CLAIM = {"fd_ratio": 0.75, "accuracy": 0.99, "nfe_ratio": 0.8}


def configurations(setup: Setup, scale: float, steps: int) -> list[tuple[str, str, Guidance, int]]:
    """``(method, setting, rule, steps)`` of every row."""
    candidates = tuple(1.0 + (scale - 1.0) * k / 4 for k in range(5))
    wide = tuple(1.0 + (2 * scale - 2.0) * k / 8 for k in range(9))  # up to 2w - 1, as the increasing schedules
    classifier = setup.classifier
    interval_steps = sum(1 for s in noise_levels(setup, steps) if INTERVAL[0] < s <= INTERVAL[1])
    matched = round((steps + interval_steps) / 2)  # CFG with this many steps has about the interval's NFE
    low, high = INTERVAL
    return [
        ("conditional", "w=1", CFG(1.0), steps),
        ("CFG", f"w={scale:g}", CFG(scale), steps),
        ("CFG, fewer steps", f"w={scale:g}, {matched} steps", CFG(scale), matched),
        ("interval", f"w={scale:g}, sigma in ({low:g}, {high:g}]", GuidanceInterval(CFG(scale), INTERVAL), steps),
        ("schedule linear", f"w={scale:g} (1 -> {2 * scale - 1:g})", ScaleSchedule(CFG(scale), "linear"), steps),
        ("schedule cosine", f"w={scale:g} (1 -> {2 * scale - 1:g})", ScaleSchedule(CFG(scale), "cosine"), steps),
        ("DynamicCFG", f"log p(c), scales {_span(candidates)}", DynamicCFG(candidates, classifier=classifier), steps),
        ("DynamicCFG", f"log p(c) capped 0.9, scales {_span(candidates)}",
         DynamicCFG(candidates, {"name": "classifier", "cap": 0.9}, classifier), steps),
        ("DynamicCFG", f"log p(c) capped 0.9, scales {_span(wide)}",
         DynamicCFG(wide, {"name": "classifier", "cap": 0.9}, classifier), steps),
        ("DynamicCFG + interval", f"capped 0.9, scales {_span(wide)}, sigma in ({low:g}, {high:g}]",
         GuidanceInterval(DynamicCFG(wide, {"name": "classifier", "cap": 0.9}, classifier), INTERVAL), steps),
    ]


def _span(scales: tuple[float, ...]) -> str:
    return f"{scales[0]:g}..{scales[-1]:g} (K={len(scales)})"


def noise_levels(setup: Setup, steps: int) -> list[float]:
    """sigma / alpha at every DDIM timestep of ``steps`` steps."""
    scheduler = setup.pipe.scheduler
    scheduler.set_timesteps(steps)
    abar = scheduler.alphas_cumprod[scheduler.timesteps].double()
    return ((1 - abar) / abar).sqrt().tolist()


def dynamic_rule(rule: Guidance) -> DynamicCFG | None:
    while not isinstance(rule, DynamicCFG) and isinstance(getattr(rule, "base", None), Guidance):
        rule = rule.base
    return rule if isinstance(rule, DynamicCFG) else None


def write_table(rows: list[Row], out: Path, header: str, claim: list[str]) -> Path:
    write_rows_csv(rows, out / "schedules.csv")
    cfg = next(row for row in rows if row.method == "CFG")
    lines = [header, "", "| method | setting | FD-digits | FD / CFG | precision | recall | accuracy | NFE | NFE / CFG |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        lines.append(f"| {row.method} | {row.scale} | {row.fd:.2f} | {row.fd / cfg.fd:.2f} | {row.precision:.3f} | "
                     f"{row.recall:.3f} | {100 * row.accuracy:.1f}% | {row.nfe:g} | {row.nfe / cfg.nfe:.2f} |")
    path = out / "schedules.md"
    path.write_text("\n".join(lines + [""] + claim) + "\n")
    return path


def check_claim(rows: list[Row]) -> list[str]:
    """The issue's claim for the interval row against plain CFG, as printed lines (PASS / FAIL per part)."""
    cfg = next(row for row in rows if row.method == "CFG")
    interval = next(row for row in rows if row.method == "interval")
    parts = [
        (f"FD-digits {interval.fd:.2f} <= {CLAIM['fd_ratio']} x {cfg.fd:.2f} (ratio {interval.fd / cfg.fd:.2f})",
         interval.fd <= CLAIM["fd_ratio"] * cfg.fd),
        (f"accuracy {100 * interval.accuracy:.1f}% >= {100 * CLAIM['accuracy']:.0f}%",
         interval.accuracy >= CLAIM["accuracy"]),
        (f"NFE {interval.nfe:g} <= {CLAIM['nfe_ratio']} x {cfg.nfe:g} (ratio {interval.nfe / cfg.nfe:.2f})",
         interval.nfe <= CLAIM["nfe_ratio"] * cfg.nfe),
    ]
    verdicts = "; ".join(f"{text}: {'PASS' if ok else 'FAIL'}" for text, ok in parts)
    return [f"Claim (interval vs CFG): {verdicts}"]


def plot_chosen_scales(chosen: dict[str, torch.Tensor], path: Path) -> None:
    """One panel per DynamicCFG row: for every step, the fraction of samples that chose each candidate scale."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = min(2, len(chosen))
    rows = -(-len(chosen) // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(6.4 * columns, 3.6 * rows), squeeze=False)
    for ax in axes.flat[len(chosen):]:
        ax.set_visible(False)
    for ax, (label, table) in zip(axes.flat, chosen.items()):
        scales = sorted({float(v) for v in table[torch.isfinite(table)].tolist()})
        steps = torch.arange(table.shape[0])
        bottom = torch.zeros(table.shape[0], dtype=torch.float64)
        colors = plt.cm.viridis(torch.linspace(0, 1, max(len(scales), 2)).numpy())
        for scale, color in zip(scales, colors):
            counted = torch.isfinite(table).sum(1).clamp_min(1)
            share = (table == scale).sum(1) / counted
            ax.bar(steps.numpy(), share.numpy(), bottom=bottom.numpy(), color=color, width=0.9, label=f"w={scale:g}")
            bottom += share
        ax.set_title(label, fontsize=8)
        ax.set_xlabel("step (0 = highest noise)")
        ax.set_ylabel("fraction of samples")
        ax.set_xlim(-0.6, table.shape[0] - 0.4)
        ax.legend(fontsize=6, ncol=1, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--weights", type=Path, default=WEIGHTS_DIR, help="folder with digits/, classifier/ and "
                        "evaluator/ (default samples/weights)")
    parser.add_argument("--per-class", type=int, default=50, help="samples per class (default 50: 500 samples)")
    parser.add_argument("--steps", type=int, default=25, help="DDIM steps")
    parser.add_argument("--scale", type=float, default=3.0, help="CFG scale w")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--out", type=Path, default=None, help="results folder (default benchmarks/results; "
                        "--smoke: a temporary folder)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0, help="seed of the initial noise (shared by every row)")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.smoke:
        args.per_class, args.steps = 4, 4
    setup = load_setup(args.weights, args.smoke, checkpoint="digits")
    labels = torch.arange(NUM_CLASSES).repeat_interleave(args.per_class)
    noise = torch.randn((len(labels), 1, 8, 8), generator=torch.Generator().manual_seed(args.seed))
    rows, chosen = [], {}
    for method, setting, rule, steps in configurations(setup, args.scale, args.steps):
        rows.append(measure(setup, method, setting, rule, labels, noise, steps))
        r = rows[-1]
        print(f"{method:22s} {setting:48s} FD {r.fd:7.3f} P {r.precision:.3f} R {r.recall:.3f} acc {r.accuracy:.3f} "
              f"NFE {r.nfe:g} {r.seconds:.0f}s", flush=True)
        dynamic = dynamic_rule(rule)
        if dynamic is not None:
            chosen[f"{method}: {setting}"] = chosen_per_step(dynamic, steps)
    out = args.out or (Path(tempfile.mkdtemp(prefix="schedules-smoke-")) if args.smoke else RESULTS)
    header = (f"Guidance intervals, schedules and DynamicCFG ({len(labels)} samples, {args.steps} DDIM steps, seed "
              f"{args.seed}) on {setup.source}.")
    claim = check_claim(rows)
    path = write_table(rows, out, header, claim)
    plot_chosen_scales(chosen, out / "schedules_chosen_scales.png")
    print(path.read_text())


def chosen_per_step(rule: DynamicCFG, steps: int) -> torch.Tensor:
    """Chosen scale ``[steps, batch]`` (NaN at steps where the rule was not consulted, e.g. outside an interval)."""
    table = torch.full((steps, len(rule.history[0]["scale"])), float("nan"), dtype=torch.float64)
    for record, scales in zip(rule.history, rule.chosen_scales):
        table[record["step"]] = scales
    return table


if __name__ == "__main__":
    main()
