"""``guidance-generate``: sample every guidance method side by side and write a labelled grid plus a summary.

With no arguments it loads the embedded 8x8-digits model shipped in ``samples/weights/digits``, samples every
registered guidance (CFG first, as the reference) at its default settings with the same seeds, and writes to
``outputs/``:

* ``grid.png`` -- one row per method, one column block per class;
* ``summary.txt`` / ``summary.csv`` -- one line per method: network evaluations (NFE) per image, seconds, class
  accuracy by the embedded *evaluation* network (never the classifier GFCG guides with), and notes.

``--model`` points the same job at a local pipeline folder or a hub id (Stable Diffusion, SDXL, SD3 or
class-conditional: the class comes from ``model_index.json``). Bad arguments print one ``guidance-generate: error:``
line and exit with status 2.
"""

from __future__ import annotations

import time

_START = time.perf_counter()

from samples import cli  # noqa: E402  (first: quiet third-party start-up, and the package check)

import argparse  # noqa: E402
import csv  # noqa: E402
import functools  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import torch  # noqa: E402
from diffusers.utils import logging as diffusers_logging  # noqa: E402
from huggingface_hub.utils import logging as hub_logging  # noqa: E402

from guidance import Guidance, available_guidance, resolve_guidance  # noqa: E402
from guidance.registry import guidance_label, nested_specs, parse_guidance, supply  # noqa: E402
from pipelines import GuidedClassConditionalPipeline  # noqa: E402
from samples.generate.grid import labelled_grid  # noqa: E402
from samples.loading import (  # noqa: E402
    DTYPES,
    load_guiding_model,
    load_pipeline,
    pipeline_class,
    read_class_name,
    set_scheduler,
)
from samples.digits.nets import EMBEDDED_MODEL, is_embedded  # noqa: E402
from samples.method_inputs import MethodInputs, fit_linear_ag_coefficients, generators  # noqa: E402

_IMPORT_SECONDS = time.perf_counter() - _START

PROG = "guidance-generate"

# Defaults for the embedded digits model (chosen by looking at the grid; see the README).
DIGITS_SCHEDULER = "ddim"
DIGITS_SCALE = 3.0
DIGITS_IMAGES = 4
DEFAULT_STEPS = 30
DEFAULT_IMAGES = 1  # per class / prompt for other models (they are far slower)
MAX_DEFAULT_CLASSES = 10  # more classes than this must be chosen with --class-label


def _class_label(text: str) -> int | str:
    return int(text) if text.lstrip("-").isdigit() else text


def build_parser() -> argparse.ArgumentParser:
    """The command line (the guidance names in the help are those registered at run time)."""
    parser = cli.OneLineParser(
        prog=PROG,
        description="Sample every guidance method with the same seeds; write a labelled grid and a summary.",
        epilog=f"guidance methods: {', '.join(available_guidance())} (join with '+' to compose, e.g. nlg+apg+tag; "
        "add arguments and wrappers with @KEY=VALUE, e.g. cfg@interval=0.28,2 or cfg@schedule=cosine)",
    )
    parser.add_argument("--model", help="local pipeline folder or hub id (default: the embedded 8x8 digits model)")
    parser.add_argument("--prompt", nargs="+", help="prompt(s) for a text-to-image model, one column block each")
    parser.add_argument("--negative-prompt", help="negative prompt (text-to-image models)")
    parser.add_argument(
        "--class-label", nargs="+", type=_class_label, help="class ids or names (default: every class)"
    )
    cli.add_shared_arguments(
        parser, steps=DEFAULT_STEPS, out="outputs",
        scale_help=f"guidance_scale for methods that take one (default: {DIGITS_SCALE} for the digits model, "
        "else each method's own default)",
        scheduler_help=f"sampler (default: {DIGITS_SCHEDULER} for the digits model, else the model's own)",
    )
    parser.add_argument(
        "--num-images", type=cli.positive_int,
        help=f"images per class / prompt (default: {DIGITS_IMAGES} for the digits model, else {DEFAULT_IMAGES})",
    )
    parser.add_argument("--device", help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--dtype", choices=list(DTYPES), default="float32", help="model dtype (default: %(default)s)")
    parser.add_argument(
        "--threads", type=cli.positive_int,
        help="CPU threads for torch (default: 1 for the digits model, whose operations are too small to gain from "
        "threads and lose badly when cores are shared; else torch's default)",
    )
    return parser


@dataclass
class Job:
    """What every method samples: the pipeline call's conditioning, seeds and column layout."""

    call: dict[str, Any]
    columns: list[str]
    per_column: int
    seeds: list[int]
    targets: torch.Tensor | None = None  # class id per image, for the accuracy column


@dataclass
class MethodResult:
    """One row of the summary (and of the grid, when it has images)."""

    name: str
    images: torch.Tensor | None = None  # [N, C, H, W] in [0, 1]
    nfe: float | None = None
    seconds: float | None = None
    accuracy: float | None = None
    note: str = ""
    config: Any = field(default=None)


def resolve_device(name: str | None) -> str:
    """``name`` checked (``ValueError`` for an unknown or unavailable device), or cuda if available, else cpu."""
    if name is None:
        return "cuda" if torch.cuda.is_available() else "cpu"
    try:
        device = torch.device(name)
    except RuntimeError as error:
        raise ValueError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name}: CUDA is not available on this machine")
    return name


