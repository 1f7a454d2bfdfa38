"""Checks that another denoiser (Autoguidance's guiding model, :class:`guidance.base.Network`) can take the call of
the pipeline's own denoiser: both integrations build its model function with their own call convention and refuse,
before any work, a module that cannot serve it.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch

#: config entries that fix what the denoiser's call takes and returns; a guiding model must agree on each one that
#: both configs define (the resolution is not among them: convolutional denoisers run at any size)
CALL_CONFIG = (
    "in_channels",
    "out_channels",
    "num_class_embeds",
    "class_embed_type",
    "num_embeds_ada_norm",
    "patch_size",
    "cross_attention_dim",
    "encoder_hid_dim",
    "addition_embed_type",
    "projection_class_embeddings_input_dim",
    "joint_attention_dim",
    "pooled_projection_dim",
    "learn_sigma",
)


def _device(module: torch.nn.Module) -> torch.device | None:
    parameter = next(module.parameters(), None)
    return None if parameter is None else parameter.device


def _takes_call(theirs: inspect.Signature, own: inspect.Signature) -> bool:
    """Whether a forward with signature ``theirs`` takes every call of one with signature ``own``: the same first
    (sample) argument, every argument of ``own`` (or ``**kwargs``), and no required argument ``own`` lacks."""
    names, params = list(own.parameters), theirs.parameters
    if list(params)[1:2] != names[1:2]:
        return False
    open_kwargs = any(p.kind is p.VAR_KEYWORD for p in params.values())
    if not open_kwargs and any(name not in params for name in names if own.parameters[name].kind is not
                               inspect.Parameter.VAR_KEYWORD):
        return False
    required = [n for n, p in params.items() if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD,
                                                                                     p.KEYWORD_ONLY)]
    return all(name in own.parameters for name in required)


def check_guiding_module(module: Any, main: torch.nn.Module) -> None:
    """``ValueError`` naming the mismatch if ``module`` cannot be called like the pipeline's denoiser ``main``: not a
    ``torch.nn.Module``, ``main`` itself, another call signature, a call-relevant config entry that differs
    (:data:`CALL_CONFIG`) or another device."""
    if not isinstance(module, torch.nn.Module):
        raise ValueError(f"the guiding model must be a torch.nn.Module (a denoiser), got {type(module).__name__}")
    if module is main:
        raise ValueError("the guiding model is the pipeline's own denoiser; Autoguidance needs a separate, weaker model")
    own, theirs = inspect.signature(type(main).forward), inspect.signature(type(module).forward)
    if not _takes_call(theirs, own):
        raise ValueError(
            f"the guiding model ({type(module).__name__}) is not called like the pipeline's denoiser "
            f"({type(main).__name__}): forward{theirs} vs forward{own}"
        )
    config, other = getattr(main, "config", {}), getattr(module, "config", {})
    for key in CALL_CONFIG:
        if key in config and key in other and config[key] != other[key]:
            raise ValueError(
                f"the guiding model's config has {key}={other[key]!r} where the pipeline's denoiser has "
                f"{config[key]!r}: it must take the same inputs and predict the same outputs"
            )
    device, guide_device = _device(main), _device(module)
    if device is not None and guide_device is not None and device != guide_device:
        raise ValueError(f"the guiding model is on {guide_device}, the pipeline's denoiser on {device}: move it there")
