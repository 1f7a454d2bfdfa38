"""What ``guidance-evaluate`` generates: cells (a method at a scale), the per-image conditioning, and the sampling.

Image ``i`` of every cell uses ``torch.Generator("cpu").manual_seed(seed + i)`` (one generator per image in the
pipeline call, so the batch it lands in does not matter) and class ``i % num_classes`` (text-to-image: prompt
``i % len(prompts)``). All cells share these seeds, so methods are compared on the same initial noise.

A ``--guidance`` entry is read by the one resolver of :mod:`guidance.registry` (as in Python): a registered name
(built with ``guidance_scale=<scale>``), optionally with arguments and wrappers in the :mod:`guidance.spec` syntax
(``cfg@interval=0.28,2``, ``cfg@schedule=cosine``: the scale goes to the innermost rule), names joined by ``+``
(composed in order; every module that takes ``guidance_scale`` gets the scale), or ``LABEL=JSON``: a guidance config
in which the string ``"$scale"`` stands for the scale. Constructor arguments a config
leaves out and the tool can supply (:data:`SUPPLIED`) are filled in: Autoguidance's ``model`` and ``prediction_type``
(the guiding model, ``--guiding-model``; ``gfcg+autoguidance`` nests it in GFCG, both at the cell's scale), GFCG's
``classifier`` (the guidance classifier,
never the evaluation network), and LinearAG's ``coefficients`` (fitted per cell with CFG at the cell's scale on
calibration images with other seeds, :func:`fit_coefficients`; at scale 1 CFG has no unconditional branch to
estimate, so such a cell runs CFG at 1), ``model_id`` and ``scheduler``. A cell's folder name
hashes everything its images depend on (model files, scheduler, steps, seed, dtype, prompts, guidance config, supplied
arguments, shard size, device type, and the batch size for configs whose rule couples a batch's samples,
:func:`batch_coupled`), so a changed setting never reuses stale shards.
"""

from __future__ import annotations

import csv
import hashlib
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidance import Guidance, available_guidance, resolve_guidance
from guidance.registry import guidance_class, guidance_label, nested_specs, parse_guidance, scale_parameter, supply, takes
from guidance.spec import parse_term
from pipelines import GuidedClassConditionalPipeline
from pipelines.families import decode_latents
from samples.digits.data import NUM_CLASSES
from samples.metrics.features import DIGITS_SHAPE, to_uint8
from samples.metrics.saturation import OVERSHOOT_MARGIN, clipped_fraction, saturation
from samples.method_inputs import CALIBRATION_SEED_OFFSET, linear_ag_coefficients


class UsageError(ValueError):
    """Bad input to the evaluation tool: reported as one line, exit status 2."""


class GenerationError(RuntimeError):
    """A cell's generation produced what must never be scored (non-finite images, a refused run): one line, exit 2."""


# ----------------------------------------------------------------------------------------------------- methods


#: constructor arguments the tool supplies when a method's config leaves them out (see :func:`build_guidance`)
SUPPLIED = ("classifier", "coefficients", "model_id", "scheduler", "model", "prediction_type")
#: fitted coefficients (LinearAG) are fitted on this many calibration images (seeds offset by CALIBRATION_SEED_OFFSET)
CALIBRATION_IMAGES = 100


@dataclass(frozen=True)
class Cell:
    """One method at one scale: its label, its guidance config (JSON-safe), the folder of its shards, and the
    constructor arguments the tool must supply (``needs``, a subset of :data:`SUPPLIED`)."""

    method: str
    scale: float
    config: Any
    key: str
    needs: frozenset[str] = frozenset()


def _has_scale(name: str) -> bool:
    """Whether a rule takes the scale: as its strength (``guidance_scale``, GFCG's ``confusion_scale``), or through
    coefficients fitted at it (LinearAG)."""
    return scale_parameter(guidance_class(name)) is not None or takes(name, "coefficients")


def default_methods() -> list[str]:
    """Every registered method; a rule without a scale of its own is composed with CFG (``nlg+cfg``, ``cfg+tag``);
    then the nested combinations (``gfcg+autoguidance``)."""
    methods = []
    for name in available_guidance():
        if _has_scale(name):
            methods.append(name)
        else:
            noise_rule = guidance_class(name).prepare_noise is not Guidance.prepare_noise
            methods.append(f"{name}+cfg" if noise_rule else f"cfg+{name}")
    return methods + nested_specs()


