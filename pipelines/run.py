"""One guided generation: the state both integrations share (our loop :func:`pipelines.loop.denoise` and
:func:`pipelines.attach.attach` on a diffusers pipeline's own loop).

A :class:`GuidedRun` makes the :class:`~guidance.base.Step` record of every model evaluation, asks the guidance for
its branches (possibly in two phases), evaluates each phase in one batched forward, counts every row per sample,
combines, and around every ``scheduler.step`` keeps the sample the step began from and applies ``after_step`` once
the step is complete. ``prepare_noise`` gets a :class:`~guidance.base.NoiseContext` whose evaluations are counted too.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.base import Branch, Guidance, Network, Step
from pipelines.conditioning import BranchConditioning
from pipelines.schedulers import SchedulerAdapter

ModelFn = Callable[..., torch.Tensor]
#: ``network_fn(network) -> model_fn``: how an integration calls another denoiser (:class:`~guidance.base.Network`)
#: with its own denoiser's call convention; it refuses, with a ``ValueError``, a module that cannot take that call
NetworkFn = Callable[[Network], ModelFn]
Generator = torch.Generator | list[torch.Generator] | None
Predictions = dict[str, torch.Tensor]
#: the name the report gives the pipeline's own denoiser (``nfe_per_network``); no rule's network may take it
MAIN_NETWORK = "main"


@dataclass
class RunReport:
    """What a generation's guidance cost: network evaluations per sample (rows of every network), batched forwards,
    a per-evaluation trace of the branches evaluated (``step`` -1 marks evaluations before the loop, e.g. NLG's) and
    the rows of each network per sample (``"main"``: the pipeline's own denoiser; Autoguidance adds ``"guiding"``)."""

    nfe_per_sample: list[int]
    model_calls: int
    trace: list[dict[str, Any]] = field(default_factory=list)
    rows_per_network: dict[str, list[int]] = field(default_factory=dict)

    @property
    def nfe_per_network(self) -> dict[str, int | float]:
        """Network evaluations per image of each network (they add up to :attr:`nfe`)."""
        return {name: _per_image(counts) for name, counts in self.rows_per_network.items()}

    @property
    def nfe(self) -> int | float:
        """Network evaluations per image (an int when every sample had the same count, else their mean)."""
        return _per_image(self.nfe_per_sample)


def _per_image(counts: Sequence[int]) -> int | float:
    if not counts:
        return 0
    return counts[0] if len(set(counts)) == 1 else sum(counts) / len(counts)


def derive_generator(generator: Generator, salt: int) -> Generator:
    """A generator (or list) seeded from ``generator``'s current state and ``salt``, leaving ``generator`` untouched.

    Guidance randomness (NLG's noise) thus follows the pipeline's seed, per sample for a list of generators, without
    shifting the noise the scheduler draws later.
    """
    if generator is None:
        return None
    if isinstance(generator, list):
        return [derive_generator(g, salt) for g in generator]  # type: ignore[misc]
    probe = torch.Generator(device=generator.device)
    probe.set_state(generator.get_state())
    base = int(torch.randint(0, 2**62, (1,), generator=probe))
    return torch.Generator(device=generator.device).manual_seed((base + 0x9E3779B97F4A7C15 * (salt + 1)) % 2**62)


def check_steps(num_inference_steps: object) -> int:
    """``num_inference_steps`` must be a positive int."""
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
        raise ValueError(f"num_inference_steps must be an int >= 1, got {num_inference_steps!r}")
    return num_inference_steps


def check_branches(guidance: Guidance, conditioning: BranchConditioning) -> None:
    """Refuse, before any work, a guidance that needs a branch the pipeline cannot provide."""
    missing = sorted(name for name in guidance.required_branches if not conditioning.has_branch(name))
    if missing:
        raise ValueError(
            f"guidance {guidance!r} needs the branch(es) {missing}, which this pipeline cannot provide "
            "(e.g. 'uncond' needs a null/negative condition; 'ref' needs a label set: the class ids of a "
            "class-conditional pipeline, or label_prompts= with target_labels= for a text-to-image pipeline)"
        )


class GuidedRun:
    """The state of one guided generation (see the module docstring).

    Args:
        guidance: the rule; :meth:`Guidance.reset` is called here.
        scheduler: the diffusers scheduler the generation steps with.
        num_steps: sampling steps (``Step.num_steps``).
        decode: denoised estimate -> pixels in [-1, 1], for rules that read images (GFCG).
        generator: the pipeline's generator(s); guidance randomness is derived from it without consuming it.
        check_finite: check every network output for NaN / inf (:class:`FiniteCheck`); ``False`` skips the check.
        network_fn: how to call the rule's other denoisers (:attr:`Guidance.networks`, e.g. Autoguidance's guiding
            model) with this integration's call convention; each is built and checked here, before any work.
    """

    def __init__(
        self,
        guidance: Guidance,
        scheduler: Any,
        num_steps: int,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
        generator: Generator = None,
        check_finite: bool = True,
        network_fn: NetworkFn | None = None,
    ) -> None:
        self.guidance = guidance
        self.scheduler = scheduler
        self.adapter = SchedulerAdapter(scheduler, len(scheduler.timesteps))
        self.num_steps = num_steps
        self.decode = decode
        self.generator = generator
        self.init_noise_sigma = float(getattr(scheduler, "init_noise_sigma", 1.0))
        self.network_fns = network_functions(guidance, network_fn, self.adapter.prediction_type)
        self.counts: torch.Tensor | None = None  # rows per sample, every network
        self.network_counts: dict[str, torch.Tensor] = {}  # rows per sample, per network
        self._main_shape: torch.Size | None = None  # per-row shape of the pipeline's own denoiser's output
        self.calls = 0
        self.trace: list[dict[str, Any]] = []
        self.completed = 0
        self.evaluations = 0
        self._index = 0  # schedule index of the latest evaluation
        self._first_stage = True
        self._start_record: Step | None = None  # record of the evaluation that began the current step
        self._step_start: torch.Tensor | None = None
        self.finite = FiniteCheck() if check_finite else None
        guidance.reset()

    # -- records and evaluations ---------------------------------------------------------------------------------
    def record(
        self, index: int, timestep: torch.Tensor, sample: torch.Tensor, conditioning: BranchConditioning
    ) -> Step:
        """The record of the next model evaluation, at schedule index ``index`` with model input ``sample``."""
        self._index, self._first_stage = index, self.adapter.is_first_stage()
        return self._record(index, timestep, sample, conditioning, self.evaluations, self._first_stage)

    def _record(
        self, index: int, timestep: torch.Tensor, sample: torch.Tensor, conditioning: BranchConditioning,
        evaluation: int, first_stage: bool,
    ) -> Step:
        alpha, sigma = self.adapter.alpha_sigma(index, timestep)
        return Step(
            index=self.completed, num_steps=self.num_steps, evaluation=evaluation, first_stage=first_stage,
            timestep=timestep, alpha=alpha, sigma=sigma, sample=sample, prediction_type=self.adapter.prediction_type,
            target_labels=conditioning.target_labels, decode=self.decode,
            num_labels=conditioning.num_labels, scheduler=self.scheduler,
        )

    def forward(
        self,
        step: Step,
        branches: Sequence[Branch],
        model_fn: ModelFn,
        conditioning: BranchConditioning,
        model_input: torch.Tensor,
        trace: dict[str, int],
        done: Predictions | None = None,
    ) -> Predictions:
        """Evaluate ``branches`` at ``step``: one batched call of ``model_fn`` for the branches of the pipeline's own
        denoiser, then one per other network (:attr:`Branch.network`); count every row.

        Only the rows in a branch's :attr:`~Branch.mask` are computed; each prediction is returned for the whole
        batch, with the ``cond`` prediction (from this call or ``done``, the predictions made earlier in this
        evaluation) in the rows outside the mask. ``model_input`` holds the network input of each sample
        (``step.sample``, plus any channels the network is conditioned on, e.g. an inpainting mask).
        """
        groups: dict[str | None, list[Branch]] = {}
        for branch in branches:
            groups.setdefault(branch.network, []).append(branch)
        preds: Predictions = {}
        for network in sorted(groups, key=lambda name: name is not None):  # the pipeline's own denoiser first
            if network is not None and network not in self.network_fns:
                raise ValueError(f"{self.guidance!r} requested a branch of network {network!r}, which it does not "
                                 f"declare (its networks: {sorted(self.network_fns)})")
            fn = model_fn if network is None else self.network_fns[network]
            preds.update(self._forward(step, groups[network], fn, conditioning, model_input, trace, network))
        filler = preds.get("cond", (done or {}).get("cond"))
        return {name: self._fill(step, branch, preds[name], filler) for branch in branches for name in [branch.name]}

    def _fill(self, step: Step, branch: Branch, part: torch.Tensor, filler: torch.Tensor | None) -> torch.Tensor:
        """The prediction of the rows in ``branch.mask`` placed in a whole-batch tensor (``filler``'s other rows)."""
        if branch.mask is None:
            return part
        full = torch.zeros_like(step.sample, dtype=part.dtype) if filler is None else filler.clone()
        full[branch.mask.to(full.device)] = part
        return full

    def _forward(
        self,
        step: Step,
        branches: Sequence[Branch],
        model_fn: ModelFn,
        conditioning: BranchConditioning,
        model_input: torch.Tensor,
        trace: dict[str, int],
        network: str | None,
    ) -> Predictions:
        """One batched call of ``model_fn`` (the denoiser ``network``, ``None``: the pipeline's own) over the rows each
        branch asks for; the predictions of those rows only."""
        batch = step.sample.shape[0]
        rows = [torch.arange(batch) if b.mask is None else torch.nonzero(b.mask.cpu()).flatten() for b in branches]
        preds = {b.name: step.sample.new_zeros((0, *step.sample.shape[1:])) for b in branches}
        active = [(b, r) for b, r in zip(branches, rows) if r.numel() > 0]
        if not active:
            return preds
        parts = [model_input if b.mask is None else model_input[r.to(model_input.device)] for b, r in active]
        x = parts[0] if len(parts) == 1 else torch.cat(parts)
        evaluated = [b if b.labels is None or b.mask is None else replace(b, labels=b.labels[r.to(b.labels.device)])
                     for b, r in active]
        kwargs = conditioning.gather(evaluated, [r for _, r in active])
        out = model_fn(x, step.timestep, **kwargs)
        self.calls += 1
        self._check_shape(out, x.shape[0], step, network)
        if self.finite is not None:
            self.finite.add(out, step, [(b.name, r.numel()) for b, r in active])
        if self.counts is None:
            self.counts = torch.zeros(batch, dtype=torch.long)
        name = MAIN_NETWORK if network is None else network
        counts = self.network_counts.setdefault(name, torch.zeros(batch, dtype=torch.long))
        for (branch, r), part in zip(active, out.split([r.numel() for _, r in active])):
            preds[branch.name] = part
            self.counts.index_add_(0, r, torch.ones_like(r))
            counts.index_add_(0, r, torch.ones_like(r))
            trace[branch.name] = trace.get(branch.name, 0) + r.numel()
        return preds

    def _check_shape(self, out: torch.Tensor, rows: int, step: Step, network: str | None) -> None:
        """Another network's predictions must have the shape of the pipeline's own denoiser's."""
        if network is None:
            self._main_shape = out.shape[1:]
            return
        expected = (rows, *(step.sample.shape[1:] if self._main_shape is None else self._main_shape))
        if tuple(out.shape) != expected:
            raise ValueError(
                f"the network {network!r} returned predictions of shape {tuple(out.shape)} where the pipeline's own "
                f"denoiser's are {expected}: a guiding model must predict the same tensor (channels, resolution)"
            )

    def complete(
        self,
        step: Step,
        model_fn: ModelFn,
        conditioning: BranchConditioning,
        model_input: torch.Tensor | None = None,
        preds: Predictions | None = None,
        trace: dict[str, int] | None = None,
    ) -> Predictions:
        """Ask ``guidance.branches`` for what is still missing (beyond ``preds``, already evaluated and counted in
        ``trace``) and evaluate it, phase by phase; the evaluation's trace entry is recorded."""
        preds = dict(preds or {})
        trace = {} if trace is None else trace
        model_input = step.sample if model_input is None else model_input
        while True:
            missing = [b for b in self._rule(self.guidance.branches, preds, step) if b.name not in preds]
            if not missing:
                break
            names = [b.name for b in missing]
            if len(set(names)) != len(names):
                raise ValueError(f"{self.guidance!r} requested the same branch twice: {names}")
            preds.update(self.forward(step, missing, model_fn, conditioning, model_input, trace, preds))
        self.trace.append({"step": step.index, "evaluation": step.evaluation, "branches": trace})
        return preds

    def combine(self, step: Step, preds: Predictions) -> torch.Tensor:
        """The guided prediction of this evaluation, in the conditional prediction's dtype."""
        self._finish(step)
        return self._rule(self.guidance.combine, preds, step).to(preds["cond"].dtype)

    def _rule(self, hook: Callable[..., Any], *args: Any) -> Any:
        """Call a hook of the rule; when it fails, a non-finite network output that explains it is reported first."""
        try:
            return hook(*args)
        except Exception:
            self.check_finite()
            raise

    def unguided(
        self, step: Step, model_fn: ModelFn, conditioning: BranchConditioning, model_input: torch.Tensor
    ) -> torch.Tensor:
        """The conditional prediction alone, without asking the guidance (the pipeline turned CFG off)."""
        trace: dict[str, int] = {}
        cond = self.forward(step, [Branch("cond")], model_fn, conditioning, model_input, trace)["cond"]
        self.trace.append({"step": step.index, "evaluation": step.evaluation, "branches": trace})
        self._finish(step)
        return cond

    def _finish(self, step: Step) -> None:
        self.evaluations += 1
        if step.first_stage:
            self._start_record = step

    def guide(
        self, step: Step, model_fn: ModelFn, conditioning: BranchConditioning, model_input: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Evaluate every branch the guidance asks for at ``step`` and combine them."""
        return self.combine(step, self.complete(step, model_fn, conditioning, model_input))

    # -- around scheduler.step -----------------------------------------------------------------------------------
    def begin_step(self, sample: torch.Tensor) -> None:
        """Before ``scheduler.step`` with the scheduler sample ``sample`` (kept as the step's start)."""
        if self._first_stage:
            self._step_start = sample

    def end_step(self, after: torch.Tensor) -> torch.Tensor:
        """After ``scheduler.step``: ``after_step`` on a completed step (a Heun step completes at its 2nd stage)."""
        if not self.adapter.step_completed(self._index):
            return after
        self.completed += 1
        if self._start_record is None or self._step_start is None:
            return after
        return self.guidance.after_step(self._step_start, after, self._start_record)

    # -- before the loop -----------------------------------------------------------------------------------------
    def prepare_noise(
        self,
        noise: torch.Tensor,
        index: int,
        timestep: torch.Tensor,
        model_fn: ModelFn,
        conditioning: BranchConditioning,
    ) -> torch.Tensor:
        """``guidance.prepare_noise`` on unit-variance ``noise``, with evaluations at schedule index ``index``."""
        context = _NoiseContext(self, index, timestep, model_fn, conditioning)
        return self.guidance.prepare_noise(noise, context)

    def check_finite(self) -> None:
        """``FloatingPointError`` if any network output of this generation was not finite (see :class:`FiniteCheck`)."""
        if self.finite is not None:
            self.finite.check()

    def report(self) -> RunReport:
        counts = [] if self.counts is None else self.counts.tolist()
        per_network = {name: rows.tolist() for name, rows in self.network_counts.items()}
        return RunReport(nfe_per_sample=counts, model_calls=self.calls, trace=self.trace, rows_per_network=per_network)


def network_functions(guidance: Guidance, network_fn: NetworkFn | None, prediction_type: str) -> dict[str, ModelFn]:
    """The model function of every network the rule declares besides the pipeline's own, checked: a known
    prediction type must be the pipeline's, and the integration's ``network_fn`` refuses a module it cannot call."""
    networks = guidance.networks
    if not networks:
        return {}
    if network_fn is None:
        raise ValueError(f"{guidance!r} evaluates another network ({', '.join(networks)}), which this integration "
                         "cannot call")
    functions = {}
    for name, network in networks.items():
        if name == MAIN_NETWORK:
            raise ValueError(f"a rule's network may not be called {MAIN_NETWORK!r} (the pipeline's own denoiser)")
        if network.prediction_type is not None and network.prediction_type != prediction_type:
            raise ValueError(
                f"the network {name!r} predicts {network.prediction_type!r} but this pipeline's scheduler expects "
                f"{prediction_type!r}: a guiding model must have the pipeline's prediction type"
            )
        functions[name] = network_fn(network)
    return functions


class FiniteCheck:
    """Detects NaN / inf in network outputs without a host synchronisation per evaluation.

    Every output adds one device-side reduction (the non-finite count of each row); the counts are read back every
    :attr:`every` evaluations and at the end of the generation, where the first offending evaluation is reported by
    step, branch and the fraction of its elements that were not finite.
    """

    every = 10

    def __init__(self) -> None:
        self.pending: list[tuple[torch.Tensor, int, int, list[tuple[str, int]], int]] = []

    def add(self, out: torch.Tensor, step: Step, branches: list[tuple[str, int]]) -> None:
        bad = (~torch.isfinite(out)).reshape(out.shape[0], -1).sum(dim=1)
        self.pending.append((bad, step.index, step.evaluation, branches, out[0].numel()))
        if len(self.pending) >= self.every:
            self.check()

    def check(self) -> None:
        if not self.pending:
            return
        totals = torch.stack([bad.sum() for bad, *_ in self.pending]).tolist()
        pending, self.pending = self.pending, []
        for total, (bad, index, evaluation, branches, elements) in zip(totals, pending):
            if total == 0:
                continue
            counts = bad.split([rows for _, rows in branches])
            parts = [
                f"{name}: {float(count.sum()) / (rows * elements):.1%}"
                for (name, rows), count in zip(branches, counts) if int(count.sum())
            ]
            where = "before the loop (noise refinement)" if index < 0 else f"at step {index} (evaluation {evaluation})"
            raise FloatingPointError(
                f"the network returned non-finite values (NaN or inf) {where}; fraction of elements per branch: "
                f"{', '.join(parts)}. Check the model weights and dtype (float16 overflow?); pass check_finite=False "
                "to skip this check"
            )


class _NoiseContext:
    """The :class:`guidance.base.NoiseContext` a :class:`GuidedRun` hands to ``prepare_noise``."""

    def __init__(
        self, run: GuidedRun, index: int, timestep: torch.Tensor, model_fn: ModelFn, conditioning: BranchConditioning
    ) -> None:
        self.run, self.index, self.timestep = run, index, timestep
        self.model_fn, self.conditioning = model_fn, conditioning

    def step_for(self, noise: torch.Tensor, timestep: int | None = None) -> Step:
        if timestep is None:
            scale = self.run.init_noise_sigma * self.run.adapter.input_scale(self.index)
            return self.run._record(self.index, self.timestep, noise * scale, self.conditioning, -1, True)
        alphas_cumprod = getattr(self.run.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None or not 0 <= timestep < len(alphas_cumprod):
            raise ValueError(f"timestep must be a training timestep of a VP-type scheduler (alphas_cumprod), got "
                             f"{timestep} for {type(self.run.scheduler).__name__}")
        abar = float(alphas_cumprod[timestep])
        first = torch.as_tensor(self.timestep)
        t = torch.tensor(timestep, dtype=first.dtype, device=first.device)
        step = self.run._record(self.index, t, noise, self.conditioning, -1, True)
        return replace(step, alpha=math.sqrt(abar), sigma=math.sqrt(1 - abar))

    def evaluate(self, step: Step, branches: Sequence[Branch]) -> dict[str, torch.Tensor]:
        trace: dict[str, int] = {}
        preds = self.run.forward(step, branches, self.model_fn, self.conditioning, step.sample, trace)
        self.run.trace.append({"step": -1, "evaluation": -1, "branches": trace})
        return preds

    def randn_like(self, noise: torch.Tensor, salt: int) -> torch.Tensor:
        generator = derive_generator(self.run.generator, salt)
        return randn_tensor(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)

    def has_branch(self, name: str) -> bool:
        return self.conditioning.has_branch(name)
