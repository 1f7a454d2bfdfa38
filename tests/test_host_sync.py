"""The hot path makes no host round trip per evaluation for CFG, APG, TAG and TAG-cfg.

On a GPU every ``.item()``, ``.tolist()``, ``.cpu()``, ``float(t)``, ``int(t)`` or ``bool(t)`` of a device tensor
waits for the device. Checked on the CPU by counting those calls made from this library's own code (frames in
``guidance/`` and ``pipelines/``; diffusers' own loop is not ours to change) in a run of N and of 2N steps, through
our loop and through ``attach``: the count must not grow with the number of steps (what remains is per run: reading
the scheduler's tables once, the non-finite check's read-back every 10 evaluations and at the end). Rules that decide
per sample which rows to evaluate (AG's switch, GFCG's reference rows) or validate a user callback's output at every
evaluation (DynamicCFG's scorer) read back by design; GFCG's reads are counted against the three it documents.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
from diffusers import DDIMScheduler, EulerDiscreteScheduler, StableDiffusionPipeline

from guidance import APG, CFG, GFCG, TAG, TAGCFG
from pipelines import attach
from tests.tag_nlg_fakes import tiny_class_pipeline
from tiny import one_thread  # noqa: F401

pytestmark = pytest.mark.usefixtures("one_thread")

OURS = tuple(str(Path(__file__).resolve().parents[1] / name) for name in ("guidance", "pipelines"))
METHODS = ("item", "tolist", "cpu", "__float__", "__int__", "__bool__")


class HostReads:
    """Counts the host reads of tensors made from the library's own frames while active."""

    def __enter__(self) -> HostReads:
        self.count = 0
        self.originals = {name: getattr(torch.Tensor, name) for name in METHODS}
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, self._counting(original))
        return self

    def _counting(self, original):
        def method(tensor, *args, **kwargs):
            if sys._getframe(1).f_code.co_filename.startswith(OURS):
                self.count += 1
            return original(tensor, *args, **kwargs)

        return method

    def __exit__(self, *exc) -> None:
        for name, original in self.originals.items():
            setattr(torch.Tensor, name, original)


def rules():
    return {
        "cfg": lambda: CFG(3.0, guidance_rescale=0.5), "apg": lambda: APG(3.0), "tag": lambda: [CFG(3.0), TAG(1.15)],
        "tag-window": lambda: [CFG(3.0), TAG(1.15, window=(900, 300))], "tag-cfg": lambda: TAGCFG(3.0),
    }


def reads(run, steps: int) -> int:
    run(steps)  # warm-up: lazy imports and caches
    with HostReads() as counter:
        run(steps)
    return counter.count


@pytest.mark.parametrize("name", list(rules()))
def test_our_loop_reads_nothing_back_per_step(name):
    pipe = tiny_class_pipeline(EulerDiscreteScheduler(beta_schedule="scaled_linear"))

    def run(steps):
        pipe([1, 2], guidance=rules()[name](), num_inference_steps=steps, output_type="latent")

    assert reads(run, 4) == reads(run, 8)


@pytest.mark.parametrize("name", ["cfg", "apg", "tag", "tag-cfg"])
def test_attach_reads_nothing_back_per_step(sd, name):
    pipe = StableDiffusionPipeline(**{**sd, "scheduler": DDIMScheduler.from_config(sd["scheduler"].config)})
    pipe.set_progress_bar_config(disable=True)

    def run(steps):
        with attach(pipe, rules()[name]()):
            pipe("a cat", num_inference_steps=steps, output_type="latent")

    assert reads(run, 4) == reads(run, 8)


def test_the_counter_sees_a_per_step_read():
    """The check can fail: a rule that reads a value back at every evaluation is counted."""
    class Reading(CFG):
        def combine(self, preds, step):
            float(preds["cond"].mean())
            return super().combine(preds, step)

    pipe = tiny_class_pipeline(DDIMScheduler())

    def run(steps):
        pipe([1], guidance=Reading(3.0), num_inference_steps=steps, output_type="latent")

    code = Reading.combine.__code__
    Reading.combine.__code__ = code.replace(co_filename=str(Path(OURS[0]) / "reading.py"))
    assert reads(run, 8) - reads(run, 4) == 4


def test_gfcg_reads_back_only_its_documented_three_per_evaluation():
    """GFCG decides per sample which rows need the reference branch, so it reads back by design, but only: the rows
    (the loop), the reference labels' range check (one read), the classifier's finite check; nothing per sample
    for its diagnostics or its combination. The one read more over 4 extra steps is the loop's non-finite check,
    read back every 10 forwards (GFCG makes two per evaluation)."""
    pipe = tiny_class_pipeline(EulerDiscreteScheduler(beta_schedule="scaled_linear"))
    torch.manual_seed(0)
    classifier = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(64, 10)).eval()

    def run(steps):
        rule = GFCG(classifier)
        pipe([1, 2], guidance=rule, num_inference_steps=steps, output_type="latent")
        assert all(record["scale"].gt(0).all() for record in rule.history)  # the reference runs at every evaluation

    assert reads(run, 8) - reads(run, 4) == 3 * 4 + 1
