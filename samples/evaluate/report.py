"""What ``guidance-evaluate`` writes: the results table (CSV + JSON), metric-vs-scale plots and sample grids.

One row per (method, scale). Plots have one line per method; they are drawn on a bare ``matplotlib.figure.Figure``
(rendered by Agg when saved), so no pyplot state or display is involved.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from samples.evaluate import shards
from samples.evaluate.jobs import slug
from samples.extras import require
from samples.generate.grid import labelled_grid

#: the columns of ``results.csv``, in order
COLUMNS = (
    "method",
    "scale",
    "num_samples",
    "fd",
    "precision",
    "recall",
    "class_accuracy",
    "saturation",
    "clipped_fraction",
    "overshoot_fraction",
    "nfe_per_image",
    "images_per_s",
    "extractor",
)

#: metric -> (axis label, file name) of the metric-vs-scale plots
SCALE_PLOTS = {
    "fd": ("Frechet distance (lower is better)", "fd_vs_scale.png"),
    "saturation": ("saturation (see results.json for the definition)", "saturation_vs_scale.png"),
}


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "" if math.isnan(value) else f"{value:.6g}"
    return "" if value is None else value


def write_tables(rows: Sequence[dict[str, Any]], meta: dict[str, Any], out: Path) -> tuple[Path, Path]:
    """``results.csv`` (the :data:`COLUMNS`) and ``results.json`` (``meta`` plus every row with its config)."""
    csv_path, json_path = out / "results.csv", out / "results.json"
    with open(csv_path, "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        writer.writerows({key: _csv_value(row.get(key)) for key in COLUMNS} for row in rows)
    safe_rows = [{k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in row.items()} for row in rows]
    json_path.write_text(json.dumps({**meta, "rows": safe_rows}, indent=2) + "\n")
    return csv_path, json_path


def markdown_table(rows: Sequence[dict[str, Any]]) -> str:
    """The results as a Markdown table (for the console and the README)."""
    header = ["method", "scale", "N", "FD", "precision", "recall", "class acc.", "saturation", "overshoot",
              "NFE/img", "img/s"]
    keys = ["method", "scale", "num_samples", "fd", "precision", "recall", "class_accuracy", "saturation",
            "overshoot_fraction", "nfe_per_image", "images_per_s"]
    formats = {"fd": "{:.3f}", "precision": "{:.3f}", "recall": "{:.3f}", "class_accuracy": "{:.3f}",
               "saturation": "{:.4f}", "overshoot_fraction": "{:.4f}", "nfe_per_image": "{:.1f}",
               "images_per_s": "{:.1f}", "scale": "{:g}"}
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = []
        for key in keys:
            value = row.get(key)
            missing = value is None or (isinstance(value, float) and math.isnan(value))
            cells.append("-" if missing else formats.get(key, "{}").format(value))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _by_method(rows: Sequence[dict[str, Any]]) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = {}
    for row in rows:
        groups.setdefault(row["method"], []).append(row)
    return {method: sorted(group, key=lambda r: r["scale"]) for method, group in groups.items()}


def _figure() -> Any:
    """A bare matplotlib figure, 6 x 4 inches (matplotlib comes with the ``eval`` extra)."""
    require("matplotlib", "eval", "the evaluation plots")
    from matplotlib.figure import Figure

    return Figure(figsize=(6, 4))


def plot_vs_scale(rows: Sequence[dict[str, Any]], metric: str, ylabel: str, path: Path, title: str) -> None:
    """``metric`` against the guidance scale, one line per method."""
    fig = _figure()
    ax = fig.subplots()
    for method, group in _by_method(rows).items():
        ax.plot([r["scale"] for r in group], [r[metric] for r in group], marker="o", label=method)
    ax.set_xlabel("guidance scale")
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def plot_precision_recall(rows: Sequence[dict[str, Any]], path: Path, title: str) -> None:
    """Precision against recall, one line per method through its scales (each point labelled with its scale)."""
    fig = _figure()
    ax = fig.subplots()
    for method, group in _by_method(rows).items():
        recall, precision = [r["recall"] for r in group], [r["precision"] for r in group]
        ax.plot(recall, precision, marker="o", label=method)
        for r in group:
            ax.annotate(f"{r['scale']:g}", (r["recall"], r["precision"]), fontsize=6, xytext=(2, 2),
                        textcoords="offset points")
    ax.set_xlabel("recall (k=3)")
    ax.set_ylabel("precision (k=3)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def write_plots(rows: Sequence[dict[str, Any]], out: Path, extractor: str) -> list[Path]:
    """``fd_vs_scale.png``, ``precision_recall.png`` and ``saturation_vs_scale.png`` under ``out``."""
    paths = []
    for metric, (label, name) in SCALE_PLOTS.items():
        plot_vs_scale(rows, metric, label, out / name, f"{label} vs scale ({extractor})")
        paths.append(out / name)
    plot_precision_recall(rows, out / "precision_recall.png", f"precision vs recall ({extractor})")
    paths.append(out / "precision_recall.png")
    return paths


def grid_indices(num_labels: int, per_column: int, num_samples: int, max_columns: int = 10) -> tuple[list[int], int]:
    """Indices of the grid images, column block by column block, and the number of column blocks.

    Image ``c + r * num_labels`` has label ``c`` (class or prompt); a block holds ``per_column`` of them (fewer when
    ``num_samples`` is small).
    """
    columns = min(num_labels, max_columns, num_samples)
    per_column = min(per_column, max(1, num_samples // num_labels))
    return [c + r * num_labels for c in range(columns) for r in range(per_column)], columns


def shard_images(root: Path, plan: Sequence[shards.Shard], indices: Sequence[int]) -> torch.Tensor:
    """``uint8`` images ``[len(indices), C, H, W]`` read from the shards of ``plan`` that hold them."""
    wanted = set(indices)
    found: dict[int, np.ndarray] = {}
    for shard in plan:
        if wanted.intersection(shard.indices):
            data = shards.read_shard(root, shard)
            found.update({int(i): image for i, image in zip(data["indices"], data["images"]) if int(i) in wanted})
    return torch.from_numpy(np.stack([found[i] for i in indices]))


def write_method_grids(
    root: Path,
    rows_by_method: dict[str, list[tuple[float, Sequence[shards.Shard]]]],
    column_labels: Sequence[str],
    per_column: int,
    num_samples: int,
    title: str = "",
) -> list[Path]:
    """``grid_<method>.png`` per method: a row per scale, a column block per class / prompt (same seeds throughout).

    ``title`` (model, scheduler, steps) heads every grid, after the method's name.
    """
    indices, columns = grid_indices(len(column_labels), per_column, num_samples)
    paths = []
    for method, scale_plans in rows_by_method.items():
        rows = [(f"w={scale:g}", shard_images(root, plan, indices).float() / 255) for scale, plan in scale_plans]
        path = root / f"grid_{slug(method)}.png"
        heading = f"{method}: {title}" if title else method
        labelled_grid(rows, list(column_labels[:columns]), len(indices) // columns, title=heading).save(path)
        paths.append(path)
    return paths
