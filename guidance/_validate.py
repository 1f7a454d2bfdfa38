"""Argument checks shared by every guidance module: one clear error naming the argument and its allowed range."""

from __future__ import annotations

import inspect
import math
import warnings
from numbers import Real
from typing import Any


def check_number(
    name: str,
    value: object,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
) -> float:
    """Return ``value`` as a float, or raise if it is not a finite real number inside the interval.

    ``TypeError`` for a non-number (``bool`` included), ``ValueError`` for NaN, infinity or a value outside
    ``[low, high]`` (``(low, ...`` / ``..., high)`` when ``low_open`` / ``high_open``). The message names the argument
    and the allowed range.
    """
    if isinstance(value, bool) or not isinstance(value, Real):
        raise TypeError(f"{name} must be a real number, got {type(value).__name__} {value!r}")
    number = float(value)
    left = "(" if low_open else "["
    right = ")" if high_open else "]"
    allowed = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
    if not math.isfinite(number):
        raise ValueError(f"{name} must be finite and in {allowed}, got {value!r}")
    too_low = low is not None and (number <= low if low_open else number < low)
    too_high = high is not None and (number >= high if high_open else number > high)
    if too_low or too_high:
        raise ValueError(f"{name} must be in {allowed}, got {value!r}")
    return number


def check_int(name: str, value: object, *, low: int | None = None) -> int:
    """Return ``value`` if it is an ``int`` (not a ``bool``) no smaller than ``low``; else raise naming ``name``."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__} {value!r}")
    if low is not None and value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
    return value


def check_choice(name: str, value: object, choices: tuple[str, ...]) -> str:
    """Return ``value`` if it is one of ``choices``; else raise a ``ValueError`` listing them."""
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(repr(c) for c in choices)}; got {value!r}")
    return value  # type: ignore[return-value]


def check_bool(name: str, value: object) -> bool:
    """Return ``value`` if it is a ``bool``; else raise a ``TypeError`` naming ``name``."""
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__} {value!r}")
    return value


def renamed_arguments(
    owner: type, deprecated: dict[str, Any], renames: dict[str, str], **given: Any
) -> tuple[dict[str, Any], dict[str, str]]:
    """Fold keywords passed under an old name (``deprecated``, a constructor's ``**kwargs``) into their new names.

    ``renames`` maps old -> new names; ``given`` holds the new names' values as passed. Returns the values by new name
    and, for the error messages of the range checks, the name each value was passed under. Each old name warns with a
    ``FutureWarning``; an unknown keyword is a ``TypeError`` (as Python's own), an old name next to its new one (passed
    with a value other than its default) a ``ValueError``.
    """
    unknown = sorted(set(deprecated) - set(renames))
    if unknown:
        raise TypeError(f"{owner.__name__}() got unexpected keyword argument(s) {unknown}")
    defaults = inspect.signature(owner.__init__).parameters
    values, names = dict(given), {name: name for name in given}
    for old, value in deprecated.items():
        new = renames[old]
        if values[new] != defaults[new].default:
            raise ValueError(f"pass {new}= or its deprecated alias {old}=, not both")
        warnings.warn(f"{owner.__name__}({old}=) is deprecated: it is {new}= now", FutureWarning, stacklevel=3)
        values[new], names[new] = value, old
    return values, names
