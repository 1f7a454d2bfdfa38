"""Dynamic CFG: a greedy per-evaluation, per-sample choice of the guidance scale from online feedback.

**Reconstruction.** The seed paper, "Dynamic Classifier-Free Diffusion Guidance via Online Feedback", is known here by
its abstract only: at every step, candidate guided predictions are scored by small evaluators (alignment, fidelity,
preference) and the scale is chosen greedily for that step and sample. Its candidate set, evaluators, score
combination and schedule are not public; everything below is this library's reading:

* Candidates: CFG (diffusers' convention) at every scale of ``scales`` (``w_1 < ... < w_K``), all formed from the
  *same* conditional and unconditional predictions of this evaluation, so the rule costs exactly CFG's NFE
  (2 per evaluation; the scorer's own networks are extra, not counted as NFE):

      out_k = out_u + w_k (out_c - out_u)            x0_k = to_x0(out_k)     (candidates [K, B, ...], x0 space)
      k*_b  = argmax_k scorer(x0, step)[k, b]        (first maximum on ties: the smaller scale)
      out_b = out_{k*_b, b}

  CFG is affine, so ``x0_k`` is CFG on the denoised estimates. The output is the chosen candidate itself, so a scorer
  that always prefers candidate k gives CFG at ``w_k`` bit for bit.
* The choice is made at every model evaluation (a Heun step chooses at both of its evaluations) and independently per
  sample: a sample's choice depends only on its own candidates' scores (for scorers that score samples separately,
  as the shipped ones do).
* Scorers (:mod:`guidance.scorers`): the embedded digits classifier's log-probability of the target class
  (``scorer="classifier"``), CLIP text-image alignment, and weighted sums.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from guidance._validate import check_number
from guidance.base import Branch, Guidance, Predictions, Step
from guidance.cfg import classifier_free_guidance
from guidance.registry import register
from guidance.scorers import Scorer, scorer_from_spec

#: candidates when only ``guidance_scale`` is given: this many scales evenly spaced in [1, guidance_scale]
DEFAULT_NUM_CANDIDATES = 5
DEFAULT_GUIDANCE_SCALE = 7.5


def check_scales(scales: object) -> tuple[float, ...]:
    """A non-empty, strictly increasing sequence of finite scales >= 0, as a tuple of floats."""
    if isinstance(scales, (str, bytes)) or not isinstance(scales, Sequence) or not scales:
        raise ValueError(f"scales must be a non-empty sequence of guidance scales (finite, >= 0), got {scales!r}")
    values = tuple(check_number(f"scales[{k}]", value, low=0.0) for k, value in enumerate(scales))
    if any(b <= a for a, b in zip(values, values[1:])):
        raise ValueError(f"scales must be strictly increasing (the last candidate is the strongest), got {values}")
    return values


def evenly_spaced_scales(guidance_scale: float, count: int = DEFAULT_NUM_CANDIDATES) -> tuple[float, ...]:
    """``count`` scales evenly spaced from 1 to ``guidance_scale`` (>= 1); just ``(1.0,)`` at 1."""
    top = check_number("guidance_scale", guidance_scale, low=1.0)
    if top == 1.0:
        return (1.0,)
    return tuple(1.0 + (top - 1.0) * k / (count - 1) for k in range(count))


def choose(scores: torch.Tensor, num_candidates: int, rows: int) -> torch.Tensor:
    """Index ``[B]`` of the best candidate per sample; ``scores`` must be finite ``[K, B]``."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (num_candidates, rows):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise ValueError(f"scorer must return scores of shape [K, B] = [{num_candidates}, {rows}], got {shape}")
    if not torch.isfinite(scores).all():
        raise ValueError("scorer returned non-finite scores (NaN or inf); scores must be finite, higher is better")
    return scores.argmax(dim=0)


