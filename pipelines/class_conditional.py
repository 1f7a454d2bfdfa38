"""Guided sampling for class-conditional models: ``UNet2DModel`` with ``num_class_embeds`` or ``DiTTransformer2DModel``.

The unconditional branch is a reserved *null* label (``null_class_label``): ``UNet2DModel`` has no unconditional path
of its own, so a model trained with label dropout keeps one embedding row for it; for DiT it is
``num_embeds_ada_norm`` (the embedding row the model learned with class dropout). Labelled reference branches (GFCG)
use the class ids themselves.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch
from diffusers import DiffusionPipeline
from diffusers.utils.torch_utils import randn_tensor

from guidance.base import Guidance, Network
from pipelines.common import GuidedPipelineOutput, pipeline_guidance
from pipelines.conditioning import BranchConditioning
from pipelines.families import decode_float32
from pipelines.loop import LoopResult, denoise
from pipelines.networks import check_guiding_module
from pipelines.run import check_steps


def scheduler_step_kwargs(scheduler: Any, generator: Any, eta: float) -> dict[str, Any]:
    """``generator`` and ``eta`` for ``scheduler.step`` where its signature takes them (as diffusers pipelines do)."""
    params = set(inspect.signature(scheduler.step).parameters)
    kwargs: dict[str, Any] = {}
    if "generator" in params:
        kwargs["generator"] = generator
    if "eta" in params:
        kwargs["eta"] = eta
    return kwargs


def callback_tensor_names(callback: Any, names: Sequence[str]) -> list[str]:
    """The tensors a ``callback_on_step_end`` asks for (a diffusers ``PipelineCallback`` declares its own)."""
    from diffusers.callbacks import MultiPipelineCallbacks, PipelineCallback

    if isinstance(callback, (PipelineCallback, MultiPipelineCallbacks)):
        return list(callback.tensor_inputs)
    return list(names)


def run_guided_loop(
    pipe: Any,
    *,
    model_fn: Callable[..., torch.Tensor],
    timesteps: torch.Tensor,
    latents: torch.Tensor,
    guidance: Guidance,
    conditioning: BranchConditioning,
    num_inference_steps: int,
    generator: Any,
    eta: float = 0.0,
    decode: Callable[[torch.Tensor], torch.Tensor] | None = None,
    callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
    callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    callback_tensors: Mapping[str, torch.Tensor] | None = None,
    check_finite: bool = True,
    network_fn: Callable[..., Callable[..., torch.Tensor]] | None = None,
) -> LoopResult:
    """:func:`pipelines.loop.denoise` on ``pipe.scheduler`` with the pipeline's progress bar and callback.

    ``callback_on_step_end(pipe, i, t, tensors)`` runs after every model evaluation, as in diffusers; ``tensors``
    holds ``latents`` and the requested entries of ``callback_tensors`` (the pipeline's embeddings). Only a returned
    ``latents`` is used.
    """
    names = callback_tensor_names(callback_on_step_end, callback_on_step_end_tensor_inputs)
    known = ["latents", *(callback_tensors or {})]
    unknown = [name for name in names if name not in known]
    if unknown:
        raise ValueError(f"callback_on_step_end_tensor_inputs must be among {known}, got {unknown}")

    def on_step_end(i: int, t: torch.Tensor, current: torch.Tensor) -> torch.Tensor:
        if callback_on_step_end is None:
            return current
        available = {"latents": current, **(callback_tensors or {})}
        outputs = callback_on_step_end(pipe, i, t, {name: available[name] for name in names})
        return outputs.pop("latents", current)

    with pipe.progress_bar(total=num_inference_steps) as progress:
        return denoise(
            model_fn=model_fn,
            scheduler=pipe.scheduler,
            timesteps=timesteps,
            latents=latents,
            guidance=guidance,
            conditioning=conditioning,
            num_inference_steps=num_inference_steps,
            generator=generator,
            extra_step_kwargs=scheduler_step_kwargs(pipe.scheduler, generator, eta),
            decode=decode,
            on_step_end=on_step_end,
            progress=progress,
            check_finite=check_finite,
            network_fn=network_fn,
        )


def dit_null_label(transformer: Any) -> int | None:
    """DiT's null class id: ``num_embeds_ada_norm``, the extra row its label table has when it was trained with class
    dropout (diffusers' ``LabelEmbedding`` adds it whenever the dropout probability is positive, the default 0.1)."""
    num_classes = int(transformer.config.num_embeds_ada_norm)
    tables = [m.embedding_table for m in transformer.modules() if hasattr(m, "embedding_table")]
    if tables and tables[0].num_embeddings > num_classes:
        return num_classes
    return None


class GuidedClassConditionalPipeline(DiffusionPipeline):
    """Class-conditional sampling with any guidance (``guidance=`` a module, a registered name or a list).

    Args:
        scheduler: any supported diffusers scheduler (see :mod:`pipelines.schedulers`).
        unet: a ``UNet2DModel`` with class embeddings (pixel space unless a ``vae`` is given), or
        transformer: a ``DiTTransformer2DModel`` (latent space; needs ``vae``).
        vae: optional ``AutoencoderKL`` for latent models.
        null_class_label: the label id of the unconditional branch (``None``: DiT's null row ``num_embeds_ada_norm``,
            or no unconditional branch for a UNet).
        id2label: optional class names, so labels may be given by name.
    """

    model_cpu_offload_seq = "transformer->unet->vae"
    _optional_components = ["unet", "transformer", "vae"]

    def __init__(
        self,
        scheduler: Any,
        unet: Any = None,
        transformer: Any = None,
        vae: Any = None,
        null_class_label: int | None = None,
        id2label: dict[str, str] | None = None,
    ) -> None:
        super().__init__()
        if (unet is None) == (transformer is None):
            raise ValueError("GuidedClassConditionalPipeline needs exactly one of unet= or transformer=")
        if transformer is not None and vae is None:
            raise ValueError("a DiT transformer works in latent space: pass its vae=")
        self.register_modules(scheduler=scheduler, unet=unet, transformer=transformer, vae=vae)
        if null_class_label is None and transformer is not None:
            null_class_label = dit_null_label(transformer)
        self.register_to_config(null_class_label=null_class_label, id2label=id2label)

    @property
    def denoiser(self) -> Any:
        return self.unet if self.unet is not None else self.transformer

    @property
    def num_classes(self) -> int:
        """Number of real classes (the null label excluded)."""
        if self.unet is not None:
            total = int(self.unet.config.num_class_embeds or 0)
            return total - 1 if self.config.null_class_label is not None else total
        return int(self.transformer.config.num_embeds_ada_norm)

    def class_ids(self, class_labels: int | str | Sequence[int | str] | torch.Tensor) -> list[int]:
        """Class ids from ids or names (``id2label``); ``ValueError`` for anything outside the classes."""
        if isinstance(class_labels, torch.Tensor):
            class_labels = class_labels.reshape(-1).tolist()
        if isinstance(class_labels, (int, str)):
            class_labels = [class_labels]
        names = {v: int(k) for k, v in (self.config.id2label or {}).items()}
        ids = []
        for label in class_labels:
            if isinstance(label, str) and label in names:
                label = names[label]
            if isinstance(label, bool) or not isinstance(label, int) or not 0 <= label < self.num_classes:
                known = f" or one of {sorted(names)}" if names else ""
                raise ValueError(f"class_labels must be ints in [0, {self.num_classes - 1}]{known}; got {label!r}")
            ids.append(label)
        if not ids:
            raise ValueError("class_labels must not be empty")
        return ids

    def _model_fn(self, module: torch.nn.Module | None = None) -> Callable[..., torch.Tensor]:
        """``model_fn(x, t, class_labels)`` calling ``module`` (default: the pipeline's own denoiser) the way this
        pipeline calls its UNet or DiT."""
        if self.unet is not None:
            unet = self.unet if module is None else module

            def unet_fn(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
                out = unet(x.to(unet.dtype), t, class_labels=class_labels, return_dict=False)[0]
                return out[:, : x.shape[1]]

            return unet_fn
        transformer = self.transformer if module is None else module

        def dit_fn(x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor) -> torch.Tensor:
            timesteps = torch.as_tensor(t, device=x.device).reshape(-1).expand(x.shape[0])
            out = transformer(x.to(transformer.dtype), timestep=timesteps, class_labels=class_labels).sample
            return out[:, : x.shape[1]]  # drop learned-variance channels

        return dit_fn

    def _network_fn(self, network: Network) -> Callable[..., torch.Tensor]:
        """The model function of another denoiser (Autoguidance's guiding model), checked against this one's."""
        check_guiding_module(network.module, self.denoiser)
        return self._model_fn(network.module)

    def _decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents (or pixels) -> pixels in [-1, 1] for guidance rules, float32 (a VAE decodes in float32)."""
        if self.vae is None:
            return latents.float()
        return decode_float32(self.vae, latents / self.vae.config.scaling_factor)

    def _decode_output(self, latents: torch.Tensor) -> torch.Tensor:
        """The final decode: as :meth:`_decode`, but a VAE decodes in its own dtype, as diffusers' pipelines do."""
        if self.vae is None:
            return latents.float()
        image = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return image.float()

    @torch.no_grad()
    def __call__(
        self,
        class_labels: int | str | Sequence[int | str] | torch.Tensor,
        guidance: Any = None,
        guidance_scale: float | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        prompt: Any = None,
        check_finite: bool = True,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        """Sample one image per entry of ``class_labels`` (ids or ``id2label`` names).

        ``guidance=None`` is CFG at ``guidance_scale`` (default 4.0; 1.0 is unguided conditional sampling).
        ``output_type``: ``"pil"``, ``"np"`` (HWC in [0, 1]), ``"pt"`` (CHW in [0, 1]) or ``"latent"``.
        ``check_finite``: raise ``FloatingPointError`` when the network returns NaN / inf (naming the step and branch).
        """
        if prompt is not None:
            raise ValueError("this is a class-conditional model: pass class_labels=, not prompt=")
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        check_steps(num_inference_steps)
        rule = pipeline_guidance(guidance, guidance_scale, default_scale=4.0)
        if "uncond" in rule.required_branches and self.config.null_class_label is None:
            raise ValueError(
                f"guidance {rule!r} needs the unconditional branch, but this pipeline has no null_class_label "
                "(construct it with null_class_label=<the label id the model was trained with for 'no class'>)"
            )
        ids = self.class_ids(class_labels)
        device = self._execution_device
        batch = len(ids)
        if isinstance(generator, list) and len(generator) != batch:
            raise ValueError(f"generator list has {len(generator)} entries for {batch} images")

        labels = torch.tensor(ids, device=device)
        branches = {"cond": {"class_labels": labels}}
        if self.config.null_class_label is not None:
            branches["uncond"] = {"class_labels": torch.full_like(labels, self.config.null_class_label)}
        conditioning = BranchConditioning(
            branches, label_set={"class_labels": torch.arange(self.num_classes, device=device)}, target_labels=labels
        )

        if timesteps is None:
            self.scheduler.set_timesteps(num_inference_steps, device=device)
        else:
            self.scheduler.set_timesteps(timesteps=timesteps, device=device)
        config = self.denoiser.config
        shape = (batch, config.in_channels, config.sample_size, config.sample_size)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=self.denoiser.dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        latents = latents.to(device) * getattr(self.scheduler, "init_noise_sigma", 1.0)

        result = run_guided_loop(
            self,
            model_fn=self._model_fn(),
            timesteps=self.scheduler.timesteps,
            latents=latents,
            guidance=rule,
            conditioning=conditioning,
            num_inference_steps=num_inference_steps,
            generator=generator,
            eta=eta,
            decode=self._decode,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            check_finite=check_finite,
            network_fn=self._network_fn,
        )

        if output_type == "latent":
            images: Any = result.latents
        else:
            pixels = (self._decode_output(result.latents) / 2 + 0.5).clamp(0, 1)
            images = pixels.cpu() if output_type == "pt" else pixels.cpu().permute(0, 2, 3, 1).numpy()
            if output_type == "pil":
                images = self.numpy_to_pil(images)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, result.nfe)
        return GuidedPipelineOutput.from_loop(images, result)
