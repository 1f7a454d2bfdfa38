"""Guidance modules by name, so scripts, config files and command lines can swap them with a string.

One resolver for every place a guidance is accepted (pipelines, ``guidance-generate --guidance``,
``guidance-evaluate --guidance``):

* a module (``APG(5)``), used as given;
* a registered name (``"apg"``), or names joined by ``+`` (``"nlg+apg+tag"``: composed in that order); each name may
  carry arguments and wrappers in the :mod:`guidance.spec` syntax (``"cfg@interval=0.28,2"``);
* a config dict (``{"name": "apg", "guidance_scale": 5}``), a list of them, or their JSON text;
* ``LABEL=JSON`` (``"strong-apg={\\"name\\": \\"apg\\", \\"guidance_scale\\": 9}"``): a JSON config with a label
  (the label names the method in tables and grids); in JSON configs the string ``"$scale"`` stands for the scale;
* a list or tuple of any of these (composed in order).

In ``a+b`` a rule that takes the next one as an argument of that name gets it nested instead of composed
(``gfcg+autoguidance``: ``GFCG(autoguidance=AutoGuidance(...))``, both given the scale).

``guidance_scale`` given to :func:`resolve_guidance` is the strength of every module built from a *name* that has one
(:attr:`~guidance.base.Guidance.scale_argument`: CFG's w ``guidance_scale``, GFCG's lambda ``confusion_scale``; the
innermost rule of a wrapped term), and replaces ``"$scale"`` in configs; configured modules and dicts carry their own scale. ``inputs`` supplies
constructor arguments a config leaves out (GFCG's ``classifier``, LinearAG's ``coefficients`` ...). A rule whose
required arguments are missing fails with a ``ValueError`` that names them and says what to pass.
"""

from __future__ import annotations

import inspect
import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from guidance.base import Guidance
from guidance.compose import ComposedGuidance

_REGISTRY: dict[str, type[Guidance]] = {}
#: in a JSON config, this string stands for the scale (``guidance-evaluate`` sweeps it)
SCALE_PLACEHOLDER = "$scale"


def register(name: str) -> Callable[[type[Guidance]], type[Guidance]]:
    """Class decorator: make a guidance class available under ``name``."""
    if not name or any(char in name for char in "+=@{}[] "):
        raise ValueError(f"guidance name must be non-empty without '+', '=', '@', brackets or spaces, got {name!r}")

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


def constructor_parameters(cls: type[Guidance]) -> dict[str, inspect.Parameter]:
    """The named constructor arguments of ``cls`` (no ``self``, ``*args`` or ``**kwargs``)."""
    params = list(inspect.signature(cls.__init__).parameters.values())[1:]
    return {p.name: p for p in params if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}


def takes(name: str, argument: str) -> bool:
    """Whether the rule registered under ``name`` takes the constructor argument ``argument``."""
    return argument in constructor_parameters(guidance_class(name))


def scale_parameter(cls: type[Guidance]) -> str | None:
    """The constructor argument that is the strength of ``cls`` (:attr:`Guidance.scale_argument`), or ``None`` when
    it takes none (TAG, NLG)."""
    return cls.scale_argument if cls.scale_argument in constructor_parameters(cls) else None


def scale_of(rule: Guidance) -> float | None:
    """The strength of ``rule`` (its :attr:`~Guidance.scale_argument`'s value), ``None`` when it has none."""
    name = scale_parameter(type(rule))
    return None if name is None else getattr(rule, name)


def _is_json(text: str) -> bool:
    return text.lstrip().startswith(("{", "["))


def _load_json(text: str, what: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"guidance {what}: invalid JSON config ({error})") from None


