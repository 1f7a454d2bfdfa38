"""``guidance-evaluate``: FID-style evaluation of guidance methods across scales, sharded and resumable.

For a model (the embedded 8x8 digits model by default, or a local pipeline folder / hub id), every method in
``--guidance`` at every scale in ``--scale`` is a *cell* of ``--num-samples`` images with per-image seeds
(:mod:`samples.evaluate.jobs`). Generation runs in shards (:mod:`samples.evaluate.shards`) spread over the processes of
``accelerate launch`` / ``torchrun`` (one process without a launcher); each shard is written atomically and re-running
the same command resumes. After all processes finish, process 0 extracts features (:mod:`samples.metrics.features`), computes
the metrics and writes the tables, plots and grids (:mod:`samples.evaluate.report`).

Metrics per cell: Frechet distance to the reference statistics (:mod:`samples.metrics.frechet`), precision and recall
(k = 3, :mod:`samples.metrics.precision_recall`), class accuracy by the embedded evaluation network (digits only; never the
classifier GFCG guides with), saturation (:mod:`samples.metrics.saturation`), NFE per image and images per second (per
process). Bad input (an uncreatable ``--output`` included, checked before any model loads) and a generation that
must not be scored (non-finite images, a run the guidance refuses) print one ``guidance-evaluate: error:`` line and
exit with status 2. Damaged shard files (checksum or load failure) are reported in one line each, moved aside and
generated again.
"""

from __future__ import annotations

from samples import cli  # first: quiet third-party start-up, and the package check

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402

from samples.evaluate import report, shards  # noqa: E402
from samples.digits.data import load_heldout  # noqa: E402
from samples.extras import MissingExtraError, require  # noqa: E402
from samples.digits.nets import EMBEDDED_MODEL, WEIGHTS_DIR, WEIGHTS_NAME, load_classifier
from samples.evaluate.jobs import (
    CALIBRATION_IMAGES,
    Cell,
    GenerationError,
    Task,
    UsageError,
    build_guidance,
    default_methods,
    describe_task,
    fingerprint,
    fit_coefficients,
    generate,
    plan_cells,
)
from samples.metrics.features import (
    EXTRACTOR_KINDS,
    DigitsExtractor,
    FeatureExtractor,
    Reference,
    build_extractor,
    file_digest,
    folder_reference,
    read_reference_npz,
    reference_extractor_id,
    to_uint8,
)
from samples.loading import DTYPES, load_guiding_model, load_pipeline, set_scheduler
from samples.metrics.frechet import feature_statistics, frechet_distance_from_statistics
from samples.metrics.precision_recall import K_DEFAULT, precision_recall
from samples.metrics.saturation import DEFINITIONS, OVERSHOOT_MARGIN, saturation_kind

PROG = "guidance-evaluate"
MANIFEST = "run.json"
#: test hook: a process raises after writing this many shards (simulates a crash in the middle of a run)
FAIL_AFTER_ENV = "GUIDANCE_EVALUATE_FAIL_AFTER_SHARDS"


def build_parser() -> argparse.ArgumentParser:
    parser = cli.OneLineParser(prog=PROG, description="FID-style evaluation of guidance methods across scales (see README).")
    add = parser.add_argument
    add("--model", default=str(EMBEDDED_MODEL), help="pipeline folder or hub id (default: the embedded digits model)")
    cli.add_shared_arguments(
        parser, scale_help="guidance scales, one cell per method and scale (default: %(default)s)",
        scale_default=[1.0, 2.0, 4.0], many_scales=True, steps=25, out="outputs/evaluation",
        scheduler_help="swap the model's scheduler (default: ddim for the embedded model, else the model's own)",
    )
    add("--num-samples", "-n", type=int, default=1000, help="images per method and scale (default: %(default)s)")
    add("--batch-size", type=int, default=250, help="images per pipeline call (default: %(default)s)")
    add("--shard-size", type=int, default=500, help="images per shard file (default: %(default)s)")
    add("--prompts", help="text-to-image: a .txt file (one prompt per line) or a .csv (column prompt/text/caption)")
    add("--reference", help="real images: a folder of images or a .npz with mu, sigma, extractor (+ features) "
        "(default for the embedded model: the digits held-out split)")
    add("--save-reference", help="also write the reference statistics and features to this .npz")
    add("--extractor", choices=EXTRACTOR_KINDS, default="auto", help="feature extractor (default: %(default)s: "
        "Inception when its weights are given, else FD-digits)")
    add("--inception-weights", help="inception-2015-12-05.pt (TorchScript; or set $GUIDANCE_INCEPTION_WEIGHTS)")
    add("--evaluator", help="evaluation network folder for FD-digits and class accuracy (default: the embedded one)")
    add("--classifier", help="guidance classifier folder for methods that take one, e.g. gfcg (default: embedded)")
    add("--grid-per-class", type=int, default=2, help="images per class/prompt in each grid (default: %(default)s)")
    add("--device", help="torch device (default: the one accelerate assigns to this process)")
    add("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: %(default)s)")
    add("--dry-run", action="store_true", help="print the job count and a time estimate (one timed batch per method)")
    return parser


