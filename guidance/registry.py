"""Guidance modules by name, so scripts and config files can swap them with a string.

``get_guidance("apg", guidance_scale=5)`` builds one; ``resolve_guidance`` accepts a module, a name, a config dict
(``{"name": "apg", ...}``), a JSON string of one, or a list of any of these (composed in order).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

from guidance.base import Guidance
from guidance.compose import ComposedGuidance

_REGISTRY: dict[str, type[Guidance]] = {}


def register(name: str) -> Callable[[type[Guidance]], type[Guidance]]:
    """Class decorator: make a guidance class available under ``name``."""

    def decorate(cls: type[Guidance]) -> type[Guidance]:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ValueError(f"guidance name {name!r} is already registered to {_REGISTRY[name].__name__}")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return decorate


def available_guidance() -> list[str]:
    """Registered names, in registration order (CFG first: it is the reference)."""
    return list(_REGISTRY)


def guidance_class(name: str) -> type[Guidance]:
    """The class registered under ``name``; a ``ValueError`` listing the available names otherwise."""
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown guidance {name!r}; available: {', '.join(available_guidance())}")
    return _REGISTRY[name]


def get_guidance(name: str, **config: Any) -> Guidance:
    """Build the guidance registered under ``name`` with keyword ``config``."""
    return guidance_class(name)(**config)


def from_config(config: dict[str, Any] | list[Any] | str) -> Guidance:
    """Inverse of :meth:`Guidance.config`: a dict, a list of dicts, or their JSON text."""
    if isinstance(config, str):
        config = json.loads(config)
    if isinstance(config, list):
        return ComposedGuidance([from_config(item) for item in config])
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a guidance config must be a dict with a 'name' key, got {config!r}")
    params = dict(config)
    return get_guidance(params.pop("name"), **params)


def resolve_guidance(spec: Guidance | str | dict[str, Any] | list[Any] | tuple[Any, ...]) -> Guidance:
    """Turn the ``guidance=`` argument of a pipeline into one :class:`Guidance`."""
    if isinstance(spec, Guidance):
        return spec
    if isinstance(spec, str):
        return from_config(spec) if spec.lstrip().startswith(("{", "[")) else get_guidance(spec)
    if isinstance(spec, dict):
        return from_config(spec)
    if isinstance(spec, (list, tuple)):
        items = [resolve_guidance(item) for item in spec]
        return items[0] if len(items) == 1 else ComposedGuidance(items)
    raise TypeError(
        "guidance must be a Guidance module, a registered name, a config dict or a list of these; "
        f"got {type(spec).__name__}"
    )
