"""Scorers for :class:`guidance.dynamic.DynamicCFG`: small evaluators of candidate denoised estimates.

A scorer is any callable ``scorer(candidates, step) -> scores`` with ``candidates`` the candidate denoised estimates
``[K, B, ...]`` (x0 space, float32 or better; ``step.decode`` maps x0 to pixels in [-1, 1] for latent models) and
``scores`` ``[K, B]``, higher is better. Shipped:

* :class:`ClassifierScorer` (alignment): ``log p(c | decode(x0))`` of each sample's target class ``c`` under a
  classifier over the pipeline's label set (the embedded digits classifier, ``samples.digits.nets.load_classifier``);
* :class:`CLIPScorer` (alignment, text-to-image): cosine similarity of CLIP image and text embeddings of
  ``decode(x0)`` and each sample's prompt;
* :class:`WeightedScorer`: ``sum_j weight_j * scorer_j``, to mix evaluators (alignment, fidelity, preference).

Scorers run under ``torch.no_grad`` and never change the sampling otherwise.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from guidance._validate import check_number
from guidance.base import Step
from guidance.gfcg import classifier_logits

Scorer = Callable[[torch.Tensor, Step], torch.Tensor]

#: CLIP's image normalisation (OpenAI CLIP, also in transformers' ``OPENAI_CLIP_MEAN`` / ``OPENAI_CLIP_STD``)
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def flatten_candidates(candidates: torch.Tensor) -> torch.Tensor:
    """``[K, B, ...] -> [K * B, ...]`` (candidate-major: row ``k * B + b``)."""
    if candidates.ndim < 3:
        raise ValueError(f"candidates must be [K, B, ...] denoised estimates, got shape {tuple(candidates.shape)}")
    return candidates.reshape(-1, *candidates.shape[2:])


def decode_candidates(candidates: torch.Tensor, step: Step) -> torch.Tensor:
    """Pixels ``[K * B, C, H, W]`` in [-1, 1] of the candidates (``step.decode`` where the model is latent)."""
    flat = flatten_candidates(candidates)
    return flat if step.decode is None else step.decode(flat)


class ClassifierScorer:
    """``log softmax(classifier(decode(x0)))[c]`` for each sample's target label ``c`` (``Step.target_labels``).

    With ``cap`` the score is ``min(log p(c | x0), log cap)``: every candidate the classifier already assigns to the
    target with probability >= ``cap`` ties, and DynamicCFG's first-maximum rule takes the *smallest* such scale
    ("just enough guidance"). Without a cap the log-probability usually grows with the scale, so the greedy choice is
    mostly the largest candidate.

    Args:
        classifier: a ``torch.nn.Module`` mapping images in [-1, 1] to logits ``[N, L]`` over the pipeline's label
            set (class ids), in eval mode (run under ``torch.no_grad``). Use a classifier other than the one that
            judges the results, or the evaluation leaks (the embedded model ships two).
        cap: ``None`` or a target probability in (0, 1].
    """

    def __init__(self, classifier: nn.Module, cap: float | None = None) -> None:
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        self.classifier = classifier
        self.cap = None if cap is None else check_number("cap", cap, low=0.0, high=1.0, low_open=True)

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, step: Step) -> torch.Tensor:
        if step.target_labels is None:
            raise ValueError("ClassifierScorer needs the target label of every sample (a class-conditional pipeline)")
        num, batch = candidates.shape[:2]
        logits = classifier_logits(self.classifier, decode_candidates(candidates, step))
        target = step.target_labels.long().to(logits.device)
        if target.numel() and (target.min() < 0 or target.max() >= logits.shape[1]):
            raise ValueError(f"target labels must be in [0, {logits.shape[1] - 1}] (the classifier's range), got "
                             f"{target.tolist()}")
        log_probs = torch.log_softmax(logits, dim=1).reshape(num, batch, -1)
        scores = log_probs.gather(2, target[None, :, None].expand(num, batch, 1))[..., 0]
        return scores if self.cap is None else scores.clamp(max=math.log(self.cap))


class WeightedScorer:
    """``sum_j weight_j * scorer_j(candidates, step)``.

    Args:
        terms: pairs ``(weight, scorer)``; weights are finite reals (negative ones penalise).
    """

    def __init__(self, terms: Sequence[tuple[float, Scorer]]) -> None:
        terms = list(terms)
        if not terms:
            raise ValueError("WeightedScorer needs at least one (weight, scorer) term")
        checked = []
        for j, term in enumerate(terms):
            if not isinstance(term, (tuple, list)) or len(term) != 2 or not callable(term[1]):
                raise ValueError(f"terms[{j}] must be a pair (weight, scorer callable), got {term!r}")
            checked.append((check_number(f"terms[{j}] weight", term[0]), term[1]))
        self.terms = checked

    def __call__(self, candidates: torch.Tensor, step: Step) -> torch.Tensor:
        total = None
        for weight, scorer in self.terms:
            scores = weight * scorer(candidates, step).to(torch.float64)
            total = scores if total is None else total + scores
        return total


class CLIPScorer:
    """Cosine similarity of CLIP embeddings of ``decode(x0)`` and of each sample's prompt (text-image alignment).

    Args:
        model: a ``transformers.CLIPModel`` (``get_image_features`` / ``get_text_features``), in eval mode.
        tokenizer: its tokenizer (``CLIPTokenizer``).
        prompts: one prompt per sample of the pipeline's batch (``Step.batch_size``), or a single prompt for all.
            Encoded once, on first use.

    Images are mapped from [-1, 1] to [0, 1], resized (bicubic, antialiased) to the vision tower's ``image_size``
    when they differ from it, and normalised with CLIP's mean and std.
    """

    def __init__(self, model: nn.Module, tokenizer: Callable, prompts: str | Sequence[str]) -> None:
        if not hasattr(model, "get_image_features") or not hasattr(model, "get_text_features"):
            raise TypeError(f"model must be a CLIP model with get_image_features/get_text_features, got "
                            f"{type(model).__name__}")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        if not prompts or not all(isinstance(p, str) for p in prompts):
            raise ValueError(f"prompts must be a prompt or a non-empty list of prompts, got {prompts!r}")
        self.model, self.tokenizer, self.prompts = model, tokenizer, prompts
        self._text: torch.Tensor | None = None

    def _parameter(self) -> torch.Tensor:
        return next(self.model.parameters())

    def text_features(self) -> torch.Tensor:
        """Unit-norm text embeddings ``[P, D]`` of the prompts (computed once)."""
        if self._text is None:
            tokens = self.tokenizer(self.prompts, padding=True, truncation=True, return_tensors="pt")
            tokens = {key: value.to(self._parameter().device) for key, value in tokens.items()}
            self._text = _unit(_features(self.model.get_text_features(**tokens)))
        return self._text

    def image_features(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm image embeddings ``[N, D]`` of images ``[N, 3, H, W]`` in [-1, 1]."""
        size = self.model.config.vision_config.image_size
        pixels = (images.float() + 1) / 2
        if pixels.shape[-2:] != (size, size):
            pixels = nn.functional.interpolate(pixels, size=(size, size), mode="bicubic", antialias=True)
        mean = pixels.new_tensor(CLIP_MEAN).reshape(1, 3, 1, 1)
        std = pixels.new_tensor(CLIP_STD).reshape(1, 3, 1, 1)
        parameter = self._parameter()
        pixels = ((pixels - mean) / std).to(device=parameter.device, dtype=parameter.dtype)
        return _unit(_features(self.model.get_image_features(pixel_values=pixels)))

    @torch.no_grad()
    def __call__(self, candidates: torch.Tensor, step: Step) -> torch.Tensor:
        num, batch = candidates.shape[:2]
        text = self.text_features()
        if len(self.prompts) not in (1, step.batch_size):
            raise ValueError(f"CLIPScorer has {len(self.prompts)} prompts for a batch of {step.batch_size} samples; "
                             "give one prompt per sample or a single prompt")
        per_sample = text[0].expand(batch, -1) if len(self.prompts) == 1 else text
        image = self.image_features(decode_candidates(candidates, step)).reshape(num, batch, -1)
        return (image * per_sample[None]).sum(-1).float()


