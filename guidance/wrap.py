"""Rules that wrap another rule (AG, guidance intervals, scale schedules): resolving and checking the wrapped rule."""

from __future__ import annotations

from typing import Any

from guidance.base import Guidance
from guidance.registry import guidance_class, resolve_guidance, scale_of, scale_parameter


def resolve_base(base: Any, guidance_scale: float | None, wrapper: str) -> Guidance:
    """The rule ``wrapper`` wraps, from a module, a registered name or a config dict.

    A name is built with ``guidance_scale`` as its strength (when given; GFCG's ``confusion_scale``); otherwise
    ``guidance_scale`` is only checked against the rule's own strength. The wrapped rule must be a combine rule: a module with ``prepare_noise`` or ``after_step``
    belongs next to the wrapper in a list, not inside it.
    """
    if isinstance(base, str) and not base.lstrip().startswith(("{", "[")) and guidance_scale is not None:
        argument = scale_parameter(guidance_class(base)) or "guidance_scale"
        rule = resolve_guidance({"name": base, argument: guidance_scale})
    else:
        rule = resolve_guidance(base)
    scale = scale_of(rule)
    if guidance_scale is not None and scale != guidance_scale:
        name = scale_parameter(type(rule)) or "guidance_scale"
        raise ValueError(f"guidance_scale={guidance_scale} contradicts the base rule's {name}={scale}")
    for hook in ("prepare_noise", "after_step"):
        if rule.uses(hook):
            raise ValueError(
                f"base {rule!r} defines {hook}; {wrapper} wraps a combine rule only. "
                f"List the other module next to it instead: [{wrapper}(...), <module with {hook}>]"
            )
    return rule


def wrapped_chain(rule: Guidance) -> list[Guidance]:
    """``rule``, the rule it wraps (its ``base``), the rule that one wraps, and so on."""
    chain = [rule]
    while isinstance(getattr(chain[-1], "base", None), Guidance):
        chain.append(chain[-1].base)
    return chain
