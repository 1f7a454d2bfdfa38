"""``StableDiffusion3Pipeline`` with interchangeable guidance; everything but the denoising loop is the parent's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusion3Pipeline
from diffusers.pipelines.stable_diffusion_3.pipeline_stable_diffusion_3 import calculate_shift, retrieve_timesteps

from pipelines.common import GuidedPipelineOutput, check_steps, decode_float32, label_condition
from pipelines.common import pipeline_guidance, run_guided_loop
from pipelines.conditioning import BranchConditioning


class GuidedStableDiffusion3Pipeline(StableDiffusion3Pipeline):
    """Stable Diffusion 3 / 3.5 (rectified flow, MMDiT) with ``guidance=`` (a module, a registered name, or a list).

    Each branch carries the joint text embeddings (CLIP-L, CLIP-G, T5) and the pooled projections; ``uncond`` uses
    the parent's negative prompts. The transformer predicts the flow velocity, so rules that work on x0 (APG, GFCG)
    convert with ``x0 = x - s * u``. With ``guidance=None`` it is diffusers' CFG at ``guidance_scale`` (default 7.0)
    and gives the parent's images. Skip-layer guidance (``skip_guidance_layers``) is a guidance rule of its own and
    is not available here. ``label_prompts`` (with ``target_labels``) defines a label set for labelled reference
    branches (GFCG), encoded once per call.
    """

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The parent's scaling and shift of latents before the VAE decode."""
        return latents / self.vae.config.scaling_factor + self.vae.config.shift_factor

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> pixels in [-1, 1] for guidance rules, decoded in float32."""
        return decode_float32(self.vae, self._vae_latents(latents))

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        prompt_3: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 28,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        negative_prompt_3: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        joint_attention_kwargs: dict[str, Any] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        max_sequence_length: int = 256,
        skip_guidance_layers: list[int] | None = None,
        mu: float | None = None,
        guidance: Any = None,
        label_prompts: Sequence[str] | None = None,
        target_labels: Sequence[int] | None = None,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        check_steps(num_inference_steps)
        if skip_guidance_layers is not None:
            raise ValueError("skip_guidance_layers (skip-layer guidance) is not supported by the guided pipeline")
        rule = pipeline_guidance(guidance, guidance_scale, default_scale=7.0)
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        self.check_inputs(
            prompt, prompt_2, prompt_3, height, width, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds,
            callback_on_step_end_tensor_inputs=list(callback_on_step_end_tensor_inputs),
            max_sequence_length=max_sequence_length,
        )
        self._guidance_scale = getattr(rule, "guidance_scale", 1.0)
        self._clip_skip = clip_skip
        self._joint_attention_kwargs = joint_attention_kwargs
        self._interrupt = False

        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = (joint_attention_kwargs or {}).get("scale")
        needs_uncond = "uncond" in rule.required_branches
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, prompt_3=prompt_3, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, negative_prompt_3=negative_prompt_3,
            do_classifier_free_guidance=needs_uncond, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, device=device, clip_skip=clip_skip,
            num_images_per_prompt=num_images_per_prompt, max_sequence_length=max_sequence_length,
            lora_scale=lora_scale,
        )
        branches = {"cond": {"encoder_hidden_states": prompt_embeds, "pooled_projections": pooled_prompt_embeds}}
        if needs_uncond:
            branches["uncond"] = {
                "encoder_hidden_states": negative_prompt_embeds,
                "pooled_projections": negative_pooled_prompt_embeds,
            }

        def encode_labels(prompts: list[str]) -> dict[str, torch.Tensor]:
            embeds, _, pooled, _ = self.encode_prompt(
                prompts, None, None, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                clip_skip=clip_skip, max_sequence_length=max_sequence_length, lora_scale=lora_scale,
            )
            return {"encoder_hidden_states": embeds, "pooled_projections": pooled}

        label_set, targets = label_condition(
            label_prompts, target_labels, batch, num_images_per_prompt, encode_labels, device
        )
        conditioning = BranchConditioning(branches, label_set, targets)

        latents = self.prepare_latents(
            batch * num_images_per_prompt, self.transformer.config.in_channels, height, width, prompt_embeds.dtype,
            device, generator, latents,
        )
        scheduler_kwargs = {}
        if self.scheduler.config.get("use_dynamic_shifting", None) and mu is None:
            patch = self.transformer.config.patch_size
            config = self.scheduler.config
            mu = calculate_shift(
                (latents.shape[2] // patch) * (latents.shape[3] // patch), config.get("base_image_seq_len", 256),
                config.get("max_image_seq_len", 4096), config.get("base_shift", 0.5), config.get("max_shift", 1.16),
            )
        if mu is not None:
            scheduler_kwargs["mu"] = mu
        timesteps, num_inference_steps = retrieve_timesteps(
            self.scheduler, num_inference_steps, device, sigmas=sigmas, **scheduler_kwargs
        )
        self._num_timesteps = len(timesteps)
        transformer = self.transformer

        def model_fn(
            x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, pooled_projections: torch.Tensor
        ) -> torch.Tensor:
            return transformer(
                hidden_states=x, timestep=t.expand(x.shape[0]), encoder_hidden_states=encoder_hidden_states,
                pooled_projections=pooled_projections, joint_attention_kwargs=joint_attention_kwargs,
                return_dict=False,
            )[0]

        result = run_guided_loop(
            self,
            model_fn=model_fn,
            timesteps=timesteps,
            latents=latents,
            guidance=rule,
            conditioning=conditioning,
            num_inference_steps=num_inference_steps,
            generator=generator,
            decode=self._decode_pixels,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={"prompt_embeds": prompt_embeds, "pooled_prompt_embeds": pooled_prompt_embeds},
        )

        if output_type == "latent":
            images: Any = result.latents
        else:
            decoded = self.vae.decode(self._vae_latents(result.latents).to(self.vae.dtype), return_dict=False)[0]
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput.from_loop(images, result)