def _features(output: object) -> torch.Tensor:
    """The projected embedding from ``get_*_features`` (a tensor, or transformers 5's output's ``pooler_output``)."""
    return output if isinstance(output, torch.Tensor) else output.pooler_output


def _unit(features: torch.Tensor) -> torch.Tensor:
    features = features.float()
    return features / features.norm(dim=-1, keepdim=True).clamp_min(torch.finfo(features.dtype).tiny)


def _classifier_scorer(classifier: nn.Module | None, **options: Any) -> Scorer:
    if classifier is None:
        raise ValueError(
            "scorer='classifier' needs classifier=: a torch.nn.Module mapping images in [-1, 1] to logits over the "
            "label set (e.g. samples.digits.nets.load_classifier())"
        )
    return ClassifierScorer(classifier, **options)


#: named scorers (for configs and the command line): ``name -> factory(classifier, **options) -> scorer``; a config
#: names one as ``"classifier"`` or ``{"name": "classifier", "cap": 0.9}``
SCORERS: dict[str, Callable[..., Scorer]] = {"classifier": _classifier_scorer}


def scorer_from_spec(spec: object, classifier: nn.Module | None) -> Scorer:
    """A scorer from a callable, a name in :data:`SCORERS`, or ``{"name": ..., **options}``."""
    if isinstance(spec, dict) and isinstance(spec.get("name"), str) and spec["name"] in SCORERS:
        options = {key: value for key, value in spec.items() if key != "name"}
        try:
            return SCORERS[spec["name"]](classifier, **options)
        except TypeError as error:
            raise ValueError(f"scorer {spec!r}: {error}") from None
    if isinstance(spec, str) and spec in SCORERS:
        return SCORERS[spec](classifier)
    if callable(spec) and not isinstance(spec, str):
        return spec
    raise ValueError(f"scorer must be a callable (candidates [K, B, ...], step) -> scores [K, B], one of "
                     f"{', '.join(map(repr, SCORERS))} or a dict {{'name': ..., **options}}; got {spec!r}")
