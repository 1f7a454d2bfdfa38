"""Gradient-free classifier guidance (GFCG; Shenoy et al., arXiv 2411.15393, WACV 2026).

An off-the-shelf classifier, run in inference mode only (never differentiated), reads the conditional branch's
denoised estimate at every model evaluation, picks a reference class per sample and a confusion-adaptive scale, and
the prediction is pushed away from the model's prediction *for that reference class* (``../shared/methods/gfcg.md``
§2-3). With the target label ``c`` of each sample:

    p     = softmax(classifier(decode(x0)))                  float32 or better, under torch.no_grad
    c_ref = argmax_{k != c} p_k                              reference="exclude_target" (most-confusable rival)
          | argmax_k p_k   (w = 0 when it is c)              reference="include_target"
    w_t   = clip(lambda * f(p, c, c_ref), 0, w_max)          inside sigma_window, else 0;  lambda = confusion_scale
    out   = out_c + w_t * (out_c - out_ref)                                          (2 NFE per step)
    out   = out_u + omega * (out_c - out_u) + w_t * (out_c - out_ref)                with CFG (3 NFE per step)

with the scale rules ``f`` (:data:`SCALE_RULES`): ``"ratio"`` p_ref / p_c, ``"one_minus_p"`` 1 - p_c and
``"indicator"`` 1[argmax_k p_k != c]. Both forms are affine in the branch outputs at a fixed model input, so they are
applied to the model's outputs directly and give the same step in epsilon, v, x0 or flow space (spaces.md §5).

**With Autoguidance** (``autoguidance=AutoGuidance(w, model=D_0)``, Karras et al. 2024; the paper's headline
setting), the reference prediction comes from the *guiding* model D_0, the main model being D_1 (gfcg.md §3: the
reading that makes the combination cost "no additional computational overhead"):

    out = D_0(l) + (w + w_t) (D_1(c) - D_0(l)),   l = c_ref where w_t > 0, else c     autoguidance_form="shared_reference"
        = D_1(c) + (w - 1 + w_t) (D_1(c) - D_0(l))                                     (2 NFE per step: one per network)

so a sample the classifier finds unconfused (w_t = 0: outside ``sigma_window``, or ``c_ref == c`` with
``reference="include_target"``, the default in this form) is guided by plain Autoguidance at w, exactly, and a
confused one (the classifier's top class is not its target) is pushed, harder, away from the guiding model's
prediction for that class. With ``reference="exclude_target"`` and a soft scale rule almost every sample has
w_t > 0, so the whole Autoguidance term becomes a contrast against another class (a class push as strong as CFG's
at w: FD-digits 47 instead of 14 on the embedded pair at w = 2, ``benchmarks/autoguidance.py``). The alternative
reading of §3 is an option:

    out = D_0(c) + w (D_1(c) - D_0(c)) + w_t (D_1(c) - D_0(c_ref))                    autoguidance_form="additive"
                                                                                       (3 NFE per step where w_t > 0)

**Reconstruction.** The abstract verifies the mechanism (a gradient-free classifier picks a time-adaptive reference
class and scale; the reference is a *conditional* prediction); the paper's exact scale function, reference rule,
clip and noise interval could not be checked. The three scale rules, both reference rules, ``w_max``,
``sigma_window``, which estimate the classifier reads (``classifier_input``) and ``recompute_at_second_stage`` are
therefore all options; the defaults were chosen by measurement on the embedded digits model's weak checkpoint
(``benchmarks/gfcg.py``, scored by a separate evaluation network), not taken from the paper:

- ``scale_rule="one_minus_p"``, ``confusion_scale=2``: the same class accuracy as ``"ratio"`` at lambda 2 at a lower
  FD; ``"indicator"`` gained less accuracy. With ``cfg_scale`` a smaller lambda (0.5-1) keeps FD closer to CFG's.
- ``classifier_input="cond"``: reading the previous step's *guided* estimate saves the second forward but, with CFG
  at omega >= 2, reads an estimate that already carries CFG's push and raised FD by 17-36% over ``"cond"``; on a CPU
  it was not faster either (the saving is per-call latency).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from guidance._validate import check_bool, check_choice, check_number, renamed_arguments
from guidance.autoguidance import GUIDING, AutoGuidance, autoguidance_combine, guiding_branch
from guidance.base import Branch, Guidance, Network, Predictions, Step
from guidance.cfg import classifier_free_guidance
from guidance.registry import register, resolve_guidance
from guidance.spaces import compute_dtype, reduction_dtype

REFERENCE_RULES = ("exclude_target", "include_target")
CLASSIFIER_INPUTS = ("cond", "previous")
AUTOGUIDANCE_FORMS = ("shared_reference", "additive")


def _ratio(probs: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``p_ref / p_c``: push harder when a rival class dominates (unbounded; clipped by ``w_max``)."""
    p_target = probs.gather(1, target[:, None])[:, 0]
    p_reference = probs.gather(1, reference[:, None])[:, 0]
    return p_reference / p_target.clamp_min(torch.finfo(probs.dtype).tiny)