def default_methods() -> list[str]:
    """What the main job runs: every registered method, then the nested combinations (``gfcg+autoguidance``)."""
    return available_guidance() + nested_specs()


def build_guidance(spec: str, scale: float | None, inputs: MethodInputs) -> tuple[str, Guidance, list[str]]:
    """The label and guidance module of ``spec`` and the notes of the inputs it used.

    ``spec`` is anything :func:`guidance.resolve_guidance` reads from a string (a name, ``a+b`` names, terms of the
    :mod:`guidance.spec` syntax such as ``cfg@interval=0.28,2``, JSON or ``LABEL=JSON``); ``scale`` is passed as
    ``guidance_scale`` to every (innermost) module built from a name that takes one, and
    replaces ``"$scale"`` in configs. Constructor arguments that ``inputs`` provides are filled from it (GFCG's
    ``classifier``, LinearAG's ``coefficients``...); a required one it does not provide is a ``ValueError`` naming it.
    """
    label, config = parse_guidance(spec, scale)
    filled, used = supply(config, inputs)
    notes = [inputs.notes[name] for name in sorted(used) if name in inputs.notes]
    return label, resolve_guidance(filled), notes


def _config(guidance: Guidance) -> Any:
    """JSON-safe configuration (objects such as a classifier network become their class name)."""
    return json.loads(json.dumps(guidance.config(), default=lambda obj: type(obj).__name__))


def check_conditioning_kind(args: argparse.Namespace, class_conditional: bool) -> None:
    """Class labels for class-conditional models, prompts for text-to-image ones (checked before loading)."""
    if class_conditional and (args.prompt is not None or args.negative_prompt is not None):
        raise ValueError("this is a class-conditional model: use --class-label, not --prompt/--negative-prompt")
    if not class_conditional and args.class_label is not None:
        raise ValueError("this is a text-to-image model: use --prompt, not --class-label")
    if not class_conditional and not args.prompt:
        raise ValueError("this is a text-to-image model: give --prompt")


def plan_job(pipe: Any, args: argparse.Namespace, per_column: int) -> Job:
    """Check the class labels against the model and lay out the images (one column block per class / prompt)."""
    if isinstance(pipe, GuidedClassConditionalPipeline):
        if args.class_label is None:
            if pipe.num_classes > MAX_DEFAULT_CLASSES:
                raise ValueError(f"this model has {pipe.num_classes} classes: choose some with --class-label")
            ids = list(range(pipe.num_classes))
        else:
            ids = pipe.class_ids(args.class_label)
        names = pipe.config.id2label or {}
        columns = [str(names.get(str(i), i)) for i in ids]
        labels = [i for i in ids for _ in range(per_column)]
        call = {"class_labels": labels}
        targets = torch.tensor(labels)
    else:
        columns = list(args.prompt)
        negative = None if args.negative_prompt is None else [args.negative_prompt] * len(columns)
        call = {"prompt": columns, "num_images_per_prompt": per_column, "negative_prompt": negative}
        targets = None
    seeds = [args.seed + k for k in range(len(columns) * per_column)]
    return Job(call, columns, per_column, seeds, targets)


