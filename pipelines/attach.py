"""``attach(pipe, rule)``: any guidance rule inside an unmodified diffusers pipeline's own ``__call__``.

    handle = attach(pipe, APG(7.5))          # or "apg", a config dict, a list, as ``guidance=`` accepts
    image = pipe(prompt, image=..., strength=0.6).images[0]
    handle.last_run.nfe, handle.last_run.trace
    handle.detach()                          # or: with attach(pipe, rule): ...

The pipeline's loop runs unchanged; guidance wraps the denoiser and the scheduler, never the loop (k-diffusion's CFG
wrapper, ComfyUI's sampler hooks). For each call of the pipeline:

* **the denoiser** (``pipe.unet`` / ``pipe.transformer``) is intercepted before its hooks run: the interception
  receives the parent's batched ``[uncond; cond]`` input, splits every batch-first keyword per branch (prompt
  embeddings, SDXL's ``added_cond_kwargs``, ControlNet residuals, pooled projections), evaluates exactly the rows the
  rule asks for in one batched forward per phase (fewer after AG's switch, label rows for GFCG's reference), combines
  and returns ``cat[g, g]``, so the parent's ``u + w (c - u)`` yields ``g`` exactly. Flux's true CFG makes two
  sequential calls: the first is answered with the real conditional prediction, the second (the negative prompt's)
  with ``u' = (s c - g) / (s - 1)``, so the parent's ``u' + s (c - u')`` is ``g`` (to rounding);
* **the scheduler's** ``step`` is wrapped on the instance (the scheduler object stays the user's): it keeps the sample
  each step began from, applies ``after_step`` (TAG) on completed steps and hands NLG's refined noise to the first
  step;
* the pipeline always batches the unconditional branch when the rule may need it, whatever ``guidance_scale`` /
  ``true_cfg_scale`` the call passes (the rule's own scale governs); a callback that turns CFG off during the loop by
  setting ``pipe._guidance_scale = 0`` (diffusers' ``SDCFGCutoffCallback``) ends guidance there (conditional
  predictions alone, 1 NFE per step).

:func:`attach` swaps the pipeline's class for a same-named subclass whose properties and ``__call__`` do the above;
the denoiser's class and the scheduler's ``step`` are touched only while a call runs. :meth:`Attachment.detach`
restores the class. A pipeline whose layout is unknown (:mod:`pipelines.families`), a guidance-distilled UNet
(``time_cond_proj_dim``) or a scheduler the rules cannot convert (EDM, KDPM2) is refused at attach time.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import torch

from guidance.base import Branch, Guidance, Network
from guidance.registry import resolve_guidance
from pipelines.conditioning import BranchConditioning, batch_tree, take
from pipelines.families import Family, family_of
from pipelines.networks import check_guiding_module
from pipelines.run import GuidedRun, ModelFn, RunReport, check_branches, check_steps, network_functions
from pipelines.schedulers import prediction_type_of, scheduler_family

#: the ``true_cfg_scale`` an attached Flux call runs with; the second call's answer inverts the parent's combination
TRUE_CFG_SCALE = 2.0


def denoiser_of(pipe: Any) -> torch.nn.Module:
    """The pipeline's denoising network: ``pipe.unet`` or ``pipe.transformer``."""
    for name in ("unet", "transformer"):
        module = getattr(pipe, name, None)
        if isinstance(module, torch.nn.Module):
            return module
    raise ValueError(f"{type(pipe).__name__} has no unet or transformer to guide")


def check_servable(pipe: Any, guidance: Guidance, family: Family, label_set: bool = False) -> None:
    """Refuse, with a ``ValueError`` naming the reason, what :func:`attach` could not apply faithfully."""
    denoiser = denoiser_of(pipe)
    if getattr(denoiser.config, "time_cond_proj_dim", None) is not None:
        raise ValueError(
            "this UNet has a distilled guidance embedding (time_cond_proj_dim, e.g. an LCM): guidance does not apply"
        )
    scheduler_family(pipe.scheduler)
    network_functions(guidance, lambda network: check_guiding_module(network.module, denoiser),
                      prediction_type_of(pipe.scheduler))
    names = {"cond": {}, "uncond": {}}
    check_branches(guidance, BranchConditioning(names, {"labels": torch.zeros(1)} if label_set else None))
    if guidance.uses("prepare_noise") and (not family.starts_from_noise or family.layout != "batched"):
        reason = "starts from a noised image" if not family.starts_from_noise else "evaluates its branches one by one"
        raise ValueError(
            f"{guidance!r} refines the initial noise (prepare_noise), but {type(pipe).__name__} {reason}; "
            "use it with a text-to-image pipeline of the batched families"
        )