def _one_minus_p(probs: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``1 - p_c``: the probability mass the classifier puts outside the target."""
    return 1 - probs.gather(1, target[:, None])[:, 0]


def _indicator(probs: torch.Tensor, target: torch.Tensor, reference: torch.Tensor) -> torch.Tensor:
    """``1[argmax_k p_k != c]``: guide only samples the classifier currently assigns to another class."""
    return (probs.argmax(dim=1) != target).to(probs.dtype)


#: confusion signals ``f(probs [B, K], target [B], reference [B]) -> [B]``, before ``lambda`` and the clip; add a
#: function under a new name to plug in another rule (``GFCG(scale_rule=name)``, and its config, then accept it)
SCALE_RULES: dict[str, Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]] = {
    "ratio": _ratio,
    "one_minus_p": _one_minus_p,
    "indicator": _indicator,
}


def choose_reference(probs: torch.Tensor, target: torch.Tensor, rule: str = "exclude_target") -> torch.Tensor:
    """Reference label per sample: the most probable class other than ``target`` (``"exclude_target"``) or the most
    probable class overall (``"include_target"``; it may be the target itself, which :func:`gfcg_scale` turns off)."""
    check_choice("reference", rule, REFERENCE_RULES)
    if rule == "include_target":
        return probs.argmax(dim=1)
    masked = probs.scatter(1, target[:, None], float("-inf"))
    return masked.argmax(dim=1)


def gfcg_scale(
    probs: torch.Tensor,
    target: torch.Tensor,
    reference: torch.Tensor,
    rule: str,
    confusion_scale: float,
    w_max: float,
) -> torch.Tensor:
    """``w_t = clip(lambda * f(p, c, c_ref), 0, w_max)`` per sample (lambda: ``confusion_scale``), and exactly 0 where
    ``c_ref == c``."""
    check_choice("scale_rule", rule, tuple(SCALE_RULES))
    signal = SCALE_RULES[rule](probs, target, reference)
    scale = (confusion_scale * signal).clamp(0.0, w_max)
    return torch.where(reference == target, torch.zeros_like(scale), scale)


def gfcg_combine(
    out_c: torch.Tensor,
    out_ref: torch.Tensor,
    scale: torch.Tensor,
    out_u: torch.Tensor | None = None,
    cfg_scale: float = 1.0,
    base: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out_c + w (out_c - out_ref)``, or with the unconditional branch ``out_u + omega (out_c - out_u) + w (...)``,
    or ``base + w (...)`` for another guided ``base`` (Autoguidance's, in the additive form).

    ``scale`` holds one ``w`` per sample; the arithmetic runs in float32 or better. Rows with ``w = 0`` return the
    unguided prediction (``out_c``, CFG's or ``base``) exactly.
    """
    dtype = compute_dtype(out_c.dtype)
    cond, ref = out_c.to(dtype), out_ref.to(dtype)
    if base is None:
        base = cond if out_u is None else classifier_free_guidance(cond, out_u.to(dtype), cfg_scale)
    base = base.to(dtype)
    weight = scale.to(device=cond.device, dtype=dtype).reshape(-1, *([1] * (cond.ndim - 1)))
    return base + weight * (cond - ref)


@torch.no_grad()
def classifier_logits(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """``classifier(images)`` without autograd, checked to be finite logits ``[B, K]``, in float32 or better."""
    parameter = next(classifier.parameters(), None)
    if parameter is not None:
        images = images.to(device=parameter.device, dtype=parameter.dtype)
    logits = classifier(images)
    if not isinstance(logits, torch.Tensor) or logits.ndim != 2 or logits.shape[0] != images.shape[0]:
        shape = tuple(logits.shape) if isinstance(logits, torch.Tensor) else type(logits).__name__
        raise ValueError(f"classifier must map {images.shape[0]} images to logits [B, K]; got {shape}")
    if not torch.isfinite(logits).all():
        raise ValueError(
            "classifier returned non-finite logits (NaN or inf): its input, the decoded denoised estimate, or the "
            "classifier itself overflowed; run the classifier in float32 (the pipelines decode in float32)"
        )
    return logits.detach().to(compute_dtype(logits.dtype))


def classify(classifier: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Class probabilities ``[B, K]``: softmax of ``classifier(images)`` in float32 or better, without autograd."""
    return torch.softmax(classifier_logits(classifier, images), dim=1)


@register("gfcg")
class GFCG(Guidance):
    """Gradient-free classifier guidance (see the module docstring for the formula; reconstruction, see there).

    Args:
        classifier: any ``torch.nn.Module`` mapping images ``[B, C, H, W]`` in [-1, 1] (the pipeline's decoded
            denoised estimate, float32 cast to the classifier's dtype) to logits ``[B, K]`` over the pipeline's label
            set: the class ids of a class-conditional pipeline, or ``label_prompts=`` of a text-to-image pipeline.
            Pass it in eval mode; it is only ever run under ``torch.no_grad``. Required. It is not part of
            :meth:`config` (a module is not serialisable): rebuild with ``from_config({**config, "classifier": net})``
            or ``get_guidance("gfcg", classifier=net, ...)``.
        confusion_scale: lambda >= 0, the factor of the confusion signal (0 turns GFCG off: 1 NFE per step); GFCG's
            strength, which ``--scale`` of the command lines and the wrappers (``ScaleSchedule``) set. Its own name:
            ``guidance_scale`` is CFG's w everywhere (here ``cfg_scale``, or the Autoguidance's); the old
            ``guidance_scale=`` keyword is accepted as a deprecated alias.
        scale_rule: ``"ratio"``, ``"one_minus_p"``, ``"indicator"`` or a rule added to :data:`SCALE_RULES`
            [reconstruction].
        reference: ``"exclude_target"`` (the most probable other class) or ``"include_target"`` (the most probable
            class; samples whose reference is their target get ``w = 0`` and no reference NFE) [reconstruction].
            ``None`` (default): ``"include_target"`` in the ``"shared_reference"`` Autoguidance form (module
            docstring), else ``"exclude_target"``.
        w_max: upper clip of ``w_t`` (> 0) [reconstruction].
        sigma_window: ``(low, high)`` noise levels (``Step.noise_level``: ``sigma / alpha`` for VP/VE models, the
            flow sigma for flow models) between which GFCG acts; ``None`` = every step. Outside it neither the
            classifier nor the reference branch runs [reconstruction].
        cfg_scale: ``None`` for GFCG alone; omega >= 0 adds classifier-free guidance (diffusers' convention,
            1 = none) and its unconditional branch.
        classifier_input: which denoised estimate the classifier reads [reconstruction, spec §8.2]:
            ``"cond"``: this evaluation's conditional estimate (two batched forwards per evaluation: cond (+uncond),
            then the reference rows); ``"previous"``: the previous evaluation's *guided* estimate (cond, uncond and
            reference in one forward; no guidance at the first evaluation).
        recompute_at_second_stage: on second-order schedulers (Heun) pick the reference and scale again at the
            second evaluation of a step (``True``) or reuse the first stage's (``False``).
        autoguidance: ``None``, or an :class:`~guidance.autoguidance.AutoGuidance` (or its config with ``model``)
            whose guiding model evaluates the reference (module docstring); not with ``cfg_scale``.
        autoguidance_form: ``"shared_reference"`` (the guiding model's branch is the reference: 2 NFE per step) or
            ``"additive"`` (Autoguidance plus a GFCG contrast against the guiding model at ``c_ref``) [reconstruction].

    Diagnostics: :attr:`history` (reset at every generation) holds one dict per model evaluation with ``step``,
    ``evaluation``, ``noise_level`` and, per sample, ``reference`` (long; -1 where the classifier did not run),
    ``scale`` (``w_t``) and ``target_prob`` (``p_c``; NaN where it did not run), as tensors on the samples' device
    (recording them reads nothing back to the host).

    Host reads per evaluation where the classifier runs (``tests/test_host_sync.py`` counts them): the loop reads
    which rows need the reference branch (the per-sample decision, as Adaptive Guidance's switch) and checks the
    reference labels' range, and :func:`classifier_logits` checks the logits are finite.

    Cost per evaluation: 1 conditional NFE, 1 reference NFE for every sample with ``w_t > 0`` (so 2 per step, 3 with
    CFG; with Autoguidance 2, one of each network), 1 classifier forward and 1 ``decode`` (a VAE decode for latent
    models).
    """

    scale_argument = "confusion_scale"
    scale_low = 0.0
    renamed = {"guidance_scale": "confusion_scale"}

    def __init__(
        self,
        classifier: nn.Module | None = None,
        confusion_scale: float = 2.0,
        scale_rule: str = "one_minus_p",
        reference: str | None = None,
        w_max: float = 4.0,
        sigma_window: Sequence[float] | None = None,
        cfg_scale: float | None = None,
        classifier_input: str = "cond",
        recompute_at_second_stage: bool = True,
        autoguidance: AutoGuidance | dict[str, Any] | None = None,
        autoguidance_form: str = "shared_reference",
        **deprecated: Any,
    ) -> None:
        values, names = renamed_arguments(GFCG, deprecated, GFCG.renamed, confusion_scale=confusion_scale)
        if classifier is None:
            raise ValueError(
                "GFCG needs classifier=: a torch.nn.Module mapping images in [-1, 1] to logits over the label set "
                "(e.g. get_guidance('gfcg', classifier=net) or from_config({**config, 'classifier': net}))"
            )
        if not isinstance(classifier, nn.Module):
            raise TypeError(f"classifier must be a torch.nn.Module, got {type(classifier).__name__}")
        self.classifier = classifier
        self.confusion_scale = check_number(names["confusion_scale"], values["confusion_scale"], low=0.0)
        self.scale_rule = check_choice("scale_rule", scale_rule, tuple(SCALE_RULES))
        self.w_max = check_number("w_max", w_max, low=0.0, low_open=True)
        self.sigma_window = self._check_window(sigma_window)
        self.cfg_scale = None if cfg_scale is None else check_number("cfg_scale", cfg_scale, low=0.0)
        self.classifier_input = check_choice("classifier_input", classifier_input, CLASSIFIER_INPUTS)
        self.recompute_at_second_stage = check_bool("recompute_at_second_stage", recompute_at_second_stage)
        self.autoguidance = self._check_autoguidance(autoguidance)
        self.autoguidance_form = check_choice("autoguidance_form", autoguidance_form, AUTOGUIDANCE_FORMS)
        if reference is None:
            shared = self.autoguidance is not None and self.autoguidance_form == "shared_reference"
            reference = "include_target" if shared else "exclude_target"
        self.reference = check_choice("reference", reference, REFERENCE_RULES)
        uses_cfg = self.cfg_scale is not None and self.cfg_scale != 1.0
        self.required_branches = frozenset({"cond", "ref"} | ({"uncond"} if uses_cfg else set()))
        self.reset()

    @staticmethod
    def _check_window(window: Sequence[float] | None) -> tuple[float, float] | None:
        if window is None:
            return None
        if isinstance(window, (str, bytes)) or not isinstance(window, Sequence) or len(window) != 2:
            raise ValueError(f"sigma_window must be None or a pair (low, high) of noise levels, got {window!r}")
        low = check_number("sigma_window[0]", window[0], low=0.0)
        high = check_number("sigma_window[1]", window[1], low=low)
        return (low, high)

    def _check_autoguidance(self, autoguidance: Any) -> AutoGuidance | None:
        if autoguidance is None:
            return None
        rule = resolve_guidance(autoguidance)
        if not isinstance(rule, AutoGuidance):
            raise ValueError(f"autoguidance must be an AutoGuidance rule (or its config), got {rule!r}")
        if self.cfg_scale is not None:
            raise ValueError("GFCG combines with CFG (cfg_scale=) or with Autoguidance (autoguidance=), not both")
        return rule

    @property
    def networks(self) -> dict[str, Network]:
        return {} if self.autoguidance is None else dict(self.autoguidance.networks)

    def reset(self) -> None:
        #: one diagnostics dict per model evaluation of the current generation (see the class docstring)
        self.history: list[dict[str, Any]] = []
        self._checked = False
        self._selection: tuple[torch.Tensor, torch.Tensor] | None = None  # (reference, scale) of this evaluation
        self._ref_branch: Branch | None = None
        self._guiding_branch: Branch | None = None  # with Autoguidance: the guiding model at the samples' own labels
        self._stage: tuple[torch.Tensor, torch.Tensor] | None = None  # first-stage selection, whole batch
        self._previous_x0: torch.Tensor | None = None  # guided x0 of the previous evaluation, whole batch

    def config(self) -> dict[str, Any]:
        """Constructor arguments except ``classifier`` (a module; supply it again to rebuild)."""
        out = super().config()
        del out["classifier"]
        return out

    # -- the hooks -------------------------------------------------------------------------------------------------

    def _fixed_branches(self) -> list[Branch]:
        uses_cfg = "uncond" in self.required_branches
        return [Branch("uncond"), Branch("cond")] if uses_cfg else [Branch("cond")]

    def branches(self, preds: Predictions, step: Step) -> list[Branch]:
        fixed = self._fixed_branches()
        if "ref" not in preds:
            if "cond" not in preds and self._reads_cond(step):
                return fixed  # phase 1: the classifier needs this evaluation's conditional estimate first
            self._select(step, preds.get("cond"))
        extra = [] if self._guiding_branch is None else [self._guiding_branch]
        return fixed + [self._ref_branch, *extra]

    def combine(self, preds: Predictions, step: Step) -> torch.Tensor:
        cond = preds["cond"]
        _, scale = self._selection
        reference_out = preds["ref"]  # the loop fills the rows without a reference (w_t = 0) with ``cond``
        if self.autoguidance is not None:
            guided = self._combine_autoguidance(cond, reference_out, scale, preds)
        else:
            cfg_scale = 1.0 if self.cfg_scale is None else self.cfg_scale
            guided = gfcg_combine(cond, reference_out, scale, preds.get("uncond"), cfg_scale)
        if self.classifier_input == "previous":
            self._previous_x0 = step.to_x0(guided).detach()
        return guided.to(cond.dtype)

    def _combine_autoguidance(
        self, cond: torch.Tensor, reference_out: torch.Tensor, scale: torch.Tensor, preds: Predictions
    ) -> torch.Tensor:
        """The two Autoguidance forms of the module docstring (without a guiding prediction: ``cond``)."""
        w = self.autoguidance.guidance_scale
        guiding = preds.get(GUIDING, cond)
        if self.autoguidance_form == "additive":
            return gfcg_combine(cond, reference_out, scale, base=autoguidance_combine(cond, guiding, w))
        has_reference = (scale > 0).to(cond.device).reshape(-1, *([1] * (cond.ndim - 1)))
        bad = torch.where(has_reference, reference_out, guiding)
        total = w + scale.to(reduction_dtype(scale))  # float64 (float32 on MPS): exactly w where w_t = 0
        return autoguidance_combine(cond, bad, total)

    # -- choosing the reference ------------------------------------------------------------------------------------

    def _in_window(self, step: Step) -> bool:
        if self.confusion_scale == 0:
            return False
        if self.sigma_window is None:
            return True
        low, high = self.sigma_window
        return low <= step.noise_level <= high

    def _reuses_stage(self, step: Step) -> bool:
        return not step.first_stage and not self.recompute_at_second_stage and self._stage is not None

    def _reads_cond(self, step: Step) -> bool:
        return self.classifier_input == "cond" and self._in_window(step) and not self._reuses_stage(step)

    def _estimate(self, step: Step, cond: torch.Tensor | None) -> torch.Tensor | None:
        """The denoised estimate the classifier reads (``None``: nothing to read yet)."""
        if self.classifier_input == "cond":
            return step.to_x0(cond)
        return self._previous_x0

    def _select(self, step: Step, cond: torch.Tensor | None) -> None:
        """Pick reference labels and scales per sample; record them in :attr:`history`."""
        count, device = step.sample.shape[0], step.sample.device
        reference = torch.full((count,), -1, dtype=torch.long, device=device)
        scale = torch.zeros(count, dtype=torch.float32, device=device)
        target_prob = torch.full((count,), float("nan"), dtype=torch.float32, device=device)
        if self._reuses_stage(step):
            reference, scale = self._stage
        elif self._in_window(step):
            x0 = self._estimate(step, cond)
            if x0 is not None:
                reference, scale, target_prob = self._score(step, x0)
        if step.first_stage:
            self._stage = (reference, scale)
        self._selection = (reference, scale)
        network = None if self.autoguidance is None else GUIDING
        self._ref_branch = Branch("ref", mask=scale > 0, labels=reference, network=network)
        self._guiding_branch = self._guiding_rows(scale)
        self.history.append({
            "step": step.index, "evaluation": step.evaluation, "noise_level": step.noise_level,
            "reference": reference, "scale": scale, "target_prob": target_prob,
        })

    def _guiding_rows(self, scale: torch.Tensor) -> Branch | None:
        """With Autoguidance: the rows that need the guiding model at their own label (every row in the additive
        form, the rows without a reference in the shared one; none at w = 1, where that term vanishes)."""
        if self.autoguidance is None or self.autoguidance.guidance_scale == 1.0:
            return None
        if self.autoguidance_form == "additive":
            return guiding_branch()
        return guiding_branch(scale <= 0)

    def _score(self, step: Step, x0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Classifier pass on ``decode(x0)``: reference labels, scales ``w_t`` and target probabilities."""
        device = step.sample.device
        target = self._targets(step).to(device)
        probs = classify(self.classifier, x0 if step.decode is None else step.decode(x0))
        self._check(step, probs, target)
        probs = probs.to(device)
        reference = choose_reference(probs, target, self.reference)
        scale = gfcg_scale(probs, target, reference, self.scale_rule, self.confusion_scale, self.w_max)
        return reference, scale.float(), probs.gather(1, target[:, None])[:, 0].float()

    @staticmethod
    def _targets(step: Step) -> torch.Tensor:
        if step.target_labels is None:
            raise ValueError(
                "GFCG needs the target label of every sample: a class-conditional pipeline gives its class ids, a "
                "text-to-image pipeline needs label_prompts= and target_labels="
            )
        return step.target_labels.long()

    def _check(self, step: Step, probs: torch.Tensor, target: torch.Tensor) -> None:
        """Once per generation: the classifier's labels are the pipeline's label set, and the targets lie in it."""
        if self._checked:
            return
        num_logits = probs.shape[1]
        if step.num_labels == 0:
            raise ValueError("GFCG needs a label set ('ref' branch); this pipeline has none")
        if num_logits != step.num_labels:
            raise ValueError(
                f"classifier returns {num_logits} logits but the pipeline's label set has {step.num_labels} labels; "
                "the classifier must score exactly the labels of the label set (class ids or label_prompts)"
            )
        if target.numel() and (target.min() < 0 or target.max() >= num_logits):
            raise ValueError(f"target labels must be in [0, {num_logits - 1}] (the classifier's range), got "
                             f"{target.tolist()}")
        self._checked = True
