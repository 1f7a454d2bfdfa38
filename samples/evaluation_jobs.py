"""What ``guidance-evaluate`` generates: cells (a method at a scale), the per-image conditioning, and the sampling.

Image ``i`` of every cell uses ``torch.Generator("cpu").manual_seed(seed + i)`` (one generator per image in the
pipeline call, so the batch it lands in does not matter) and class ``i % num_classes`` (text-to-image: prompt
``i % len(prompts)``). All cells share these seeds, so methods are compared on the same initial noise.

A ``--methods`` entry is a registered name (built with ``guidance_scale=<scale>``), names joined by ``+`` (composed in
order; every module that takes ``guidance_scale`` gets the scale), or ``LABEL=JSON``: a guidance config
(:func:`guidance.from_config`) in which the string ``"$scale"`` stands for the scale. Constructor arguments a config
leaves out and the tool can supply (:data:`SUPPLIED`) are filled in: GFCG's ``classifier`` (the guidance classifier,
never the evaluation network), Autoguidance's ``model`` and ``prediction_type`` (the guiding model, ``--guiding-model``;
``gfcg+autoguidance`` nests Autoguidance in GFCG, both at the cell's scale), and LinearAG's ``coefficients`` (fitted per cell with CFG at the cell's scale on
calibration images with other seeds, :func:`fit_coefficients`; at scale 1 CFG has no unconditional branch to
estimate, so such a cell runs CFG at 1), ``model_id`` and ``scheduler``. A cell's folder name
hashes everything its images depend on (model files, scheduler, steps, seed, dtype, prompts, guidance config, supplied
arguments, shard size), so a changed setting never reuses stale shards.
"""

from __future__ import annotations

import csv
import hashlib
import inspect
import json
import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from guidance import Guidance, available_guidance, from_config
from guidance.registry import guidance_class, nested_rules, nested_specs
from pipelines import GuidedClassConditionalPipeline
from samples.digits_data import NUM_CLASSES
from samples.features import DIGITS_SHAPE, to_uint8
from samples.saturation import OVERSHOOT_MARGIN, clipped_fraction, saturation

SCALE_PLACEHOLDER = "$scale"


class UsageError(ValueError):
    """Bad input to the evaluation tool: reported as one line, exit status 2."""


# ----------------------------------------------------------------------------------------------------- methods


#: constructor arguments the tool supplies when a method's config leaves them out (see :func:`build_guidance`)
SUPPLIED = ("classifier", "coefficients", "model_id", "scheduler", "model", "prediction_type")
#: fitted coefficients (LinearAG) are fitted on this many calibration images, with seeds this far from the sampled ones
CALIBRATION_IMAGES = 100
CALIBRATION_SEED_OFFSET = 1_000_003


@dataclass(frozen=True)
class Cell:
    """One method at one scale: its label, its guidance config (JSON-safe), the folder of its shards, and the
    constructor arguments the tool must supply (``needs``, a subset of :data:`SUPPLIED`)."""

    method: str
    scale: float
    config: Any
    key: str
    needs: frozenset[str] = frozenset()


def _takes(cls: type, param: str) -> bool:
    return param in inspect.signature(cls.__init__).parameters


def _has_scale(cls: type) -> bool:
    """Whether a rule takes the scale: as ``guidance_scale``, or through coefficients fitted at it (LinearAG)."""
    return _takes(cls, "guidance_scale") or _takes(cls, "coefficients")


def default_methods() -> list[str]:
    """Every registered method; a rule without a scale of its own is composed with CFG (``nlg+cfg``, ``cfg+tag``);
    then the nested combinations (``gfcg+autoguidance``)."""
    methods = []
    for name in available_guidance():
        cls = guidance_class(name)
        if _has_scale(cls):
            methods.append(name)
        else:
            methods.append(f"{name}+cfg" if cls.prepare_noise is not Guidance.prepare_noise else f"cfg+{name}")
    return methods + nested_specs()


def _substitute(config: Any, scale: float) -> Any:
    if config == SCALE_PLACEHOLDER:
        return scale
    if isinstance(config, dict):
        return {key: _substitute(value, scale) for key, value in config.items()}
    if isinstance(config, list):
        return [_substitute(value, scale) for value in config]
    return config


def method_config(spec: str, scale: float) -> tuple[str, Any]:
    """``(label, config)`` of a ``--methods`` entry at ``scale`` (see the module docstring)."""
    label, sep, text = spec.partition("=")
    if sep:
        try:
            return label, _substitute(json.loads(text), scale)
        except json.JSONDecodeError as error:
            raise UsageError(f"method {label!r}: invalid JSON config ({error})") from None
    try:
        parts = [_part(name, scale) | ({} if inner is None else {inner: _part(inner, scale)})
                 for name, inner in nested_rules(spec.split("+"))]
    except ValueError as error:  # an unknown name
        raise UsageError(str(error)) from None
    if not any(_has_scale(guidance_class(part["name"])) for part in parts):
        raise UsageError(f"method {spec!r} has no guidance scale; compose it with a rule that has one, e.g. cfg+{spec}")
    return spec, parts[0] if len(parts) == 1 else parts


