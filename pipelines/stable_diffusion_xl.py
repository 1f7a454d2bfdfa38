"""``StableDiffusionXLPipeline`` with interchangeable guidance; everything but the denoising loop is the parent's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionXLPipeline
from diffusers.pipelines.stable_diffusion_xl.pipeline_stable_diffusion_xl import retrieve_timesteps

from pipelines.common import GuidedPipelineOutput, check_steps, decode_float32, label_condition
from pipelines.common import pipeline_guidance, run_guided_loop
from pipelines.conditioning import BranchConditioning


class GuidedStableDiffusionXLPipeline(StableDiffusionXLPipeline):
    """Stable Diffusion XL with ``guidance=`` (a module, a registered name, or a list of them).

    Each branch carries SDXL's full conditioning: ``cond`` the prompt embeddings, pooled embeddings and micro-
    conditioning time ids; ``uncond`` the parent's negative ones (zeroed embeddings for an empty negative prompt when
    ``force_zeros_for_empty_prompt``, ``negative_original_size`` / ``negative_crops_coords_top_left`` /
    ``negative_target_size`` time ids). With ``guidance=None`` it is diffusers' CFG at ``guidance_scale`` (default
    5.0) and ``guidance_rescale``, and gives the parent's images. ``label_prompts`` (with ``target_labels``) defines a
    label set for labelled reference branches (GFCG), encoded once per call with the positive time ids.
    """

    def _vae_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """The parent's un-normalisation before the VAE decode (latent mean/std when the VAE config has them)."""
        config = self.vae.config
        if config.get("latents_mean") is not None and config.get("latents_std") is not None:
            mean = torch.tensor(config.latents_mean).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            std = torch.tensor(config.latents_std).view(1, -1, 1, 1).to(latents.device, latents.dtype)
            return latents * std / config.scaling_factor + mean
        return latents / config.scaling_factor

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> pixels in [-1, 1] for guidance rules, decoded in float32."""
        return decode_float32(self.vae, self._vae_latents(latents))

    def _decode_output(self, latents: torch.Tensor) -> torch.Tensor:
        """The final decode as the parent does it: in float32 for a float16 VAE with ``force_upcast``, else in the
        VAE's dtype."""
        if self.vae.dtype == torch.float16 and self.vae.config.force_upcast:
            return self._decode_pixels(latents)
        return self.vae.decode(self._vae_latents(latents).to(self.vae.dtype), return_dict=False)[0].float()

    def _time_ids(self, original: Any, crop: Any, target: Any, dtype: torch.dtype, projection_dim: int) -> torch.Tensor:
        return self._get_add_time_ids(original, crop, target, dtype=dtype, text_encoder_projection_dim=projection_dim)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        prompt_2: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        denoising_end: float | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        negative_prompt_2: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        pooled_prompt_embeds: torch.Tensor | None = None,
        negative_pooled_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        original_size: tuple[int, int] | None = None,
        crops_coords_top_left: tuple[int, int] = (0, 0),
        target_size: tuple[int, int] | None = None,
        negative_original_size: tuple[int, int] | None = None,
        negative_crops_coords_top_left: tuple[int, int] = (0, 0),
        negative_target_size: tuple[int, int] | None = None,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance: Any = None,
        label_prompts: Sequence[str] | None = None,
        target_labels: Sequence[int] | None = None,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        check_steps(num_inference_steps)
        rule = pipeline_guidance(guidance, guidance_scale, guidance_rescale, default_scale=5.0)
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("this UNet has a distilled guidance embedding (time_cond_proj_dim); guidance does not apply")
        height = height or self.default_sample_size * self.vae_scale_factor
        width = width or self.default_sample_size * self.vae_scale_factor
        original_size = original_size or (height, width)
        target_size = target_size or (height, width)
        self.check_inputs(
            prompt, prompt_2, height, width, None, negative_prompt, negative_prompt_2, prompt_embeds,
            negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds, None, None,
            list(callback_on_step_end_tensor_inputs),
        )
        self._guidance_scale = getattr(rule, "guidance_scale", 1.0)
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._denoising_end = denoising_end
        self._interrupt = False

        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        images_total = batch * num_images_per_prompt
        device = self._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        needs_uncond = "uncond" in rule.required_branches
        prompt_embeds, negative_prompt_embeds, pooled_prompt_embeds, negative_pooled_prompt_embeds = self.encode_prompt(
            prompt=prompt, prompt_2=prompt_2, device=device, num_images_per_prompt=num_images_per_prompt,
            do_classifier_free_guidance=needs_uncond, negative_prompt=negative_prompt,
            negative_prompt_2=negative_prompt_2, prompt_embeds=prompt_embeds,
            negative_prompt_embeds=negative_prompt_embeds, pooled_prompt_embeds=pooled_prompt_embeds,
            negative_pooled_prompt_embeds=negative_pooled_prompt_embeds, lora_scale=lora_scale, clip_skip=clip_skip,
        )
        if self.text_encoder_2 is None:
            projection_dim = int(pooled_prompt_embeds.shape[-1])
        else:
            projection_dim = self.text_encoder_2.config.projection_dim
        dtype = prompt_embeds.dtype
        add_time_ids = self._time_ids(original_size, crops_coords_top_left, target_size, dtype, projection_dim)
        if negative_original_size is not None and negative_target_size is not None:
            negative_time_ids = self._time_ids(
                negative_original_size, negative_crops_coords_top_left, negative_target_size, dtype, projection_dim
            )
        else:
            negative_time_ids = add_time_ids
        add_time_ids, negative_time_ids = add_time_ids.to(device), negative_time_ids.to(device)

        branches = {
            "cond": {
                "encoder_hidden_states": prompt_embeds,
                "added_cond_kwargs": {
                    "text_embeds": pooled_prompt_embeds.to(device),
                    "time_ids": add_time_ids.repeat(images_total, 1),
                },
            }
        }
        if needs_uncond:
            branches["uncond"] = {
                "encoder_hidden_states": negative_prompt_embeds,
                "added_cond_kwargs": {
                    "text_embeds": negative_pooled_prompt_embeds.to(device),
                    "time_ids": negative_time_ids.repeat(images_total, 1),
                },
            }

        def encode_labels(prompts: list[str]) -> dict[str, Any]:
            embeds, _, pooled, _ = self.encode_prompt(
                prompts, device=device, num_images_per_prompt=1, do_classifier_free_guidance=False,
                lora_scale=lora_scale, clip_skip=clip_skip,
            )
            added = {"text_embeds": pooled.to(device), "time_ids": add_time_ids.repeat(len(prompts), 1)}
            return {"encoder_hidden_states": embeds, "added_cond_kwargs": added}

        label_set, targets = label_condition(
            label_prompts, target_labels, batch, num_images_per_prompt, encode_labels, device
        )
        conditioning = BranchConditioning(branches, label_set, targets)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(
            images_total, self.unet.config.in_channels, height, width, dtype, device, generator, latents
        )
        if isinstance(denoising_end, float) and 0 < denoising_end < 1:
            train_steps = self.scheduler.config.num_train_timesteps
            cutoff = round(train_steps - denoising_end * train_steps)
            num_inference_steps = int((timesteps >= cutoff).sum())
            timesteps = timesteps[:num_inference_steps]
        self._num_timesteps = len(timesteps)
        if hasattr(self.scheduler, "set_begin_index"):
            self.scheduler.set_begin_index(0)
        unet = self.unet

        def model_fn(
            x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor, added_cond_kwargs: dict[str, Any]
        ) -> torch.Tensor:
            return unet(
                x, t, encoder_hidden_states=encoder_hidden_states, added_cond_kwargs=added_cond_kwargs,
                cross_attention_kwargs=cross_attention_kwargs, return_dict=False,
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
            eta=eta,
            decode=self._decode_pixels,
            callback_on_step_end=callback_on_step_end,
            callback_on_step_end_tensor_inputs=callback_on_step_end_tensor_inputs,
            callback_tensors={
                "prompt_embeds": prompt_embeds,
                "add_text_embeds": pooled_prompt_embeds,
                "add_time_ids": branches["cond"]["added_cond_kwargs"]["time_ids"],
            },
        )

        if output_type == "latent":
            images: Any = result.latents
        else:
            decoded = self._decode_output(result.latents)
            if self.watermark is not None:
                decoded = self.watermark.apply_watermark(decoded)
            images = self.image_processor.postprocess(decoded, output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return GuidedPipelineOutput.from_loop(images, result)
