"""A one-line syntax for a guidance rule with arguments and wrappers, for the command-line tools.

    TERM  := NAME ("@" KEY "=" VALUE)*

``NAME`` is a registered rule. Each ``@KEY=VALUE`` either sets a constructor argument of the rule built so far
(``apg@parallel_scale=0.5``) or, when ``KEY`` is a wrapper of :data:`WRAPPERS`, wraps it with ``VALUE`` as the
wrapper's main argument; later arguments then go to the wrapper. Wrappers apply left to right (the leftmost is
innermost):

    cfg@interval=0.28,2                     GuidanceInterval(CFG(w), sigma_range=(0.28, 2))
    cfg@schedule=cosine                     ScaleSchedule(CFG(w), "cosine")
    apg@parallel_scale=0.5@interval=0.28,inf
                                            GuidanceInterval(APG(w, parallel_scale=0.5), sigma_range=(0.28, inf))
    cfg@interval=0.28,2@ag=0.995@reduce=per-sample
                                            AdaptiveGuidance(GuidanceInterval(CFG(w), ...), 0.995, reduce="per-sample")
    dynamic-cfg@scales=1,2,3,4              DynamicCFG(scales=(1, 2, 3, 4))

``VALUE`` is a number, ``inf``, ``true``/``false``, ``none``, a word, or a comma-separated list of these. The tools give
the guidance scale ``w`` to the innermost rule, as its strength (:attr:`~guidance.base.Guidance.scale_argument`: CFG's
``guidance_scale``, GFCG's ``confusion_scale``; rules without one, such as TAG, take none). Anything the syntax cannot say
(a dict of scorer options, a callable) takes a JSON config (``guidance-evaluate`` ``LABEL=JSON``) or Python.
"""

from __future__ import annotations

import math
import re
from typing import Any

from guidance.registry import guidance_class, scale_parameter

#: wrapper name -> the argument its ``@name=VALUE`` sets
WRAPPERS = {"interval": "sigma_range", "schedule": "schedule", "ag": "threshold"}
_KEY = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")

Layer = tuple[str, dict[str, Any]]


def parse_scalar(text: str) -> Any:
    """``"3"`` -> 3, ``"0.28"`` -> 0.28, ``"inf"`` -> inf, ``"true"`` -> True, ``"none"`` -> None, else the text."""
    lowered = text.strip().lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered == "none":
        return None
    if re.fullmatch(r"[+-]?\d+", lowered):
        return int(lowered)
    try:
        value = float(lowered)
    except ValueError:
        return text.strip()
    if math.isnan(value):
        raise ValueError(f"nan is not a valid value ({text!r})")
    return value


def parse_value(text: str) -> Any:
    """A scalar, or a list of scalars when ``text`` has commas."""
    if "," in text:
        return [parse_scalar(item) for item in text.split(",")]
    return parse_scalar(text)


def parse_term(term: str) -> list[Layer]:
    """``[(name, kwargs), (wrapper, kwargs), ...]``, innermost first (see the module docstring)."""
    name, *modifiers = term.strip().split("@")
    guidance_class(name)  # a ValueError listing the registered names
    layers: list[Layer] = [(name, {})]
    for modifier in modifiers:
        key, sep, text = modifier.partition("=")
        if not sep or not _KEY.match(key) or not text:
            raise ValueError(f"{term!r}: expected @KEY=VALUE, got {'@' + modifier!r}")
        value = parse_value(text)
        if key in WRAPPERS:
            layers.append((key, {WRAPPERS[key]: value}))
        elif key in layers[-1][1] or key == "base":
            raise ValueError(f"{term!r}: {key} is given twice" if key != "base" else f"{term!r}: base is set by nesting")
        else:
            layers[-1][1][key] = value
    return layers


def nest(layers: list[Layer], base: Any) -> dict[str, Any]:
    """The config of ``layers`` (from :func:`parse_term`) around ``base``, the innermost rule's module or config."""
    rule = base
    for name, kwargs in layers[1:]:
        rule = {"name": name, "base": rule, **kwargs}
    return rule


def term_config(term: str, guidance_scale: float | None = None) -> dict[str, Any]:
    """The config dict of ``term``, with ``guidance_scale`` given to the innermost rule as its strength when it takes
    one (unless the term sets it)."""
    layers = parse_term(term)
    name, kwargs = layers[0]
    inner: dict[str, Any] = {"name": name, **kwargs}
    argument = scale_parameter(guidance_class(name))
    if guidance_scale is not None and argument is not None:
        inner.setdefault(argument, guidance_scale)
    return nest(layers, inner)