def validate(args: argparse.Namespace) -> None:
    try:
        require("matplotlib", "eval", f"{PROG} (its plots)")
    except MissingExtraError as error:
        raise UsageError(str(error)) from None
    if args.num_samples < 2:
        raise UsageError(f"--num-samples must be >= 2 (a covariance needs two samples), got {args.num_samples}")
    for name in ("steps", "batch_size", "shard_size", "grid_per_class"):
        if getattr(args, name) < 1:
            raise UsageError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.reference and not Path(args.reference).exists():
        raise UsageError(f"--reference {args.reference}: no such file or folder")
    check_output(Path(args.out))


def check_output(out: Path) -> None:
    """Create the output folder (before any model loads) and check that files can be written in it."""
    try:
        out.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=out):
            pass
    except OSError as error:
        raise UsageError(f"--out {out}: cannot create or write the folder ({error.strerror or error})") from None


def guiding_model_path(args: argparse.Namespace) -> str | None:
    """Autoguidance's guiding model (``--guiding-model``, or the weak digits checkpoint for the embedded model)."""
    embedded = Path(args.model).expanduser().resolve() == EMBEDDED_MODEL.resolve()
    return cli.guiding_model(args.guiding_model, embedded)


def guiding_model_id(path: str | None) -> str | None:
    """The guiding model's path and the digests of its weight files (they enter the hash of its cells)."""
    if path is None:
        return None
    files = sorted(Path(path).expanduser().glob("*/*.safetensors"))
    return f"{path}:{','.join(file_digest(f) for f in files)}"


def classifier_weights(args: argparse.Namespace) -> Path:
    """The guidance classifier's weights file (``--classifier`` or the embedded one)."""
    return (Path(args.classifier) if args.classifier else WEIGHTS_DIR / "classifier") / WEIGHTS_NAME


def guidance_classifier(args: argparse.Namespace, task: Task, device: str) -> Any:
    """The classifier for rules that take one (GFCG): only the digits classifier from the command line."""
    weights = classifier_weights(args)
    if not args.classifier and not task.is_digits:
        raise UsageError("a method needs a classifier; from the command line only the digits classifier "
                         "(--classifier FOLDER) is available, for 8x8 digit models")
    if not weights.is_file():
        raise UsageError(f"guidance classifier not found: {weights}")
    return load_classifier(weights.parent).to(device)


def coefficients_path(out: Path, cell: Cell) -> Path:
    """Where a cell's fitted LinearAG coefficients live (inside the cell's folder, so a resumed run reuses them)."""
    return out / cell.key / "linear_ag_coefficients.safetensors"


def check_manifest(out: Path, extractor_id: str) -> None:
    """Refuse to mix extractors in one output folder (a resumed run must use the same one)."""
    path = out / MANIFEST
    if path.is_file():
        found = json.loads(path.read_text()).get("extractor")
        if found != extractor_id:
            raise UsageError(f"{out} holds results made with extractor {found}; this run uses {extractor_id}: "
                             "results of different extractors are never merged (use another --out)")


def write_manifest(out: Path, meta: dict[str, Any]) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / (MANIFEST + ".tmp")
    tmp.write_text(json.dumps(meta, indent=2, default=str) + "\n")
    os.replace(tmp, out / MANIFEST)