def method_config(spec: str, scale: float) -> tuple[str, Any]:
    """``(label, config)`` of a ``--guidance`` entry at ``scale`` (:func:`guidance.registry.parse_guidance`).

    Names joined by ``+`` must include one rule with a scale (the innermost rule of a wrapped term): a sweep over
    scales is meaningless otherwise.
    """
    try:
        label, config = parse_guidance(spec, scale)
    except ValueError as error:
        raise UsageError(f"method {spec!r}: {error}") from None
    terms = [] if _is_config(spec) else spec.split("+")
    if terms and not any(_has_scale(parse_term(term)[0][0]) for term in terms):
        raise UsageError(f"method {spec!r} has no guidance scale; compose it with a rule that has one, e.g. cfg+{spec}")
    return label, config


def _is_config(spec: str) -> bool:
    """Whether a ``--guidance`` entry is JSON or ``LABEL=JSON`` (rather than names and terms)."""
    return spec.lstrip().startswith(("{", "[")) or guidance_label(spec) != spec.strip()


def supplied_arguments(config: Any) -> frozenset[str]:
    """The :data:`SUPPLIED` arguments a config (dict, list, nested) leaves to the tool."""
    return supply(config, {}, SUPPLIED)[1]


def build_guidance(config: Any, inputs: dict[str, Any] | None = None) -> Guidance:
    """The guidance module of a cell's config, the :data:`SUPPLIED` arguments it lacks taken from ``inputs``."""
    return resolve_guidance(supply(config, inputs or {}, SUPPLIED)[0])


def batch_coupled(config: Any) -> bool:
    """Whether a cell's images may depend on which images share a batch: some module of the config (list, nested
    dict) is configured so (:meth:`guidance.Guidance.couples_batch`, e.g. AG with ``reduce="all"``)."""
    if isinstance(config, list):
        return any(batch_coupled(item) for item in config)
    if not isinstance(config, dict):
        return False
    name = config.get("name")
    own = isinstance(name, str) and name in available_guidance() and guidance_class(name).couples_batch(config)
    return own or any(batch_coupled(value) for value in config.values())


def cell_key(label: str, scale: float, material: dict[str, Any]) -> str:
    """Folder name of a cell: readable label and scale plus a hash of everything its images depend on."""
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{slug(label)}_w{scale:g}_{digest}"