def substitute_scale(config: Any, guidance_scale: float | None) -> Any:
    """``config`` with every ``"$scale"`` replaced by ``guidance_scale`` (a ``ValueError`` if one is left open)."""
    if config == SCALE_PLACEHOLDER:
        if guidance_scale is None:
            raise ValueError(f"the guidance config uses {SCALE_PLACEHOLDER!r}; give a guidance scale for it")
        return guidance_scale
    if isinstance(config, dict):
        return {key: substitute_scale(value, guidance_scale) for key, value in config.items()}
    if isinstance(config, list):
        return [substitute_scale(value, guidance_scale) for value in config]
    return config


def guidance_label(spec: str) -> str:
    """The name a guidance string gives its method in tables and grids: the label of ``LABEL=JSON``, else the string."""
    text = spec.strip()
    label, sep, rest = text.partition("=")
    return label.strip() if sep and not _is_json(text) and _is_json(rest) else text


def parse_guidance(spec: str, guidance_scale: float | None = None) -> tuple[str, Any]:
    """``(label, config)`` of a guidance string (see the module docstring); unknown names are a ``ValueError``.

    Names get ``guidance_scale`` where their constructor takes one (when it is not ``None``); JSON configs get it in
    place of ``"$scale"``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError(f"a guidance string must name a method, got {spec!r}")
    text = spec.strip()
    if _is_json(text):
        return text, substitute_scale(_load_json(text, repr(text)), guidance_scale)
    label, sep, rest = text.partition("=")
    if sep and _is_json(rest):
        if not label.strip():
            raise ValueError(f"guidance {text!r}: expected LABEL=JSON, e.g. 'strong={{\"name\": \"apg\"}}'")
        return guidance_label(text), substitute_scale(_load_json(rest, repr(label.strip())), guidance_scale)
    from guidance.spec import term_config  # the term syntax builds on this module

    parts = nest_rules([term_config(term, guidance_scale) for term in text.split("+")])
    return text, parts[0] if len(parts) == 1 else parts


def nest_rules(configs: list[Any]) -> list[Any]:
    """The configs of a ``+``-joined string with each one whose rule takes the next one's rule as the argument of
    that name nested into it (``gfcg+autoguidance``: GFCG's ``autoguidance=``); the others stay, to be composed."""
    out: list[Any] = []
    for config in configs:
        previous = out[-1] if out else None
        name = config.get("name") if isinstance(config, dict) else None
        if isinstance(previous, dict) and isinstance(name, str) and name not in previous and isinstance(
                previous.get("name"), str) and takes(previous["name"], name):
            out[-1] = {**previous, name: config}
        else:
            out.append(config)
    return out


def nested_specs() -> list[str]:
    """``outer+inner`` for every pair of registered rules where one takes the other (``gfcg+autoguidance``): the
    combinations the command lines run by default besides the registered names."""
    names = available_guidance()
    return [f"{outer}+{inner}" for outer in names for inner in names if outer != inner and takes(outer, inner)]


def supply(config: Any, inputs: Mapping[str, Any], names: Iterable[str] | None = None) -> tuple[Any, frozenset[str]]:
    """``config`` with the constructor arguments it leaves out taken from ``inputs``, and the names of those arguments.

    Only arguments named in ``names`` (default: the keys of ``inputs``) are considered, at every level of the config
    (lists and nested module configs). An argument is read from ``inputs`` only when a rule takes it, so ``inputs``
    may compute values lazily on first access. Arguments in ``names`` that a rule takes and ``inputs`` lacks are
    returned too (and left out of the config).
    """
    wanted = tuple(inputs.keys() if names is None else names)
    if isinstance(config, list):
        filled = [supply(item, inputs, wanted) for item in config]
        return [item for item, _ in filled], frozenset().union(*(used for _, used in filled))
    if not isinstance(config, dict):
        return config, frozenset()
    filled = {key: supply(value, inputs, wanted) for key, value in config.items()}
    out = {key: value for key, (value, _) in filled.items()}
    used = set().union(*(names_ for _, names_ in filled.values()))
    name = out.get("name")
    if isinstance(name, str) and name in _REGISTRY:
        params = {*constructor_parameters(_REGISTRY[name]), *_REGISTRY[name].renamed}  # old names warn when built
        for argument in wanted:
            if argument in params and argument not in out:
                used.add(argument)
                if argument in inputs:
                    out[argument] = inputs[argument]
    return out, frozenset(used)


def _build(name: str, arguments: dict[str, Any]) -> Guidance:
    """The rule ``name`` built from ``arguments``; unknown or missing arguments are a ``ValueError`` naming them.

    Old names of renamed arguments (the class's ``renamed``) go to the constructor, which warns.
    """
    cls = guidance_class(name)
    params = constructor_parameters(cls)
    unknown = sorted(set(arguments) - set(params) - set(cls.renamed))
    if unknown:
        raise ValueError(
            f"guidance {name!r} takes no argument {', '.join(map(repr, unknown))}; it takes: {', '.join(params)}"
        )
    missing = [p for p in params.values() if p.default is p.empty and p.name not in arguments]
    if missing:
        needed = ", ".join(f"{p.name}=" for p in missing)
        hint = f" ({cls.inputs_help})" if cls.inputs_help else ""
        raise ValueError(f"guidance {name!r} needs {needed}{hint}")
    return cls(**arguments)


def get_guidance(name: str, **config: Any) -> Guidance:
    """Build the guidance ``name`` (a registered name, ``a+b`` names, JSON or ``LABEL=JSON``) with keyword ``config``.

    For composed names every keyword goes to each module that takes it (``get_guidance("nlg+apg", guidance_scale=4)``
    sets APG's scale); a keyword that no module takes is a ``ValueError``.
    """
    if isinstance(name, str) and name in _REGISTRY:
        return _build(name, config)
    _, parsed = parse_guidance(name)
    filled, used = supply(parsed, config)
    unused = sorted(set(config) - used)
    if unused:
        raise ValueError(f"guidance {name!r}: no module takes {', '.join(map(repr, unused))}")
    return from_config(filled)


def from_config(config: dict[str, Any] | list[Any] | str) -> Guidance:
    """Inverse of :meth:`Guidance.config`: a dict, a list of dicts, or their JSON text."""
    if isinstance(config, str):
        config = _load_json(config, repr(config))
    if isinstance(config, list):
        return ComposedGuidance([from_config(item) for item in config])
    if not isinstance(config, dict) or "name" not in config:
        raise ValueError(f"a guidance config must be a dict with a 'name' key, got {config!r}")
    params = dict(config)
    return _build(params.pop("name"), params)


def resolve_guidance(
    spec: Guidance | str | dict[str, Any] | list[Any] | tuple[Any, ...],
    guidance_scale: float | None = None,
    inputs: Mapping[str, Any] | None = None,
) -> Guidance:
    """Turn any accepted guidance spec (see the module docstring) into one :class:`Guidance`.

    Args:
        spec: a module, a name or ``a+b`` names, a config dict or list, JSON, ``LABEL=JSON``, or a list of these.
        guidance_scale: for modules built from names (where they take one) and for ``"$scale"`` in configs.
        inputs: constructor arguments to supply where a config leaves them out (e.g. ``{"classifier": net}``).
    """
    if isinstance(spec, Guidance):
        return spec
    if isinstance(spec, (list, tuple)):
        modules: list[Guidance] = []
        for item in spec:
            rule = resolve_guidance(item, guidance_scale, inputs)
            modules.extend(rule.modules if isinstance(rule, ComposedGuidance) else [rule])
        return modules[0] if len(modules) == 1 else ComposedGuidance(modules)
    if isinstance(spec, str):
        config = parse_guidance(spec, guidance_scale)[1]
    elif isinstance(spec, dict):
        config = substitute_scale(spec, guidance_scale)
    else:
        raise TypeError(
            "guidance must be a Guidance module, a registered name, a config dict or a list of these; "
            f"got {type(spec).__name__}"
        )
    return from_config(supply(config, inputs or {})[0])