def run_shards(pipe: Any, task: Task, cells: list[Cell], todo: list[shards.Shard], root: Path,
               inputs: dict[str, Any], batch_size: int, show: bool) -> None:
    """Generate and write this process's shards (progress bar with ETA on the main process)."""
    by_key = {cell.key: cell for cell in cells}
    fail_after = int(os.environ.get(FAIL_AFTER_ENV) or 0)
    modules: dict[str, Any] = {}
    with cli.progress(sum(s.count for s in todo), "generate", "img", quiet=not show) as bar:
        for written, shard in enumerate(todo, start=1):
            cell = by_key[shard.cell]
            if cell.key not in modules:
                cell_inputs = {**inputs, "coefficients": str(coefficients_path(root, cell))}
                modules[cell.key] = build_guidance(cell.config, cell_inputs)
            bar.set_postfix_str(f"{cell.method} w={cell.scale:g}")
            start = time.perf_counter()
            try:
                arrays = generate(pipe, task, modules[cell.key], shard.indices, batch_size)
            except (GenerationError, FloatingPointError, ValueError) as error:  # never a half-scored cell
                raise GenerationError(f"{cell.method} w={cell.scale:g}, shard {shard.path(root).name}: {error}") from None
            arrays["seconds"] = np.array(time.perf_counter() - start)
            shards.write_shard(root, shard, arrays)
            bar.update(shard.count)
            if fail_after and written >= fail_after:
                raise RuntimeError(f"{FAIL_AFTER_ENV}={fail_after}: stopped after {written} shards (test hook)")


def dry_run(pipe: Any, task: Task, cells: list[Cell], plans: dict[str, list[shards.Shard]], todo: list[shards.Shard],
            inputs: dict[str, Any], args: argparse.Namespace, world: int) -> str:
    """The job count and an estimate of the generation time.

    Each method is timed on two small batches (``b1 < b2`` images); the model ``t(b) = overhead + b * per_image``
    through both points is extrapolated to ``--batch-size``. A method with fitted coefficients is timed as CFG (an
    upper bound of its cost; the calibration is not included).
    """
    sizes = (min(args.batch_size, 8), min(args.batch_size, 32))
    per_image: dict[str, float] = {}
    for cell in cells:
        if cell.method not in per_image:
            fitted = "coefficients" in cell.needs
            guidance = build_guidance({"name": "cfg", "guidance_scale": cell.scale} if fitted else cell.config, inputs)
            times = []
            for size in sizes:
                start = time.perf_counter()
                generate(pipe, task, guidance, range(size), size)
                times.append(time.perf_counter() - start)
            marginal = (times[1] - times[0]) / (sizes[1] - sizes[0]) if sizes[1] > sizes[0] else times[1] / sizes[1]
            marginal = max(marginal, 0.0)
            overhead = max(times[0] - sizes[0] * marginal, 0.0)
            per_image[cell.method] = marginal + overhead / args.batch_size
    pending = {cell.key: sum(s.count for s in todo if s.cell == cell.key) for cell in cells}
    seconds = sum(per_image[cell.method] * pending[cell.key] for cell in cells) / world
    methods = len(per_image)
    return (f"{len(cells)} cells ({methods} methods x {len(args.scale)} scales) x {args.num_samples} images = "
            f"{len(cells) * args.num_samples} images in {sum(map(len, plans.values()))} shards; pending: "
            f"{sum(pending.values())} images in {len(todo)} shards\nestimated generation time: {seconds / 60:.1f} min "
            f"on {world} process(es) (each method timed on batches of {sizes[0]} and {sizes[1]} images, "
            f"extrapolated to batches of {args.batch_size})")


def load_reference(args: argparse.Namespace, task: Task, extractor: FeatureExtractor) -> Reference:
    """The real-image statistics: ``--reference`` (folder or .npz) or the digits held-out split."""
    if args.reference and Path(args.reference).is_dir():
        return folder_reference(args.reference, extractor, task.image_shape)
    if args.reference:
        return read_reference_npz(args.reference, extractor.id)
    images = to_uint8(load_heldout()[0])
    return Reference.from_features(extractor.extract(images), extractor.id, f"digits held-out split ({len(images)})")