class GuidancePipelineMixin:
    """Properties of a pipeline while a guided call runs (``self._guidance`` is its :class:`Attachment`).

    The parent's loop then batches ``[uncond; cond]`` when the rule may need the unconditional branch, combines with
    the rule's own scale (``cat[g, g]`` makes any finite scale exact) and skips its own rescale.
    """

    def _active_attachment(self) -> Attachment | None:
        attachment = self.__dict__.get("_guidance")
        if attachment is None or attachment.call is None or attachment.family.layout != "batched":
            return None
        return attachment

    @property
    def do_classifier_free_guidance(self) -> bool:
        attachment = self._active_attachment()
        if attachment is None:
            return super().do_classifier_free_guidance  # type: ignore[misc]
        return attachment.needs_uncond and self._guidance_scale != 0.0  # 0: CFG turned off by a callback

    @property
    def guidance_scale(self) -> float:
        attachment = self._active_attachment()
        scale = None if attachment is None else getattr(attachment.guidance, "guidance_scale", None)
        return scale if isinstance(scale, (int, float)) else super().guidance_scale  # type: ignore[misc]

    @property
    def guidance_rescale(self) -> float:
        return 0.0 if self._active_attachment() is not None else super().guidance_rescale  # type: ignore[misc]


class AttachedPipeline(GuidancePipelineMixin):
    """Base of the same-named subclass :func:`attach` gives a pipeline: its ``__call__`` runs the parent's, guided."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self._guidance.run(super().__call__, args, kwargs)


@functools.cache
def _attached_class(cls: type) -> type:
    return type(cls.__name__, (AttachedPipeline, cls), {"__module__": cls.__module__, "__qualname__": cls.__qualname__})


@functools.cache
def _intercepted_class(cls: type) -> type:
    def __call__(self: Any, *args: Any, **kwargs: Any) -> Any:
        return self.__dict__["_guidance_call"](self, args, kwargs)

    return type(cls.__name__, (cls,), {"__call__": __call__, "__module__": cls.__module__})


class Attachment:
    """A guidance rule attached to a pipeline (what :func:`attach` returns).

    Attributes:
        last_run: the :class:`~pipelines.run.RunReport` of the latest call (``nfe``, ``nfe_per_sample``,
            ``model_calls``, ``trace``); ``None`` before the first.
    """

    def __init__(self, pipe: Any, guidance: Guidance, family: Family, check_finite: bool = True) -> None:
        self.pipe = pipe
        self.check_finite = check_finite
        self.pipeline_class = type(pipe)
        self.guidance = guidance
        self.family = family
        self.last_run: RunReport | None = None
        self.call: _Call | None = None

    @property
    def needs_uncond(self) -> bool:
        return "uncond" in self.guidance.required_branches

    def run(
        self,
        parent_call: Callable[..., Any],
        args: Sequence[Any],
        kwargs: dict[str, Any],
        label_set: Mapping[str, Any] | None = None,
        target_labels: torch.Tensor | None = None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> Any:
        """``parent_call(*args, **kwargs)`` with the rule applied; :attr:`last_run` is set when it returns or
        raises. ``label_set`` / ``target_labels`` give labelled reference branches (see
        :class:`~pipelines.conditioning.BranchConditioning`)."""
        if self.call is not None:
            raise RuntimeError("this pipeline is already running a guided call (calls must not overlap)")
        kwargs = self._call_kwargs(dict(kwargs))
        check_servable(self.pipe, self.guidance, self.family, label_set is not None)
        if decode is None:
            decode = functools.partial(self.family.decode, self.pipe, kwargs)
        self.call = _Call(self, kwargs.get("generator"), label_set, target_labels, decode)
        call = self.call
        try:
            with call.installed():
                output = parent_call(*args, **kwargs)
        finally:
            self.last_run = call.report()
            self.call = None
        if call.run is not None:
            call.run.check_finite()
        return output

    def _call_kwargs(self, kwargs: dict[str, Any]) -> dict[str, Any]:
        """The call's arguments as the attached rule needs them (see the module docstring)."""
        if "num_inference_steps" in kwargs:
            check_steps(kwargs["num_inference_steps"])
        if kwargs.get("guidance_rescale"):
            raise ValueError(
                "guidance_rescale is part of the attached rule: attach CFG(w, guidance_rescale=...) instead of "
                f"passing guidance_rescale={kwargs['guidance_rescale']} to the call"
            )
        if kwargs.get("skip_guidance_layers") is not None:
            raise ValueError("skip_guidance_layers (SD3's skip-layer guidance) is a rule of its own; not with attach")
        if self.family.layout == "batched":
            kwargs.pop("guidance_scale", None)  # the rule's scale governs
        elif self.needs_uncond:
            kwargs["true_cfg_scale"] = TRUE_CFG_SCALE
            has_embeds = kwargs.get("negative_prompt_embeds") is not None
            if kwargs.get("negative_prompt") is None and not has_embeds:
                kwargs["negative_prompt"] = ""
        else:
            kwargs["true_cfg_scale"] = 1.0
        return kwargs

    def detach(self) -> None:
        """Restore the pipeline exactly: its class, and no attribute of ours left on it."""
        if self.pipe.__dict__.get("_guidance") is self:
            self.pipe.__class__ = self.pipeline_class
            del self.pipe.__dict__["_guidance"]

    def __enter__(self) -> Attachment:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.detach()

    def __repr__(self) -> str:
        return f"Attachment({type(self.pipe).__name__}, {self.guidance!r})"


