"""The one denoising loop every guided pipeline runs.

Per model evaluation: ask the guidance which branches it needs (possibly in two phases), evaluate all of them in one
batched forward, combine, step the scheduler, and on every completed step apply ``after_step``. Before the loop,
``prepare_noise`` may refine the initial noise with evaluations at the schedule's first noise level. Every row a
network call processes is counted, so the result carries the network evaluations (NFE) per sample.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from diffusers.utils.torch_utils import randn_tensor

from guidance.base import Branch, Guidance, Step
from pipelines.conditioning import BranchConditioning
from pipelines.schedulers import SchedulerAdapter

ModelFn = Callable[..., torch.Tensor]
Generator = torch.Generator | list[torch.Generator] | None


@dataclass
class LoopResult:
    """Final scheduler sample, evaluation counts and a per-evaluation trace of the branches evaluated."""

    latents: torch.Tensor
    nfe_per_sample: list[int]
    model_calls: int
    trace: list[dict[str, Any]] = field(default_factory=list)

    @property
    def nfe(self) -> int | float:
        """Network evaluations per image (an int when every sample had the same count, else their mean)."""
        counts = self.nfe_per_sample
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


class _Evaluator:
    """Runs branch requests as one batched network call and counts the rows per sample."""

    def __init__(self, model_fn: ModelFn, conditioning: BranchConditioning, batch_size: int, device: torch.device):
        self.model_fn = model_fn
        self.conditioning = conditioning
        self.counts = torch.zeros(batch_size, dtype=torch.long)
        self.calls = 0
        self.device = device

    def __call__(self, step: Step, branches: Sequence[Branch], trace: dict[str, int]) -> dict[str, torch.Tensor]:
        local = torch.arange(step.sample.shape[0])
        rows = [local if b.rows is None else b.rows.long().cpu() for b in branches]
        active = [(b, r) for b, r in zip(branches, rows) if r.numel() > 0]
        preds = {b.name: step.sample.new_zeros((0, *step.sample.shape[1:])) for b, r in zip(branches, rows)}
        if not active:
            return preds
        x = torch.cat([step.sample[r.to(self.device)] for _, r in active])
        kwargs = self.conditioning.gather([b for b, _ in active], [r for _, r in active])
        out = self.model_fn(x, step.timestep, **kwargs)
        self.calls += 1
        for (branch, r), part in zip(active, out.split([r.numel() for _, r in active])):
            preds[branch.name] = part
            absolute = r if step.rows is None else step.rows.cpu()[r]
            self.counts.index_add_(0, absolute, torch.ones_like(absolute))
            trace[branch.name] = trace.get(branch.name, 0) + r.numel()
        return preds


def evaluate_until_complete(
    guidance: Guidance, step: Step, evaluator: Callable[..., dict[str, torch.Tensor]], trace: dict[str, int]
) -> dict[str, torch.Tensor]:
    """Ask ``guidance.branches`` for what is still missing and evaluate it, until nothing is missing."""
    preds: dict[str, torch.Tensor] = {}
    while True:
        missing = [b for b in guidance.branches(step, preds) if b.name not in preds]
        if not missing:
            return preds
        names = [b.name for b in missing]
        if len(set(names)) != len(names):
            raise ValueError(f"{guidance!r} requested the same branch twice: {names}")
        preds.update(evaluator(step, missing, trace))


class _NoiseContext:
    """The :class:`guidance.base.NoiseContext` the loop hands to ``prepare_noise``."""

    def __init__(self, loop: _LoopState) -> None:
        self.loop = loop

    def step_for(self, noise: torch.Tensor, timestep: int | None = None) -> Step:
        if timestep is None:
            return self.loop.step(0, noise * self.loop.init_noise_sigma * self.loop.adapter.input_scale(0), -1, True, 0)
        alphas_cumprod = getattr(self.loop.adapter.scheduler, "alphas_cumprod", None)
        if alphas_cumprod is None or not 0 <= timestep < len(alphas_cumprod):
            raise ValueError(f"timestep must be a training timestep of a VP-type scheduler (alphas_cumprod), got "
                             f"{timestep} for {type(self.loop.adapter.scheduler).__name__}")
        abar = float(alphas_cumprod[timestep])
        t = torch.tensor(timestep, dtype=self.loop.timesteps.dtype, device=self.loop.timesteps.device)
        return replace(self.loop.step(0, noise, -1, True, 0), timestep=t, alpha=math.sqrt(abar), sigma=math.sqrt(1 - abar))

    def evaluate(self, step: Step, branches: Sequence[Branch]) -> dict[str, torch.Tensor]:
        trace: dict[str, int] = {}
        preds = self.loop.evaluator(step, branches, trace)
        self.loop.trace.append({"step": -1, "evaluation": -1, "branches": trace})
        return preds

    def randn_like(self, noise: torch.Tensor, salt: int) -> torch.Tensor:
        generator = derive_generator(self.loop.generator, salt)
        return randn_tensor(noise.shape, generator=generator, device=noise.device, dtype=noise.dtype)

    def has_branch(self, name: str) -> bool:
        return self.loop.conditioning.has_branch(name)


@dataclass
class _LoopState:
    adapter: SchedulerAdapter
    timesteps: torch.Tensor
    num_steps: int
    conditioning: BranchConditioning
    evaluator: _Evaluator
    generator: Generator
    init_noise_sigma: float
    decode: Callable[[torch.Tensor], torch.Tensor] | None
    batch_size: int
    trace: list[dict[str, Any]] = field(default_factory=list)

    def step(self, index: int, model_input: torch.Tensor, evaluation: int, first_stage: bool, completed: int) -> Step:
        timestep = self.timesteps[max(index, 0)]
        alpha, sigma = self.adapter.alpha_sigma(max(index, 0), timestep)
        return Step(
            index=completed,
            num_steps=self.num_steps,
            evaluation=evaluation,
            first_stage=first_stage,
            timestep=timestep,
            alpha=alpha,
            sigma=sigma,
            sample=model_input,
            prediction_type=self.adapter.prediction_type,
            batch_size=self.batch_size,
            target_labels=self.conditioning.target_labels,
            decode=self.decode,
            num_labels=self.conditioning.num_labels,
            scheduler=self.adapter.scheduler,
        )


def check_branches(guidance: Guidance, conditioning: BranchConditioning) -> None:
    """Refuse, before any work, a guidance that needs a branch the pipeline cannot provide."""
    missing = sorted(name for name in guidance.required_branches if not conditioning.has_branch(name))
    if missing:
        raise ValueError(
            f"guidance {guidance!r} needs the branch(es) {missing}, which this pipeline cannot provide "
            "(e.g. 'uncond' needs a null/negative condition; 'ref' needs a label set: the class ids of a "
            "class-conditional pipeline, or label_prompts= with target_labels= for a text-to-image pipeline)"
        )


def denoise(
    *,
    model_fn: ModelFn,
    scheduler: Any,
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    guidance: Guidance,
    conditioning: BranchConditioning,
    num_inference_steps: int,
    generator: Generator = None,
    extra_step_kwargs: dict[str, Any] | None = None,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    on_step_end: Callable[[int, torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
    progress: Any = None,
) -> LoopResult:
    """Sample from ``latents`` (already multiplied by ``scheduler.init_noise_sigma``) with ``guidance``.

    Args:
        model_fn: ``model_fn(model_input, timestep, **branch_kwargs) -> output`` (learned-variance channels removed).
        conditioning: the keyword tensors of every branch (:class:`BranchConditioning`).
        num_inference_steps: the number of sampling steps (``len(timesteps)`` differs for Heun-type schedulers).
        decode: maps a denoised estimate to pixels in [-1, 1] (for rules that read images, e.g. GFCG).
        on_step_end: ``on_step_end(i, t, latents) -> latents`` after every evaluation (diffusers' callback semantics).
        progress: anything with ``update()``, advanced once per completed step.
    """
    check_branches(guidance, conditioning)
    adapter = SchedulerAdapter(scheduler, len(timesteps))
    batch = latents.shape[0]
    state = _LoopState(
        adapter=adapter,
        timesteps=timesteps,
        num_steps=num_inference_steps,
        conditioning=conditioning,
        evaluator=_Evaluator(model_fn, conditioning, batch, latents.device),
        generator=generator,
        init_noise_sigma=float(getattr(scheduler, "init_noise_sigma", 1.0)),
        decode=decode,
        batch_size=batch,
    )
    guidance.reset()
    if guidance.uses("prepare_noise"):
        noise = latents / state.init_noise_sigma
        latents = (guidance.prepare_noise(noise, _NoiseContext(state)) * state.init_noise_sigma).to(latents.dtype)

    completed = 0
    step_start = latents
    for i, t in enumerate(timesteps):
        first_stage = adapter.is_first_stage()
        if first_stage:
            step_start = latents
        model_input = scheduler.scale_model_input(latents, t) if hasattr(scheduler, "scale_model_input") else latents
        step = state.step(i, model_input, i, first_stage, completed)
        if first_stage:
            start_record = step  # after_step sees the record of the evaluation that began the step
        evaluated: dict[str, int] = {}
        preds = evaluate_until_complete(guidance, step, state.evaluator, evaluated)
        state.trace.append({"step": completed, "evaluation": i, "branches": evaluated})
        guided = guidance.combine(preds, step).to(preds["cond"].dtype)
        latents = scheduler.step(guided, t, latents, **(extra_step_kwargs or {}), return_dict=False)[0]
        if adapter.step_completed(i):
            latents = guidance.after_step(step_start, latents, start_record)
            completed += 1
            if progress is not None:
                progress.update()
        if on_step_end is not None:
            latents = on_step_end(i, t, latents)

    return LoopResult(
        latents=latents,
        nfe_per_sample=state.evaluator.counts.tolist(),
        model_calls=state.evaluator.calls,
        trace=state.trace,
    )
