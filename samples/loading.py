"""Load a guided pipeline of any supported kind from a local folder or a hub id, and swap its scheduler by name.

The pipeline class is read from the folder's ``model_index.json`` (``_class_name``) and mapped to our guided
subclass: a diffusers pipeline class maps to the ``Guided*`` class of :mod:`pipelines` that subclasses it
(``StableDiffusionPipeline`` -> ``GuidedStableDiffusionPipeline``; SDXL/SD3 as soon as :mod:`pipelines` exports them),
and ``DiTPipeline`` to :class:`~pipelines.GuidedClassConditionalPipeline`. Every failure is an ``OSError`` or
``ValueError`` with one clear line, so a command-line tool can print it without a traceback.
"""

from __future__ import annotations

import json
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DiffusionPipeline,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
    HeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

import pipelines
from pipelines import GuidedClassConditionalPipeline
from pipelines.schedulers import scheduler_family

#: ``--scheduler`` names -> (diffusers class, config overrides)
SCHEDULERS: dict[str, tuple[type, dict[str, Any]]] = {
    "ddim": (DDIMScheduler, {}),
    "ddpm": (DDPMScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "euler-a": (EulerAncestralDiscreteScheduler, {}),
    "heun": (HeunDiscreteScheduler, {}),
    "dpm++2m": (DPMSolverMultistepScheduler, {"algorithm_type": "dpmsolver++", "solver_order": 2}),
    "unipc": (UniPCMultistepScheduler, {}),
    "flow-euler": (FlowMatchEulerDiscreteScheduler, {}),
}

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}

#: diffusers pipeline classes served by a guided class that does not subclass them
_ALIASES = {"DiTPipeline": GuidedClassConditionalPipeline}

_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


def guided_classes() -> dict[str, type[DiffusionPipeline]]:
    """``_class_name`` -> guided pipeline class, for every guided pipeline :mod:`pipelines` exports."""
    found: dict[str, type[DiffusionPipeline]] = dict(_ALIASES)
    for obj in vars(pipelines).values():
        if isinstance(obj, type) and issubclass(obj, DiffusionPipeline) and obj is not DiffusionPipeline:
            found[obj.__name__] = obj
            parent = obj.__mro__[1]
            if parent is not DiffusionPipeline:
                found.setdefault(parent.__name__, obj)
    return found


def pipeline_class(class_name: str) -> type[DiffusionPipeline]:
    """The guided class for a ``model_index.json`` ``_class_name``; ``ValueError`` listing the supported ones."""
    classes = guided_classes()
    if class_name not in classes:
        supported = sorted(name for name in classes if not name.startswith("Guided"))
        raise ValueError(f"unsupported pipeline class {class_name!r}; supported: {', '.join(supported)}")
    return classes[class_name]


def looks_like_path(model: str) -> bool:
    """Whether ``model`` can only be meant as a local path (a hub id is ``name`` or ``owner/name``)."""
    return not _HUB_ID.match(model) or model.startswith((".", "~")) or Path(model).suffix in {".json", ".safetensors"}


def read_class_name(model: str) -> str:
    """``_class_name`` of a local pipeline folder or a hub id (the latter from the cache or the network)."""
    folder = Path(model).expanduser()
    if folder.exists():
        index = folder / "model_index.json"
        if not index.is_file():
            raise OSError(f"{model} is not a diffusers pipeline folder (no model_index.json)")
        try:
            return json.loads(index.read_text())["_class_name"]
        except (json.JSONDecodeError, KeyError) as error:
            raise ValueError(f"{index} has no readable _class_name ({error})") from None
    if looks_like_path(model):
        raise OSError(f"model path {model} does not exist")
    print(f"{model} is not a local folder: fetching it from the Hugging Face Hub (or its cache)")
    try:
        with warnings.catch_warnings():  # deprecation notices of huggingface_hub arguments diffusers still passes
            warnings.simplefilter("ignore")
            return DiffusionPipeline.load_config(model)["_class_name"]
    except (OSError, ValueError) as error:  # huggingface_hub's errors are OSErrors
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(
            f"model {model!r} is not a local folder and could not be fetched from the Hugging Face Hub "
            f"(no network or no such repository?): {first}"
        ) from None


def load_pipeline(
    model: str, device: str = "cpu", dtype: torch.dtype = torch.float32, cls: type[DiffusionPipeline] | None = None
) -> DiffusionPipeline:
    """The guided pipeline stored at ``model`` (local folder or hub id), on ``device`` in ``dtype``.

    ``cls`` (default: from ``model_index.json``, see :func:`pipeline_class`) is the guided class to load it with.
    """
    cls = cls or pipeline_class(read_class_name(model))
    source = str(Path(model).expanduser()) if Path(model).expanduser().exists() else model
    try:
        with warnings.catch_warnings():  # newer diffusers renamed torch_dtype to dtype; older ones know only torch_dtype
            warnings.simplefilter("ignore", FutureWarning)
            pipe = cls.from_pretrained(source, torch_dtype=dtype)
    except (OSError, ValueError, TypeError, KeyError) as error:
        first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise OSError(f"could not load {cls.__name__} from {model}: {first}") from None
    return pipe.to(device)


def set_scheduler(pipe: DiffusionPipeline, name: str) -> None:
    """Replace ``pipe.scheduler`` by the scheduler ``name`` built from the current scheduler's config.

    Flow-matching models keep flow-matching schedulers and noise-prediction models the others: mixing them would
    sample from the wrong process, so that is refused.
    """
    if name not in SCHEDULERS:
        raise ValueError(f"unknown scheduler {name!r}; available: {', '.join(SCHEDULERS)}")
    cls, overrides = SCHEDULERS[name]
    model_is_flow = scheduler_family(pipe.scheduler) == "flow"
    if model_is_flow != (name == "flow-euler"):
        kind = "a flow-matching" if model_is_flow else "a noise-prediction (VP)"
        raise ValueError(f"scheduler {name!r} does not fit {kind} model ({type(pipe.scheduler).__name__})")
    pipe.scheduler = cls.from_config(pipe.scheduler.config, **overrides)


def load_guiding_model(model: str, device: str = "cpu", dtype: torch.dtype = torch.float32) -> tuple[Any, str]:
    """Autoguidance's guiding model from the pipeline stored at ``model``: its denoiser (``unet`` or ``transformer``)
    and what it predicts (from its own scheduler's config, checked against the sampled pipeline's)."""
    from pipelines.attach import denoiser_of
    from pipelines.schedulers import prediction_type_of

    pipe = load_pipeline(model, device, dtype)
    return denoiser_of(pipe).eval(), prediction_type_of(pipe.scheduler)