def slug(text: str) -> str:
    """``text`` with anything but letters, digits and ``.+-`` replaced by ``_`` (safe in file names)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def plan_cells(
    methods: Sequence[str], scales: Sequence[float], material: dict[str, Any], supplied: dict[str, str],
    batch_size: int,
) -> list[Cell]:
    """The cells of ``methods x scales``.

    The batch size enters the hash of a cell only when its config couples the samples of a batch
    (:func:`batch_coupled`): every other cell's images depend on their index and seed only.

    ``supplied`` describes the value the tool will supply for each :data:`SUPPLIED` argument (e.g. the classifier's
    id); it enters the hash of the cells that use it. Every config is built here once (with stand-ins for supplied
    arguments) so that a bad one fails before any work; configs that need fitted coefficients are checked when fitted.
    """
    cells = []
    for spec in methods:
        for scale in scales:
            label, config = method_config(spec, scale)
            needs = supplied_arguments(config)
            if "coefficients" in needs and scale == 1.0:
                # CFG at w = 1 evaluates no unconditional branch, so there is nothing to estimate or fit: the rule
                # is conditional sampling, and the cell runs it as such (its config says so)
                config, needs = {"name": "cfg", "guidance_scale": 1.0}, frozenset()
            if "coefficients" not in needs:
                stand_ins = {"classifier": torch.nn.Identity(), "model_id": "", "scheduler": "",
                             "model": torch.nn.Identity()}
                try:
                    build_guidance(config, stand_ins)
                except (TypeError, ValueError) as error:
                    raise UsageError(f"method {label!r} at scale {scale:g}: {error}") from None
            cell_material = {**material, "guidance": config, "supplied": {n: supplied.get(n) for n in sorted(needs)}}
            if batch_coupled(config):
                cell_material["batch_size"] = batch_size
            cells.append(Cell(label, scale, config, cell_key(label, scale, cell_material), needs))
    names = [(cell.method, cell.scale) for cell in cells]
    if len(set(names)) != len(names):
        raise UsageError("--methods/--scales name the same method and scale twice")
    return cells


# ----------------------------------------------------------------------------------------------------- the task


@dataclass
class Task:
    """What an image depends on besides its index: the labels or prompts, the image shape, steps and seed."""

    class_conditional: bool
    num_labels: int
    column_labels: list[str]
    image_shape: tuple[int, int, int]
    steps: int
    seed: int
    prompts: list[str] | None = None

    def labels(self, indices: Sequence[int]) -> list[int]:
        """Class id (or prompt index) of each image: ``i % num_labels``."""
        return [i % self.num_labels for i in indices]

    def conditioning(self, indices: Sequence[int]) -> dict[str, Any]:
        if self.class_conditional:
            return {"class_labels": self.labels(indices)}
        return {"prompt": [self.prompts[k] for k in self.labels(indices)]}  # type: ignore[index]

    @property
    def is_digits(self) -> bool:
        """Whether the images are 8x8 digits (the embedded evaluation network and reference apply)."""
        return self.class_conditional and self.image_shape == DIGITS_SHAPE and self.num_labels == NUM_CLASSES


def read_prompts(path: str | Path) -> list[str]:
    """Prompts from a ``.txt`` file (one per non-empty line) or a ``.csv`` (column prompt/text/caption, else the
    first column)."""
    file = Path(path)
    if not file.is_file():
        raise UsageError(f"--prompts {path}: no such file")
    if file.suffix.lower() == ".csv":
        with open(file, newline="") as handle:
            rows = [row for row in csv.reader(handle) if row]
        header = [name.strip().lower() for name in rows[0]] if rows else []
        column = next((header.index(n) for n in ("prompt", "text", "caption") if n in header), None)
        body, column = (rows[1:], column) if column is not None else (rows, 0)
        prompts = [row[column].strip() for row in body if len(row) > column and row[column].strip()]
    else:
        prompts = [line.strip() for line in file.read_text().splitlines() if line.strip()]
    if not prompts:
        raise UsageError(f"--prompts {path} holds no prompt")
    return prompts


def image_shape(pipe: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` of the decoded images (the denoiser's default sample size)."""
    denoiser = pipe.unet if getattr(pipe, "unet", None) is not None else pipe.transformer
    size = denoiser.config.sample_size
    size = size if isinstance(size, int) else size[0]
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return (denoiser.config.in_channels, size, size)
    factor = 2 ** (len(vae.config.block_out_channels) - 1)
    return (vae.config.out_channels, size * factor, size * factor)


def describe_task(pipe: Any, steps: int, seed: int, prompts_file: str | None = None) -> Task:
    """The task for ``pipe``: class-conditional (every class in turn) or text-to-image (prompts from a file)."""
    shape = image_shape(pipe)
    if isinstance(pipe, GuidedClassConditionalPipeline):
        if prompts_file:
            raise UsageError("this is a class-conditional model: --prompts does not apply")
        names = pipe.config.id2label or {}
        columns = [str(names.get(str(i), i)) for i in range(pipe.num_classes)]
        return Task(True, pipe.num_classes, columns, shape, steps, seed)
    if not prompts_file:
        raise UsageError("this is a text-to-image model: give --prompts FILE")
    prompts = read_prompts(prompts_file)
    return Task(False, len(prompts), prompts, shape, steps, seed, prompts)