def cell_metrics(root: Path, cell: Cell, plan: list[shards.Shard], extractor: FeatureExtractor,
                 accuracy_net: DigitsExtractor | None, reference: Reference) -> dict[str, Any]:
    """One results row; shards are read one at a time and their images replaced by features."""

    def convert(arrays: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        images = arrays.pop("images")
        arrays["features"] = extractor.extract(images).astype(np.float32)
        if accuracy_net is not None:
            arrays["correct"] = accuracy_net.predict(images) == arrays["labels"]
        return arrays

    samples, per_shard = shards.read_cell(root, plan, convert)
    feats = samples["features"].astype(np.float64)
    fd = frechet_distance_from_statistics(*feature_statistics(feats), reference.mu, reference.sigma)
    precision = recall = float("nan")
    if reference.features is not None and min(len(feats), len(reference.features)) > K_DEFAULT:
        precision, recall = precision_recall(reference.features, feats, k=K_DEFAULT)
    return {
        "method": cell.method, "scale": cell.scale, "num_samples": len(feats), "fd": fd,
        "precision": precision, "recall": recall,
        "class_accuracy": float(samples["correct"].mean()) if "correct" in samples else float("nan"),
        "saturation": float(samples["saturation"].mean()), "clipped_fraction": float(samples["clipped"].mean()),
        "overshoot_fraction": float(samples["overshoot"].mean()),
        "nfe_per_image": float(samples["nfe"].mean()),
        "images_per_s": len(feats) / float(per_shard["seconds"].sum()),
        "extractor": extractor.id, "cell": cell.key, "config": json.loads(json.dumps(cell.config, default=str)),
    }


def setup(args: argparse.Namespace, device: str) -> tuple[Any, Task, FeatureExtractor, DigitsExtractor | None]:
    """Load the model and check everything that can be checked before any sample is generated."""
    diffusers_logging.disable_progress_bar()
    try:
        pipe = load_pipeline(args.model, device, DTYPES[args.dtype])
        embedded = Path(args.model).expanduser().resolve() == EMBEDDED_MODEL.resolve()
        if args.scheduler or embedded:
            set_scheduler(pipe, args.scheduler or "ddim")
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    pipe.set_progress_bar_config(disable=True)
    task = describe_task(pipe, args.steps, args.seed, args.prompts)
    if not args.reference and not task.is_digits:
        kind = "text-to-image" if not task.class_conditional else "this model's"
        raise UsageError(f"{kind} evaluation needs --reference (a folder of real images or a .npz of statistics)")
    try:
        extractor = build_extractor(args.extractor, task.image_shape, args.inception_weights, args.evaluator, device)
        accuracy_net = None
        if task.is_digits:
            same = isinstance(extractor, DigitsExtractor)
            accuracy_net = extractor if same else DigitsExtractor(args.evaluator, device)
        if args.reference and Path(args.reference).is_file():
            found = reference_extractor_id(args.reference)
            if found != extractor.id:
                raise UsageError(f"--reference {args.reference} was made with extractor {found}, this run uses "
                                 f"{extractor.id}: statistics of different extractors are never compared")
    except (OSError, ValueError) as error:
        raise UsageError(str(error)) from None
    return pipe, task, extractor, accuracy_net


def report_damaged(moved: list[tuple[Path, str]]) -> None:
    """One line per damaged shard that was moved aside."""
    for target, reason in moved:
        print(f"{PROG}: damaged shard: {reason}; moved to {target.name}, it is generated again", file=sys.stderr)


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    validate(args)
    # without CUDA (or under `accelerate launch --cpu`) several processes talk over gloo on the CPU
    cpu = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true") or not torch.cuda.is_available()
    state = PartialState(cpu=cpu)
    device = args.device or str(state.device)
    pipe, task, extractor, accuracy_net = setup(args, device)
    scheduler = type(pipe.scheduler).__name__
    weights = classifier_weights(args)
    supplied = {
        "classifier": f"digits-classifier/{file_digest(weights)}" if weights.is_file() else None,
        "coefficients": f"fitted with CFG at the cell's scale on {CALIBRATION_IMAGES} calibration images",
        "model_id": args.model,
        "scheduler": scheduler,
        "model": guiding_model_id(guiding_model_path(args)),
        "prediction_type": "the guiding model's scheduler's prediction type",
    }
    material = fingerprint(args.model, pipe, task, args.dtype, args.shard_size)
    cells = plan_cells(args.guidance or default_methods(), args.scale, material, supplied, args.batch_size)
    inputs: dict[str, Any] = {"model_id": args.model, "scheduler": scheduler}
    if any("classifier" in cell.needs for cell in cells):
        inputs["classifier"] = guidance_classifier(args, task, device)
    if any("model" in cell.needs for cell in cells):
        guide = guiding_model_path(args)
        if guide is None:
            raise UsageError("autoguidance needs a guiding model: pass --guiding-model (a pipeline folder or hub id)")
        try:
            inputs["model"], inputs["prediction_type"] = load_guiding_model(guide, device, DTYPES[args.dtype])
        except (OSError, ValueError) as error:
            raise UsageError(str(error)) from None
    out = Path(args.out)
    check_manifest(out, extractor.id)
    plans = {cell.key: shards.plan(cell.key, args.num_samples, args.shard_size) for cell in cells}
    planned = [shard for plan in plans.values() for shard in plan]
    if state.is_main_process:
        report_damaged(shards.quarantine(out, planned))
    state.wait_for_everyone()  # damaged shards are out of the way before any process lists the pending ones
    todo = shards.pending(out, planned)
    if args.dry_run:
        message = dry_run(pipe, task, cells, plans, todo, inputs, args, state.num_processes)
        if state.is_main_process:
            print(message)
        return 0

    state.wait_for_everyone()  # every process has listed the pending shards before any is written
    if state.is_main_process:
        write_manifest(out, {"extractor": extractor.id, "model": args.model})
        for cell in cells:
            path = coefficients_path(out, cell)
            if "coefficients" in cell.needs and not path.is_file() and any(s.cell == cell.key for s in todo):
                print(f"fitting LinearAG coefficients for {cell.method} w={cell.scale:g} ({CALIBRATION_IMAGES} images)")
                fit_coefficients(pipe, task, cell.scale, args.model, path, args.batch_size)
    state.wait_for_everyone()  # fitted coefficients are on disk before any process builds its guidance
    mine = shards.assign(todo, state.process_index, state.num_processes)
    run_shards(pipe, task, cells, mine, out, inputs, args.batch_size, state.is_main_process and not args.quiet)
    state.wait_for_everyone()
    if not state.is_main_process:
        return 0

    reference = load_reference(args, task, extractor)
    if args.save_reference:
        reference.save(args.save_reference)
    rows = []
    try:
        with cli.progress(len(cells), "metrics", "cells", quiet=args.quiet) as bar:
            for cell in cells:
                rows.append(cell_metrics(out, cell, plans[cell.key], extractor, accuracy_net, reference))
                bar.update()
    except shards.DamagedShardError as error:  # damaged after this run's check: set it aside for the next run
        report_damaged(shards.quarantine(out, planned))
        raise GenerationError(f"{error}; run the same command again to regenerate it") from None
    kind = saturation_kind(task.image_shape[0])
    meta = {
        "extractor": extractor.id,
        "accuracy_network": accuracy_net.id if accuracy_net is not None else None,
        "supplied_arguments": {name: supplied[name] for name in sorted(set().union(*(c.needs for c in cells)))},
        "reference": {"source": reference.source, "num_images": reference.num_images},
        "saturation": {"kind": kind, "definition": DEFINITIONS[kind]},
        "overshoot_fraction": f"fraction of decoded pixel values more than {OVERSHOOT_MARGIN} outside [-1,1]",
        "precision_recall_k": K_DEFAULT,
        "settings": {"model": args.model, "num_samples": args.num_samples, "seed": args.seed, "steps": args.steps,
                     "scheduler": type(pipe.scheduler).__name__, "scales": args.scale,
                     "processes": state.num_processes},
    }
    report.write_tables(rows, meta, out)
    report.write_plots(rows, out, extractor.id)
    by_method: dict[str, list[tuple[float, list[shards.Shard]]]] = {}
    for cell in cells:
        by_method.setdefault(cell.method, []).append((cell.scale, plans[cell.key]))
    title = f"{Path(args.model.rstrip('/')).name or args.model}, {scheduler}, {args.steps} steps, one row per scale"
    report.write_method_grids(out, by_method, task.column_labels, args.grid_per_class, args.num_samples,
                                         title)
    print(report.markdown_table(rows))
    print(f"extractor: {extractor.id}; wrote {out / 'results.csv'}, results.json, plots and grids")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (UsageError, GenerationError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2

