"""Run several guidance modules in one loop: ``[NLG(...), APG(...), TAG(...)]``.

Hooks chain in list order (``prepare_noise``, ``after_step``); exactly one module may define ``combine`` (and with it
the ``branches`` it needs). Two modules that both define ``combine`` are refused.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from guidance.base import Branch, Guidance, Network, NoiseContext, Predictions, Step


class ComposedGuidance(Guidance):
    """The modules of a list, run as one guidance; see the module docstring for the rules."""

    name = "compose"

    def __init__(self, modules: Sequence[Guidance]) -> None:
        modules = list(modules)
        if not modules:
            raise ValueError("guidance list must not be empty")
        for module in modules:
            if not isinstance(module, Guidance):
                raise TypeError(f"guidance list items must be Guidance modules, got {type(module).__name__}")
        combiners = [m for m in modules if m.overrides("combine")]
        if len(combiners) > 1:
            names = ", ".join(type(m).__name__ for m in combiners)
            raise ValueError(
                f"guidance list has more than one module that defines combine ({names}); "
                "keep one combine rule (wrap it, e.g. AdaptiveGuidance(APG(...)), instead of listing both)"
            )
        brancher = [m for m in modules if m.overrides("branches") and m not in combiners]
        if brancher:
            raise ValueError(
                f"{type(brancher[0]).__name__} chooses branches without a combine rule; it cannot be listed with others"
            )
        self.modules = modules
        self._combiner = combiners[0] if combiners else Guidance()
        self.required_branches = frozenset().union(*(m.required_branches for m in modules))

    @property
    def networks(self) -> dict[str, Network]:
        merged: dict[str, Network] = {}
        for module in self.modules:
            for name, network in module.networks.items():
                if name in merged and merged[name].module is not network.module:
                    raise ValueError(f"two composed rules name different networks {name!r}")
                merged[name] = network
        return merged

    def reset(self) -> None:
        for module in self.modules:
            module.reset()

    def prepare_noise(self, noise: torch.Tensor, context: NoiseContext) -> torch.Tensor:
        for module in self.modules:
            noise = module.prepare_noise(noise, context)
        return noise

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        return self._combiner.branches(preds, step)

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        return self._combiner.combine(preds, step)

    def after_step(self, before: torch.Tensor, after: torch.Tensor, step: Step) -> torch.Tensor:
        for module in self.modules:
            after = module.after_step(before, after, step)
        return after

    def uses(self, hook: str) -> bool:
        return any(module.uses(hook) for module in self.modules)

    def config(self) -> list[dict[str, Any]]:  # type: ignore[override]
        return [module.config() for module in self.modules]

    def __repr__(self) -> str:
        return f"[{', '.join(repr(m) for m in self.modules)}]"