def fingerprint(model: str, pipe: Any, task: Task, dtype: str, shard_size: int) -> dict[str, Any]:
    """Everything the images of a cell depend on besides its guidance config (hashed into the cell's folder name).

    A local model folder is identified cheaply by its files' names, sizes and modification times.
    """
    folder = Path(model).expanduser()
    material: dict[str, Any] = {"model": model}
    if folder.is_dir():
        files = sorted(p for p in folder.rglob("*") if p.is_file())
        listing = [[str(p.relative_to(folder)), p.stat().st_size, p.stat().st_mtime_ns] for p in files]
        material = {"model": str(folder.resolve()), "files": hashlib.sha256(json.dumps(listing).encode()).hexdigest()}
    return {
        **material,
        "scheduler": type(pipe.scheduler).__name__,
        "scheduler_config": json.loads(json.dumps(dict(pipe.scheduler.config), default=str)),
        "steps": task.steps,
        "seed": task.seed,
        "dtype": dtype,
        "device": torch.device(pipe.device).type,
        "prompts": task.prompts,
        "shard_size": shard_size,
    }


# -------------------------------------------------------------------------------------------------- generation


def decode_unclamped(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in (nominally) [-1, 1], float32, *before* the clamp every pipeline applies: the pipelines' own decode
    (:func:`pipelines.families.decode_latents`: SDXL's latent mean/std, SD3's shift, a float32 VAE pass)."""
    if getattr(pipe, "vae", None) is None:
        return latents.float()
    return decode_latents(pipe, {}, latents)


@torch.no_grad()
def generate(
    pipe: Any, task: Task, guidance: Guidance, indices: Sequence[int], batch_size: int
) -> dict[str, np.ndarray]:
    """Samples ``indices``: ``images`` (uint8), ``labels``, ``nfe``, ``saturation``, ``clipped`` and ``overshoot``
    (pixel fractions outside [-1, 1] and more than :data:`~samples.metrics.saturation.OVERSHOOT_MARGIN` outside it) per image.

    :class:`GenerationError` if an image has a non-finite pixel (it would be scored as a black or white image)."""
    names = ("images", "labels", "nfe", "saturation", "clipped", "overshoot")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(task.seed + i) for i in chunk]
        output = pipe(**task.conditioning(chunk), guidance=guidance, num_inference_steps=task.steps,
                      generator=generators, output_type="latent")
        pixels = decode_unclamped(pipe, output.images).cpu()
        bad = [i for i, image in zip(chunk, pixels) if not torch.isfinite(image).all()]
        if bad:
            raise GenerationError(f"{len(bad)} of {len(chunk)} images of a batch have non-finite pixel values "
                                  f"(indices {bad[:5]}{' ...' if len(bad) > 5 else ''}); nothing is scored")
        parts["images"].append(to_uint8(pixels))
        parts["labels"].append(torch.tensor(task.labels(chunk)))
        parts["nfe"].append(torch.tensor(output.nfe_per_sample, dtype=torch.float64))
        parts["saturation"].append(saturation(pixels))
        parts["clipped"].append(clipped_fraction(pixels))
        parts["overshoot"].append(clipped_fraction(pixels, OVERSHOOT_MARGIN))
    return {name: torch.cat(values).numpy() for name, values in parts.items()}


def fit_coefficients(pipe: Any, task: Task, scale: float, model_id: str, path: Path, batch_size: int) -> None:
    """Fit LinearAG's coefficients for one cell and save them atomically at ``path``.

    Calibration: CFG at ``scale`` on :data:`CALIBRATION_IMAGES` images with seeds ``seed + CALIBRATION_SEED_OFFSET + i``
    (never a sampled seed), estimating the unconditional output on every other step of the first half
    (:func:`guidance.linear_ag_fit.alternate_steps`). The calibration cost is not part of the cell's NFE or images/s.
    """

    def run(guidance: Guidance, chunk: list[int]) -> None:
        generators = [torch.Generator("cpu").manual_seed(task.seed + CALIBRATION_SEED_OFFSET + i) for i in chunk]
        pipe(**task.conditioning(chunk), guidance=guidance, num_inference_steps=task.steps,
             generator=generators, output_type="latent")

    indices = list(range(CALIBRATION_IMAGES))
    chunks = [indices[i : i + batch_size] for i in range(0, len(indices), batch_size)]
    coefficients = linear_ag_coefficients(run, chunks, task.steps, model_id, type(pipe.scheduler).__name__, scale)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    coefficients.save(tmp)
    os.replace(tmp, path)
