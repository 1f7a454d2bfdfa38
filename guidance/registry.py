"""Guidance modules by name, so scripts and config files can swap them with a string.

``get_guidance("apg", guidance_scale=5)`` builds one; ``resolve_guidance`` accepts a module, a name, a config dict
(``{"name": "apg", ...}``), a JSON string of one, or a list of any of these (composed in order).
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Sequence
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


def takes_rule(outer: str, inner: str) -> bool:
    """Whether the rule registered as ``outer`` takes a rule registered as ``inner`` as its constructor argument of
    that name (GFCG's ``autoguidance=``): the command lines' ``outer+inner`` then nests ``inner`` in ``outer``."""
    return inner in inspect.signature(guidance_class(outer).__init__).parameters


def nested_rules(names: Sequence[str]) -> list[tuple[str, str | None]]:
    """The names of a command-line spec (``a+b+c``) as ``(rule, nested rule or None)``: a name whose rule takes the
    next one (:func:`takes_rule`) gets it nested, every other name stands alone (and the rules are composed)."""
    out: list[tuple[str, str | None]] = []
    index = 0
    while index < len(names):
        name = names[index]
        inner = names[index + 1] if index + 1 < len(names) and takes_rule(name, names[index + 1]) else None
        out.append((name, inner))
        index += 1 if inner is None else 2
    return out


def nested_specs() -> list[str]:
    """``outer+inner`` for every pair of registered rules where one takes the other (``gfcg+autoguidance``): the
    combinations the command lines run by default besides the registered names."""
    names = available_guidance()
    return [f"{outer}+{inner}" for outer in names for inner in names if outer != inner and takes_rule(outer, inner)]


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