@register("dynamic-cfg")
class DynamicCFG(Guidance):
    """CFG with the scale chosen per evaluation and sample by a scorer (see the module docstring; a reconstruction).

    Args:
        scales: the candidate scales ``w_1 < ... < w_K`` (non-empty, strictly increasing, >= 0). ``None``:
            :data:`DEFAULT_NUM_CANDIDATES` scales evenly spaced in ``[1, guidance_scale]``.
        scorer: a callable ``scorer(candidates [K, B, ...] x0, step) -> scores [K, B]`` (higher is better, finite), a
            name in :data:`guidance.scorers.SCORERS` (``"classifier"``: the log-probability of the target class under
            ``classifier``), or a dict with options (``{"name": "classifier", "cap": 0.9}``). A callable is kept as is
            in :meth:`config` (a dict round trip works; JSON needs a name or a dict).
        classifier: the classifier of ``scorer="classifier"`` (a ``torch.nn.Module``, images in [-1, 1] -> logits over
            the label set); not part of :meth:`config` (supply it again, as for GFCG).
        guidance_scale: the strongest candidate. With ``scales`` it must equal ``max(scales)``; without, it spans
            the candidates (default 7.5, CFG's).

    Diagnostics, reset at every generation: :attr:`history` (one dict per model evaluation: ``step``, ``evaluation``,
    ``noise_level``, per sample ``choice`` (candidate index) and ``scale``, and ``scores`` ``[K, B]``), and
    :attr:`chosen_scales` ``[evaluations, batch]``.
    """

    required_branches = frozenset({"cond", "uncond"})

    def __init__(
        self,
        scales: Sequence[float] | None = None,
        scorer: str | dict[str, Any] | Scorer = "classifier",
        classifier: nn.Module | None = None,
        guidance_scale: float | None = None,
    ) -> None:
        if scales is None:
            scales = evenly_spaced_scales(DEFAULT_GUIDANCE_SCALE if guidance_scale is None else guidance_scale)
        self.scales = check_scales(scales)
        if guidance_scale is not None and check_number("guidance_scale", guidance_scale, low=0.0) != self.scales[-1]:
            raise ValueError(f"guidance_scale={guidance_scale} contradicts the largest candidate scale "
                             f"{self.scales[-1]} (guidance_scale is the strongest candidate)")
        self.guidance_scale = self.scales[-1]
        self.classifier = classifier
        self.scorer = scorer
        self._score = scorer_from_spec(scorer, classifier)
        self.reset()

    def config(self) -> dict[str, Any]:
        """Constructor arguments except ``classifier`` (a module; supply it again to rebuild)."""
        out = super().config()
        out["scales"] = list(out["scales"])
        del out["classifier"]
        return out

    def reset(self) -> None:
        #: one diagnostics dict per model evaluation of the current generation (see the class docstring)
        self.history: list[dict[str, Any]] = []

    @property
    def chosen_scales(self) -> torch.Tensor:
        """Chosen scale per evaluation and sample, float64 ``[evaluations, batch]``."""
        if not self.history:
            return torch.empty((0, 0), dtype=torch.float64)
        return torch.stack([record["scale"] for record in self.history]).cpu()

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        return [Branch("cond")] if self.scales == (1.0,) else [Branch("uncond"), Branch("cond")]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        if "uncond" not in preds:
            choice = torch.zeros(cond.shape[0], dtype=torch.long)
            self._record(step, choice, torch.zeros((1, cond.shape[0]), dtype=torch.float64))
            return cond
        candidates = torch.stack([classifier_free_guidance(cond, preds["uncond"], w) for w in self.scales])
        scores = self._score(step.to_x0(candidates), step)
        choice = choose(scores, len(self.scales), cond.shape[0]).to(cond.device)
        self._record(step, choice, scores)
        return candidates[choice, torch.arange(cond.shape[0], device=cond.device)]

    def _record(self, step: Step, choice: torch.Tensor, scores: torch.Tensor) -> None:
        """One history entry, kept on the samples' device (no host synchronisation per evaluation)."""
        scales = torch.tensor(self.scales, dtype=torch.float64, device=choice.device)
        self.history.append({
            "step": step.index, "evaluation": step.evaluation, "noise_level": step.noise_level,
            "choice": choice, "scale": scales[choice], "scores": scores.detach().double(),
        })