def _part(name: str, scale: float) -> dict[str, Any]:
    return {"name": name, "guidance_scale": scale} if _takes(guidance_class(name), "guidance_scale") else {"name": name}


def _fill(config: Any, inputs: dict[str, Any]) -> tuple[Any, set[str]]:
    """``config`` with every :data:`SUPPLIED` argument a rule takes but lacks set from ``inputs`` (where given), and
    the names of all such arguments."""
    if isinstance(config, list):
        filled = [_fill(item, inputs) for item in config]
        return [item for item, _ in filled], set().union(*(names for _, names in filled))
    if not isinstance(config, dict):
        return config, set()
    filled = {key: _fill(value, inputs) for key, value in config.items()}
    out = {key: value for key, (value, _) in filled.items()}
    needs = set().union(*(names for _, names in filled.values()))
    name = out.get("name")
    if isinstance(name, str):
        for param in SUPPLIED:
            if param not in out and _takes(guidance_class(name), param):
                needs.add(param)
                if param in inputs:
                    out[param] = inputs[param]
    return out, needs


def supplied_arguments(config: Any) -> frozenset[str]:
    """The :data:`SUPPLIED` arguments a config (dict, list, nested) leaves to the tool."""
    try:
        return frozenset(_fill(config, {})[1])
    except ValueError:  # an unknown name: reported when the config is built
        return frozenset()


def build_guidance(config: Any, inputs: dict[str, Any] | None = None) -> Guidance:
    """The guidance module of a cell's config, the :data:`SUPPLIED` arguments it lacks taken from ``inputs``."""
    return from_config(_fill(config, inputs or {})[0])


def cell_key(label: str, scale: float, material: dict[str, Any]) -> str:
    """Folder name of a cell: readable label and scale plus a hash of everything its images depend on."""
    digest = hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:10]
    return f"{slug(label)}_w{scale:g}_{digest}"


def slug(text: str) -> str:
    """``text`` with anything but letters, digits and ``.+-`` replaced by ``_`` (safe in file names)."""
    return re.sub(r"[^A-Za-z0-9.+-]+", "_", text)


def plan_cells(
    methods: Sequence[str], scales: Sequence[float], material: dict[str, Any], supplied: dict[str, str]
) -> list[Cell]:
    """The cells of ``methods x scales``.

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
        "prompts": task.prompts,
        "shard_size": shard_size,
    }


# -------------------------------------------------------------------------------------------------- generation


def decode_unclamped(pipe: Any, latents: torch.Tensor) -> torch.Tensor:
    """Pixels in (nominally) [-1, 1], float32, *before* the clamp every pipeline applies."""
    vae = getattr(pipe, "vae", None)
    if vae is None:
        return latents.float()
    scaled = latents.to(vae.dtype) / vae.config.scaling_factor + (getattr(vae.config, "shift_factor", None) or 0.0)
    return vae.decode(scaled, return_dict=False)[0].float()


@torch.no_grad()
def generate(
    pipe: Any, task: Task, guidance: Guidance, indices: Sequence[int], batch_size: int
) -> dict[str, np.ndarray]:
    """Samples ``indices``: ``images`` (uint8), ``labels``, ``nfe``, ``saturation``, ``clipped`` and ``overshoot``
    (pixel fractions outside [-1, 1] and more than :data:`~samples.saturation.OVERSHOOT_MARGIN` outside it) per image."""
    names = ("images", "labels", "nfe", "saturation", "clipped", "overshoot")
    parts: dict[str, list[torch.Tensor]] = {name: [] for name in names}
    for start in range(0, len(indices), batch_size):
        chunk = list(indices[start : start + batch_size])
        generators = [torch.Generator("cpu").manual_seed(task.seed + i) for i in chunk]
        output = pipe(**task.conditioning(chunk), guidance=guidance, num_inference_steps=task.steps,
                      generator=generators, output_type="latent")
        pixels = decode_unclamped(pipe, output.images).cpu()
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
    (:func:`guidance.linear_ag.alternate_steps`). The calibration cost is not part of the cell's NFE or images/s.
    """
    from guidance.cfg import CFG
    from guidance.linear_ag import alternate_steps, fit_linear_ag

    def run_for(chunk: list[int]) -> Any:
        def run(guidance: Guidance) -> None:
            generators = [torch.Generator("cpu").manual_seed(task.seed + CALIBRATION_SEED_OFFSET + i) for i in chunk]
            pipe(**task.conditioning(chunk), guidance=guidance, num_inference_steps=task.steps,
                 generator=generators, output_type="latent")

        return run

    indices = list(range(CALIBRATION_IMAGES))
    runs = [run_for(indices[i : i + batch_size]) for i in range(0, len(indices), batch_size)]
    coefficients = fit_linear_ag(runs, steps=alternate_steps(task.steps), model_id=model_id,
                                 scheduler=type(pipe.scheduler).__name__, base=CFG(scale))
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    coefficients.save(tmp)
    os.replace(tmp, path)