def call_pipeline(pipe: Any, guidance: Guidance, job: Job, steps: int, seeds: list[int], output_type: str = "pt") -> Any:
    """One pipeline call of ``job`` with ``guidance`` and one generator per seed."""
    return pipe(
        **job.call, guidance=guidance, num_inference_steps=steps, generator=generators(seeds), output_type=output_type
    )


def sample(pipe: Any, guidance: Guidance, job: Job, steps: int) -> tuple[torch.Tensor, float, float]:
    """Images ``[N, C, H, W]`` in [0, 1], NFE per image and seconds for one method."""
    start = time.perf_counter()
    output = call_pipeline(pipe, guidance, job, steps, job.seeds)
    seconds = time.perf_counter() - start
    images = output.images if isinstance(output.images, torch.Tensor) else torch.stack(list(output.images))
    return images.float().cpu(), float(output.nfe), seconds


@torch.no_grad()
def class_accuracy(evaluator: torch.nn.Module, images: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of ``images`` (in [0, 1]) that ``evaluator`` (on [-1, 1] inputs) assigns to their target class."""
    logits = evaluator(images * 2 - 1)
    return float((logits.argmax(dim=1) == targets).float().mean())


def _fmt(value: float | None, pattern: str) -> str:
    return "-" if value is None else format(value, pattern)


def _short(text: str, limit: int = 100) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def summary_lines(results: Sequence[MethodResult]) -> list[str]:
    """The printed table: one line per method (long notes shortened; the CSV keeps them whole)."""
    width = max(len("method"), *(len(r.name) for r in results))
    lines = [f"{'method':<{width}}  {'NFE/image':>9}  {'seconds':>7}  {'accuracy':>8}  note"]
    for r in results:
        accuracy = "-" if r.accuracy is None else f"{100 * r.accuracy:.1f}%"
        lines.append(
            f"{r.name:<{width}}  {_fmt(r.nfe, 'g'):>9}  {_fmt(r.seconds, '.2f'):>7}  {accuracy:>8}  {_short(r.note)}".rstrip()
        )
    return lines


def accuracy_text(accuracy: float, count: int) -> str:
    """Class accuracy as measured: percent with one decimal and the count, e.g. ``97.5% (39/40)``."""
    correct = round(accuracy * count)
    return f"{100 * accuracy:.1f}% ({correct}/{count})"


def write_outputs(
    results: Sequence[MethodResult], job: Job, out: Path, header: str, title: str = ""
) -> list[str]:
    """Write ``grid.png`` (headed by ``title``), ``summary.txt`` and ``summary.csv`` under ``out``; return the
    summary lines."""
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for r in results:
        if r.images is None:
            continue
        details = [f"NFE {r.nfe:g}"]
        if r.accuracy is not None:
            details.append(f"acc {accuracy_text(r.accuracy, len(r.images))}")
        rows.append((f"{r.name}\n{', '.join(details)}", r.images))
    if rows:
        labelled_grid(rows, job.columns, job.per_column, title=title).save(out / "grid.png")
    lines = summary_lines(results)
    (out / "summary.txt").write_text("\n".join([header, *lines]) + "\n")
    with open(out / "summary.csv", "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(["method", "nfe_per_image", "seconds", "accuracy", "note", "config"])
        for r in results:
            writer.writerow([
                r.name, _fmt(r.nfe, "g"), _fmt(r.seconds, ".3f"), _fmt(r.accuracy, ".4f"), r.note,
                "" if r.config is None else json.dumps(r.config),
            ])
    return lines


@dataclass
class Session:
    """The loaded model and everything the methods share."""

    model: str
    device: str
    pipe: Any
    job: Job
    scale: float | None
    inputs: MethodInputs
    evaluator: torch.nn.Module | None


def check_guidance_names(specs: Sequence[str]) -> None:
    """``ValueError`` (listing the registered names for an unknown one) if a spec cannot be read, before any loading."""
    for spec in specs:
        parse_guidance(spec, 1.0)


def open_session(args: argparse.Namespace) -> Session:
    """Check the arguments, load the model, lay out the job and provide the methods' extra inputs."""
    device = resolve_device(args.device)
    embedded = is_embedded(args.model)
    model = str(EMBEDDED_MODEL) if args.model is None else args.model
    if args.model is None and not EMBEDDED_MODEL.is_dir():
        raise OSError(f"the embedded model is missing ({EMBEDDED_MODEL}); train it with python -m scripts.train_digits")
    threads = args.threads or (1 if embedded and device == "cpu" else None)
    if threads is not None:
        torch.set_num_threads(threads)

    cls = pipeline_class(read_class_name(model))
    check_conditioning_kind(args, issubclass(cls, GuidedClassConditionalPipeline))
    pipe = load_pipeline(model, device=device, dtype=DTYPES[args.dtype], cls=cls)
    scheduler = args.scheduler or (DIGITS_SCHEDULER if embedded else None)
    if scheduler is not None:
        set_scheduler(pipe, scheduler)
    job = plan_job(pipe, args, args.num_images or (DIGITS_IMAGES if embedded else DEFAULT_IMAGES))
    scale = args.scale if args.scale is not None else (DIGITS_SCALE if embedded else None)

    inputs = MethodInputs()
    guide = cli.guiding_model(args.guiding_model, embedded)
    if guide is not None:  # Autoguidance's model and its prediction type, loaded on first use
        guiding = functools.cache(lambda: load_guiding_model(guide, device, DTYPES[args.dtype]))
        inputs.provide("model", make=lambda: (guiding()[0], f"guiding model {guide}"))
        inputs.provide("prediction_type", make=lambda: (guiding()[1], ""))
    inputs.provide("model_id", model)
    inputs.provide("scheduler", pipe.scheduler)
    inputs.provide("coefficients", make=lambda: fit_linear_ag_coefficients(
        lambda guidance, seeds: call_pipeline(pipe, guidance, job, args.steps, seeds, output_type="latent"),
        job.seeds, args.steps, model, pipe.scheduler, scale,
    ))
    evaluator = None
    if embedded:
        from samples.digits.nets import load_classifier, load_evaluator

        inputs.provide("classifier", load_classifier().to(device))
        evaluator = load_evaluator().to(device)
    return Session(model, device, pipe, job, scale, inputs, evaluator)


def grid_title(session: Session, args: argparse.Namespace) -> str:
    """The grid's title line: model, scheduler, steps, scale."""
    model = "embedded digits model" if args.model is None else Path(session.model.rstrip("/")).name or session.model
    scale = "each method's default" if session.scale is None else f"{session.scale:g}"
    return (f"{model}, {type(session.pipe.scheduler).__name__}, {args.steps} steps, scale {scale}, "
            f"seeds {session.job.seeds[0]}..{session.job.seeds[-1]}")


def describe(session: Session, args: argparse.Namespace) -> str:
    """One line: model, sampler, scale, seeds, device."""
    job, scale = session.job, session.scale
    cpu = f" ({torch.get_num_threads()} threads)" if session.device == "cpu" else ""
    return (
        f"model {session.model} ({type(session.pipe).__name__}), scheduler {type(session.pipe.scheduler).__name__}, "
        f"{args.steps} steps, scale {'method default' if scale is None else scale}, {len(job.seeds)} images per "
        f"method, seeds {job.seeds[0]}..{job.seeds[-1]}, device {session.device}{cpu}, {args.dtype}"
    )


def build_methods(
    session: Session, specs: Sequence[str], strict: bool
) -> tuple[list[tuple[str, Guidance, list[str]]], list[MethodResult]]:
    """The guidance module and notes of every spec, and a skipped row for each that cannot be built here.

    A method that cannot be built for this model (a missing input such as GFCG's classifier) is an error when
    ``strict`` (it was asked for by name), else a skipped row.
    """
    methods, skipped = [], []
    for spec in specs:
        try:
            methods.append(build_guidance(spec, session.scale, session.inputs))
        except (ValueError, TypeError) as error:
            if strict:
                raise ValueError(f"--guidance {spec}: {error}") from None
            skipped.append(MethodResult(guidance_label(spec), note=f"skipped: {error}"))
    return methods, skipped


def sample_methods(
    session: Session, methods: Sequence[tuple[str, Guidance, list[str]]], steps: int, quiet: bool = False
) -> list[MethodResult]:
    """Sample every method with the job's seeds; a method that fails while sampling gives a failed row."""
    results = []
    with cli.progress(len(methods), "sampling", "methods", quiet) as bar:
        for label, guidance, notes in methods:
            bar.set_postfix_str(label)
            result = MethodResult(label, note="; ".join(notes), config=_config(guidance))
            try:
                result.images, result.nfe, result.seconds = sample(session.pipe, guidance, session.job, steps)
            except (ValueError, TypeError) as error:
                result.note = f"failed: {error}"
            if session.evaluator is not None and result.images is not None:
                targets = session.job.targets.to(session.device)
                result.accuracy = class_accuracy(session.evaluator, result.images.to(session.device), targets)
            results.append(result)
            bar.update()
    return results


def run(args: argparse.Namespace) -> int:
    """The job behind :func:`main` (arguments already parsed); 1 if a method failed while sampling, else 0."""
    start = time.perf_counter()
    specs = args.guidance or default_methods()
    check_guidance_names(specs)
    session = open_session(args)
    header = describe(session, args)
    if not args.quiet:
        print(header)
    loaded = time.perf_counter()
    # per-step bars only on a terminal: in logs they would be one line per step
    session.pipe.set_progress_bar_config(leave=False, disable=args.quiet or not cli.interactive())
    methods, skipped = build_methods(session, specs, strict=bool(args.guidance))
    results = sample_methods(session, methods, args.steps, args.quiet) + skipped
    order = [guidance_label(spec) for spec in specs]
    results.sort(key=lambda r: order.index(r.name))
    sampled = time.perf_counter()

    out = Path(args.out)
    print("\n".join(write_outputs(results, session.job, out, header, grid_title(session, args))))
    written = [name for name in ("grid.png", "summary.txt", "summary.csv") if (out / name).exists()]
    print(f"wrote {', '.join(str(out / name) for name in written)}")
    total = _IMPORT_SECONDS + time.perf_counter() - start
    print(
        f"total {total:.1f} s (imports {_IMPORT_SECONDS:.1f} s, loading {loaded - start:.1f} s, "
        f"sampling and evaluation {sampled - loaded:.1f} s)"
    )
    return 1 if any(r.note.startswith("failed:") for r in results) else 0


def main(argv: Sequence[str] | None = None) -> int:
    """Console entry point; returns the exit status (2 for bad arguments, 1 if a method failed while sampling)."""
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exit_:  # --help, or an argument error already printed as one line
        return int(exit_.code or 0)
    threads = torch.get_num_threads()
    verbosity, loading_bar = diffusers_logging.get_verbosity(), diffusers_logging.is_progress_bar_enabled()
    hub_verbosity = hub_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    hub_logging.set_verbosity_error()  # no multi-line retry notices when the hub cannot be reached
    diffusers_logging.disable_progress_bar()  # the loading bar; the sampling bars are the pipeline's own
    try:
        return run(args)
    except (ValueError, TypeError, OSError) as error:
        message = " ".join(str(error).split()) or type(error).__name__
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        torch.set_num_threads(threads)
        diffusers_logging.set_verbosity(verbosity)
        hub_logging.set_verbosity(hub_verbosity)
        if loading_bar:
            diffusers_logging.enable_progress_bar()