class _Call:
    """One guided call: the denoiser interception, the scheduler wrapper and the :class:`GuidedRun`."""

    def __init__(
        self,
        attachment: Attachment,
        generator: Any,
        label_set: Mapping[str, Any] | None,
        target_labels: torch.Tensor | None,
        decode: Callable[[torch.Tensor], torch.Tensor] | None,
    ) -> None:
        self.attachment = attachment
        self.pipe = attachment.pipe
        self.guidance = attachment.guidance
        self.family = attachment.family
        self.generator = generator
        self.label_set = label_set
        self.target_labels = target_labels
        self.decode = decode
        self.run: GuidedRun | None = None
        self.pending_sample: torch.Tensor | None = None  # refined noise for the first scheduler step (NLG)
        self.pending_cond: tuple[Any, ...] | None = None  # Flux: (step, preds, trace) of the conditional call

    # -- installing ----------------------------------------------------------------------------------------------
    @contextlib.contextmanager
    def installed(self) -> Iterator[None]:
        """The denoiser interception and the scheduler wrapper, for the duration of the call."""
        self.install()
        try:
            yield
        finally:
            self.uninstall()

    def install(self) -> None:
        self.denoiser = denoiser_of(self.pipe)
        self.denoiser_class = type(self.denoiser)
        network = getattr(self.denoiser, "_orig_mod", self.denoiser)  # a torch.compile wrapper's module
        self.signature = inspect.signature(type(network).forward)
        self.sample_name = list(self.signature.parameters)[1]
        self.denoiser.__dict__["_guidance_call"] = self.intercept  # not through a compile wrapper's __setattr__
        self.denoiser.__class__ = _intercepted_class(self.denoiser_class)
        self.scheduler = self.pipe.scheduler
        self.previous_step = self.scheduler.__dict__.get("step")  # a wrap of the user's own, kept under ours
        original = self.scheduler.step
        self.step_signature = inspect.signature(original)

        @functools.wraps(original)
        def step(*args: Any, **kwargs: Any) -> Any:
            return self.scheduler_step(original, args, kwargs)

        self.scheduler.step = step

    def uninstall(self) -> None:
        self.denoiser.__class__ = self.denoiser_class
        del self.denoiser.__dict__["_guidance_call"]
        if self.previous_step is None:
            del self.scheduler.step
        else:
            self.scheduler.step = self.previous_step

    def report(self) -> RunReport:
        return self.run.report() if self.run is not None else RunReport([], 0, [])

    # -- the scheduler -------------------------------------------------------------------------------------------
    def scheduler_step(self, original: Callable[..., Any], args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        bound = self.step_signature.bind(*args, **kwargs)
        self.pending_cond = None
        if self.pending_sample is not None:
            bound.arguments["sample"], self.pending_sample = self.pending_sample, None
        if self.run is None:
            return original(*bound.args, **bound.kwargs)
        self.run.begin_step(bound.arguments["sample"])
        out = original(*bound.args, **bound.kwargs)
        before = out[0] if isinstance(out, tuple) else out.prev_sample
        after = self.run.end_step(before)
        if after is before:
            return out
        if isinstance(out, tuple):
            return (after, *out[1:])
        out.prev_sample = after
        return out

    # -- the denoiser --------------------------------------------------------------------------------------------
    def intercept(self, module: torch.nn.Module, args: Sequence[Any], kwargs: dict[str, Any]) -> Any:
        bound = self.signature.bind(None, *args, **kwargs)
        arguments = dict(bound.arguments)
        arguments.pop(next(iter(self.signature.parameters)))  # self
        for name, param in self.signature.parameters.items():
            if param.kind is param.VAR_KEYWORD:
                arguments.update(arguments.pop(name, {}))
        return_dict = arguments.pop("return_dict", True)
        x = arguments.pop(self.sample_name)
        timestep = torch.as_tensor(arguments.get("timestep", 0)).reshape(-1)[0]
        index = self.schedule_index(timestep)
        if 0 <= index < len(self.scheduler.timesteps):
            timestep = self.scheduler.timesteps[index]
        if self.run is None:
            remaining = len(self.scheduler.timesteps) - index
            steps = math.ceil(remaining / getattr(self.scheduler, "order", 1))
            self.run = GuidedRun(
                self.guidance, self.scheduler, steps, self.decode, self.generator, self.attachment.check_finite,
                self.network_fn,
            )
        tree = batch_tree(arguments, x.shape[0], self.family.shared_keywords)

        def model_fn(inputs: torch.Tensor, t: torch.Tensor, **branch_kwargs: Any) -> torch.Tensor:
            call = {self.sample_name: inputs, **branch_kwargs, "return_dict": False}
            return self.denoiser_class.__call__(module, **call)[0]

        if self.family.layout == "batched":
            out = self.batched(x, tree, index, timestep, model_fn)
        else:
            out = self.sequential(x, tree, index, timestep, model_fn)
        return (out,) if return_dict is False else _output(module, out)

    def network_fn(self, network: Network) -> ModelFn:
        """Another denoiser (Autoguidance's guiding model) called with the keywords the pipeline gave its own."""
        check_guiding_module(network.module, self.denoiser)
        guide, sample_name = network.module, self.sample_name

        def guide_fn(inputs: torch.Tensor, t: torch.Tensor, **branch_kwargs: Any) -> torch.Tensor:
            return guide(**{sample_name: inputs, **branch_kwargs, "return_dict": False})[0]

        return guide_fn

    def schedule_index(self, timestep: torch.Tensor) -> int:
        """The scheduler's index of this evaluation, as the scheduler resolves it in ``step``: its ``step_index``,
        else its begin index; schedulers without either (DDIM, DDPM) are located once, at the first evaluation, by
        the timestep's position in ``scheduler.timesteps``, and advance one evaluation at a time."""
        scheduler = self.scheduler
        index = getattr(scheduler, "step_index", None)
        if index is not None:
            return int(index)
        begin = getattr(scheduler, "begin_index", None)
        if begin is not None:
            return int(begin)
        if hasattr(scheduler, "index_for_timestep"):
            return int(scheduler.index_for_timestep(timestep))
        if self.run is not None:
            return self.first_index + self.run.evaluations
        matches = (scheduler.timesteps.cpu() == timestep.cpu()).nonzero()
        self.first_index = int(matches[0, 0]) if len(matches) else 0
        return self.first_index

    def latent_part(self, model_input: torch.Tensor) -> torch.Tensor:
        """The scheduler-sample channels of the model input (an inpainting UNet also reads mask channels)."""
        config = self.denoiser.config
        channels = config.get("out_channels") or config.get("in_channels")
        if model_input.ndim == 4 and channels and model_input.shape[1] > channels:
            return model_input[:, :channels]
        return model_input

    def conditioning(self, branches: Mapping[str, Any]) -> BranchConditioning:
        return BranchConditioning(branches, self.label_set, self.target_labels)

    def batched(
        self, x: torch.Tensor, tree: Any, index: int, timestep: torch.Tensor, model_fn: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        rows = x.shape[0]
        with_uncond = bool(self.pipe.do_classifier_free_guidance)
        if with_uncond:
            if rows % 2:
                raise ValueError(f"the pipeline's batched CFG input has an odd number of rows ({rows})")
            half = rows // 2
            tree = self._deinterleave(tree, rows)
            branches = {"uncond": take(tree, slice(0, half)), "cond": take(tree, slice(half, rows))}
            model_input = x[half:]
        else:
            branches, model_input = {"cond": tree}, x
        conditioning = self.conditioning(branches)
        run = self.run
        step = run.record(index, timestep, self.latent_part(model_input), conditioning)
        if run.evaluations == 0 and self.guidance.uses("prepare_noise"):
            model_input = self.refine_noise(step.sample, index, timestep, model_fn, conditioning)
            step = run.record(index, timestep, model_input, conditioning)
        if with_uncond or not self.attachment.needs_uncond:
            guided = run.guide(step, model_fn, conditioning, model_input)
        else:
            guided = run.unguided(step, model_fn, conditioning, model_input)
        return torch.cat([guided, guided]) if with_uncond else guided

    def _deinterleave(self, tree: Any, rows: int) -> Any:
        """Put SDXL's ``[n, p, n, p, ...]`` time ids as ``[n, ..., n, p, ..., p]`` (uncond rows, then cond rows)."""
        added = tree.get("added_cond_kwargs") if isinstance(tree, Mapping) else None
        if not self.family.interleaved or not isinstance(added, Mapping):
            return tree
        fixed = dict(added)
        for key in self.family.interleaved:
            value = added.get(key)
            if isinstance(value, torch.Tensor) and value.shape[0] == rows:
                fixed[key] = torch.cat([value[0::2], value[1::2]])
        return {**tree, "added_cond_kwargs": fixed}

    def refine_noise(
        self,
        model_input: torch.Tensor,
        index: int,
        timestep: torch.Tensor,
        model_fn: Callable[..., torch.Tensor],
        conditioning: BranchConditioning,
    ) -> torch.Tensor:
        """NLG at the first evaluation: refine the noise this input was made from; the first scheduler step then
        starts from the refined latents, and this evaluation's model input is theirs."""
        run = self.run
        noise = model_input / (run.init_noise_sigma * run.adapter.input_scale(index))
        refined = run.prepare_noise(noise, index, timestep, model_fn, conditioning)
        latents = (refined * run.init_noise_sigma).to(model_input.dtype)
        self.pending_sample = latents
        if hasattr(self.scheduler, "scale_model_input"):
            return self.scheduler.scale_model_input(latents, timestep)
        return latents

    def sequential(
        self, x: torch.Tensor, tree: Any, index: int, timestep: torch.Tensor, model_fn: Callable[..., torch.Tensor]
    ) -> torch.Tensor:
        """Flux's true CFG: the conditional call, then (when the rule needs it) the negative prompt's call."""
        run = self.run
        if self.pending_cond is None:
            conditioning = self.conditioning({"cond": tree})
            step = run.record(index, timestep, x, conditioning)
            if not self.attachment.needs_uncond:
                return run.guide(step, model_fn, conditioning, x)
            trace: dict[str, int] = {}
            preds = run.forward(step, [Branch("cond")], model_fn, conditioning, x, trace)
            self.pending_cond = (step, preds, trace)
            return preds["cond"]
        step, preds, trace = self.pending_cond
        self.pending_cond = None
        preds = run.complete(step, model_fn, self.conditioning({"uncond": tree}), x, preds, trace)
        guided = run.combine(step, preds)
        cond = preds["cond"].float()
        return ((TRUE_CFG_SCALE * cond - guided.float()) / (TRUE_CFG_SCALE - 1)).to(guided.dtype)


def _output(module: torch.nn.Module, sample: torch.Tensor) -> Any:
    """The denoiser's output object (``return_dict=True`` callers)."""
    from diffusers import UNet2DConditionModel
    from diffusers.models.modeling_outputs import Transformer2DModelOutput
    from diffusers.models.unets.unet_2d_condition import UNet2DConditionOutput

    if isinstance(module, UNet2DConditionModel):
        return UNet2DConditionOutput(sample=sample)
    return Transformer2DModelOutput(sample=sample)


def attach(pipe: Any, guidance: Any, check_finite: bool = True) -> Attachment:
    """Install ``guidance`` (a module, a registered name, a config dict or a list, as ``guidance=`` accepts) into the
    diffusers pipeline ``pipe``; call ``pipe`` as usual afterwards. See the module docstring.

    ``check_finite``: a call whose network outputs held NaN / inf raises ``FloatingPointError`` naming the step, the
    branch and the fraction (read back every 10 evaluations and at the end of the call, not per evaluation).

    Returns the :class:`Attachment` (``last_run`` after each call, ``detach()``, a context manager).
    ``ValueError`` at once for a pipeline, denoiser, scheduler or rule that cannot be served.
    """
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise TypeError(f"attach needs a diffusers pipeline, got {type(pipe).__name__}")
    if isinstance(pipe, GuidancePipelineMixin):
        raise ValueError(
            f"{type(pipe).__name__} is guided already: detach its attachment first, or pass guidance= to a "
            "Guided* pipeline's call instead of attaching"
        )
    rule = resolve_guidance(guidance)
    family = family_of(pipe)
    check_servable(pipe, rule, family)
    attachment = Attachment(pipe, rule, family, check_finite)
    pipe.__dict__["_guidance"] = attachment
    pipe.__class__ = _attached_class(type(pipe))
    return attachment
