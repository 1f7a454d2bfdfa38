"""What ``guidance-generate`` and ``guidance-evaluate`` share: a quiet start, the package check, one vocabulary of
flags, one-line argument errors and progress reporting.

Import this module before diffusers or transformers: it silences their start-up notices (e.g. transformers'
"requires torchvision, falling back to ..." image-processor warnings, which concern processors this project never
uses) through their environment variables, which they read when first imported.

Shared flags (both tools, same names and meanings): ``--guidance`` (old name ``--methods``), ``--scale``
(``--scales``), ``--steps``, ``--scheduler``, ``--seed``, ``--out`` (``--output``, ``-o``) and ``--quiet`` (``-q``).
Progress is a tqdm bar when standard output is a terminal, plain log lines otherwise (CI logs, ``| tee``), and
nothing with ``--quiet``.
"""

from __future__ import annotations

import os

os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")

import argparse  # noqa: E402
import importlib  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from collections.abc import Sequence  # noqa: E402
from typing import Any  # noqa: E402

DISTRIBUTION = "diffusion-guidance"
#: an attribute only this distribution's top-level packages have (other PyPI distributions install the same names)
OWN_ATTRIBUTES = {"guidance": "__distribution__", "pipelines": "__distribution__"}


def check_packages(names: Sequence[str] = ("guidance", "pipelines")) -> None:
    """``ImportError`` with one clear line if ``import guidance`` / ``import pipelines`` finds another distribution's
    package of that name (e.g. the LLM library that also installs ``guidance/``)."""
    for name in names:
        module = importlib.import_module(name)
        if not hasattr(module, OWN_ATTRIBUTES[name]):
            where = getattr(module, "__file__", None) or "a namespace package"
            raise ImportError(
                f"'import {name}' found {where}, which is not {DISTRIBUTION}'s {name} package: another installed "
                f"distribution uses the top-level name {name!r}. Install {DISTRIBUTION} in its own virtual "
                "environment (or uninstall the other distribution)."
            )


check_packages()


class OneLineParser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block), exit status 2."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message}\n")


def positive_int(text: str) -> int:
    """argparse type: an int >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_shared_arguments(
    parser: argparse.ArgumentParser,
    *,
    scale_help: str,
    steps: int,
    out: str,
    scheduler_help: str,
    scale_default: Any = None,
    many_scales: bool = False,
) -> None:
    """The flags both tools take, with the same names (``dest``: guidance, scale, steps, scheduler, seed, out, quiet).

    ``many_scales``: ``--scale`` takes one value or several (a sweep).
    """
    from samples.loading import SCHEDULERS

    parser.add_argument(
        "--guidance", "--methods", dest="guidance", nargs="+", metavar="GUIDANCE",
        help="registered names, names joined by '+' to compose (nlg+apg+tag), with @KEY=VALUE arguments and "
        "wrappers (cfg@interval=0.28,2, cfg@schedule=cosine), or LABEL=JSON configs in which \"$scale\" stands for "
        "the scale; a+b nests b in a when a takes it, gfcg+autoguidance (default: every registered method, then "
        "gfcg+autoguidance)",
    )
    parser.add_argument(
        "--scale", "--scales", dest="scale", type=float, nargs="+" if many_scales else None, default=scale_default,
        metavar="SCALE", help=scale_help,
    )
    parser.add_argument("--steps", type=positive_int, default=steps, help="sampling steps (default: %(default)s)")
    parser.add_argument("--scheduler", choices=list(SCHEDULERS), help=scheduler_help)
    parser.add_argument("--seed", type=int, default=0, help="image i uses seed + i (default: %(default)s)")
    parser.add_argument("--out", "--output", "-o", dest="out", default=out, help="output folder (default: %(default)s)")
    parser.add_argument("--quiet", "-q", action="store_true", help="no progress output (results and errors only)")
    parser.add_argument(
        "--guiding-model", help="autoguidance's guiding model: a pipeline folder or hub id (default: "
        "samples/weights/digits-weak for the embedded digits model, else none)",
    )


def guiding_model(requested: str | None, embedded: bool) -> str | None:
    """``--guiding-model``, or the embedded model's weaker checkpoint (``samples/weights/digits-weak``) for it."""
    from samples.digits.nets import WEAK_MODEL

    if requested is not None:
        return requested
    return str(WEAK_MODEL) if embedded else None


class PlainProgress:
    """Progress as plain log lines (one per update, on standard output): for logs, where bars would flood them."""

    def __init__(self, total: int, desc: str, unit: str) -> None:
        self.total, self.desc, self.unit = total, desc, unit
        self.done, self.postfix = 0, ""
        self.start = time.perf_counter()

    def set_postfix_str(self, text: str) -> None:
        self.postfix = text

    def update(self, count: int = 1) -> None:
        self.done += count
        postfix = f" ({self.postfix})" if self.postfix else ""
        elapsed = time.perf_counter() - self.start
        print(f"{self.desc}: {self.done}/{self.total} {self.unit}{postfix}, {elapsed:.1f} s", flush=True)

    def close(self) -> None:
        """Nothing to release (the tqdm interface)."""

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class NoProgress(PlainProgress):
    """``--quiet``: progress is not reported."""

    def update(self, count: int = 1) -> None:
        self.done += count


def interactive() -> bool:
    """Whether standard output is a terminal (then progress bars; else plain log lines)."""
    return sys.stdout.isatty()


def progress(total: int, desc: str, unit: str, quiet: bool = False) -> Any:
    """A progress reporter with tqdm's ``update`` / ``set_postfix_str`` / context-manager interface."""
    if quiet:
        return NoProgress(total, desc, unit)
    if not interactive():
        return PlainProgress(total, desc, unit)
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit=unit)
