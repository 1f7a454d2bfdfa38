"""Optional dependencies: the core install is what the rules, the pipelines and ``guidance-generate`` need.

| extra | brings | needed by |
|---|---|---|
| ``eval`` | matplotlib | ``guidance-evaluate`` (its plots) |
| ``train`` | scikit-learn | ``python -m scripts.train_digits`` (the digits data set ships in scikit-learn) |
| ``test`` | both, pytest, scipy | the test suite |
"""

from __future__ import annotations

import importlib.util

DISTRIBUTION = "diffusion-guidance"


class MissingExtraError(ImportError):
    """An optional dependency is not installed; the message is one line with the ``pip install`` that fixes it."""


def require(module: str, extra: str, purpose: str) -> None:
    """``MissingExtraError`` unless ``module`` can be imported (checked without importing it)."""
    if importlib.util.find_spec(module) is None:
        raise MissingExtraError(
            f"{purpose} needs {module}, which is not installed: pip install '{DISTRIBUTION}[{extra}]'"
        )
