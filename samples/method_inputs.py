"""Constructor arguments that ``guidance-generate`` supplies to guidance modules, beyond ``guidance_scale``.

A registered method whose constructor has an argument of one of these names gets it from the job:

* ``classifier`` -- GFCG's guiding classifier (the embedded digits model ships one; other models have none);
* ``model_id``, ``scheduler`` -- this run's model and scheduler (LinearAG checks its coefficients against them);
* ``coefficients`` -- LinearAG's affine coefficients, fitted on the fly on calibration runs with *other* seeds than
  the samples (fitted coefficients only fit one model, scheduler, step count and scale, so none can be shipped for
  every run). The fit's cost is reported in a note, not in the method's NFE or seconds.

Values are computed on first use, so a run without LinearAG never pays for its calibration.

:func:`linear_ag_coefficients` is the one LinearAG calibration of both CLIs (``guidance-evaluate`` fits per cell).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch

from guidance.base import Guidance
from guidance.cfg import CFG

CALIBRATION_SEED_OFFSET = 1_000_003  # calibration images use seeds far from the sampled ones


class MethodInputs:
    """Named constructor arguments: fixed values, or makers called once on first use that return ``(value, note)``.

    Reads like a mapping (``name in inputs``, ``inputs[name]``, ``keys()``), so :func:`guidance.registry.supply`
    fills a config from it and computes only what a rule takes.
    """

    def __init__(self) -> None:
        self._makers: dict[str, Callable[[], tuple[Any, str]]] = {}
        self._values: dict[str, Any] = {}
        self.notes: dict[str, str] = {}

    def provide(self, name: str, value: Any = None, make: Callable[[], tuple[Any, str]] | None = None) -> None:
        """Supply ``name`` as ``value``, or as the value ``make()`` returns when ``name`` is first asked for."""
        if make is None:
            self._values[name] = value
        else:
            self._makers[name] = make

    def __contains__(self, name: str) -> bool:
        return name in self._values or name in self._makers

    def keys(self) -> list[str]:
        """The names supplied (computed or not yet)."""
        return [*self._values, *self._makers]

    def __getitem__(self, name: str) -> Any:
        return self.get(name)

    def get(self, name: str) -> Any:
        """The value of ``name``, computed on first use."""
        if name not in self._values:
            self._values[name], note = self._makers.pop(name)()
            if note:
                self.notes[name] = note
        return self._values[name]


def linear_ag_coefficients(
    run: Callable[[Guidance, list[int]], Any],
    chunks: Sequence[list[int]],
    num_steps: int,
    model_id: str,
    scheduler: Any,
    scale: float | None,
) -> Any:
    """LinearAG's coefficients fitted on calibration runs of CFG at ``scale`` (CFG's default when ``None``).

    ``run(guidance, chunk)`` performs one pipeline call with ``guidance`` on one calibration ``chunk`` (seeds or image
    indices, never a sampled seed: callers offset them by :data:`CALIBRATION_SEED_OFFSET`), once per chunk. The
    unconditional output is estimated on every other step of the first half
    (:func:`guidance.linear_ag_fit.alternate_steps`); ``model_id`` and ``scheduler`` are stored with the coefficients.
    """
    from guidance.linear_ag_fit import alternate_steps, fit_linear_ag

    runs = [lambda guidance, chunk=chunk: run(guidance, chunk) for chunk in chunks]
    return fit_linear_ag(runs, steps=alternate_steps(num_steps), model_id=model_id, scheduler=scheduler,
                         base=CFG() if scale is None else CFG(scale))


def fit_linear_ag_coefficients(
    run: Callable[[Guidance, list[int]], Any],
    seeds: list[int],
    num_steps: int,
    model_id: str,
    scheduler: Any,
    scale: float | None,
) -> tuple[Any, str]:
    """:func:`linear_ag_coefficients` on one call with ``seeds`` offset by :data:`CALIBRATION_SEED_OFFSET`, and a note.

    ``run(guidance, seeds)`` performs one pipeline call with ``guidance`` and one generator per seed.
    """
    calibration = [seed + CALIBRATION_SEED_OFFSET for seed in seeds]
    print(f"fitting LinearAG coefficients on {len(seeds)} calibration images (other seeds)")
    start = time.perf_counter()
    coefficients = linear_ag_coefficients(run, [calibration], num_steps, model_id, scheduler, scale)
    seconds = time.perf_counter() - start
    note = (
        f"coefficients fitted on the fly on {len(seeds)} calibration images (other seeds) in {seconds:.1f} s, "
        "not counted"
    )
    return coefficients, note


def generators(seeds: list[int]) -> list[torch.Generator]:
    """One CPU generator per image (CPU, so a seed gives the same noise on every device)."""
    return [torch.Generator("cpu").manual_seed(seed) for seed in seeds]
