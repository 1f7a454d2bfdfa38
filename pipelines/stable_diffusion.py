"""``StableDiffusionPipeline`` with interchangeable guidance; everything but the denoising loop is the parent's."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion import retrieve_timesteps

from pipelines.common import GuidedPipelineOutput, check_steps, decode_float32, label_condition
from pipelines.common import pipeline_guidance, run_guided_loop
from pipelines.conditioning import BranchConditioning


class GuidedStableDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion 1.x/2.x with ``guidance=`` (a module, a registered name, or a list of them).

    With ``guidance=None`` it is diffusers' CFG at ``guidance_scale`` (and ``guidance_rescale``), and gives the parent's
    images. ``label_prompts`` (with ``target_labels``) defines a label set for labelled reference branches (GFCG):
    their embeddings are encoded once per call.
    """

    def _decode_pixels(self, latents: torch.Tensor) -> torch.Tensor:
        """Denoised latents -> pixels in [-1, 1] for guidance rules, decoded in float32."""
        return decode_float32(self.vae, latents / self.vae.config.scaling_factor)

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        timesteps: list[int] | None = None,
        sigmas: list[float] | None = None,
        guidance_scale: float | None = None,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        guidance_rescale: float = 0.0,
        clip_skip: int | None = None,
        callback_on_step_end: Callable[..., dict[str, torch.Tensor]] | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
        guidance: Any = None,
        label_prompts: Sequence[str] | None = None,
        target_labels: Sequence[int] | None = None,
    ) -> GuidedPipelineOutput | tuple[Any, ...]:
        check_steps(num_inference_steps)
        rule = pipeline_guidance(guidance, guidance_scale, guidance_rescale)
        if self.unet.config.time_cond_proj_dim is not None:
            raise ValueError("this UNet has a distilled guidance embedding (time_cond_proj_dim); guidance does not apply")
        size = self.unet.config.sample_size
        size = (size, size) if isinstance(size, int) else size
        height = height or size[0] * self.vae_scale_factor
        width = width or size[1] * self.vae_scale_factor
        self.check_inputs(
            prompt, height, width, None, negative_prompt, prompt_embeds, negative_prompt_embeds, None, None,
            list(callback_on_step_end_tensor_inputs),
        )
        self._guidance_scale = getattr(rule, "guidance_scale", 1.0)
        self._guidance_rescale = guidance_rescale
        self._clip_skip = clip_skip
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False

        batch = 1 if isinstance(prompt, str) else len(prompt) if prompt is not None else prompt_embeds.shape[0]
        device = self._execution_device
        lora_scale = (cross_attention_kwargs or {}).get("scale")
        needs_uncond = "uncond" in rule.required_branches
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, needs_uncond, negative_prompt,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
            lora_scale=lora_scale, clip_skip=clip_skip,
        )
        branches = {"cond": {"encoder_hidden_states": prompt_embeds}}
        if needs_uncond:
            branches["uncond"] = {"encoder_hidden_states": negative_prompt_embeds}

        def encode_labels(prompts: list[str]) -> dict[str, torch.Tensor]:
            embeds, _ = self.encode_prompt(prompts, device, 1, False, lora_scale=lora_scale, clip_skip=clip_skip)
            return {"encoder_hidden_states": embeds}

        label_set, targets = label_condition(
            label_prompts, target_labels, batch, num_images_per_prompt, encode_labels, device
        )
        conditioning = BranchConditioning(branches, label_set, targets)

        timesteps, num_inference_steps = retrieve_timesteps(self.scheduler, num_inference_steps, device, timesteps, sigmas)
        latents = self.prepare_latents(
            batch * num_images_per_prompt, self.unet.config.in_channels, height, width,
            prompt_embeds.dtype, device, generator, latents,
        )
        self._num_timesteps = len(timesteps)
        unet = self.unet

        def model_fn(x: torch.Tensor, t: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
            return unet(
                x, t, encoder_hidden_states=encoder_hidden_states,
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
            callback_tensors={"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds},
        )

        nsfw = None
        if output_type == "latent":
            images: Any = result.latents
        else:
            decoded = self.vae.decode(result.latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)[0]
            decoded, nsfw = self.run_safety_checker(decoded, device, prompt_embeds.dtype)
            denormalize = [True] * decoded.shape[0] if nsfw is None else [not flagged for flagged in nsfw]
            images = self.image_processor.postprocess(decoded, output_type=output_type, do_denormalize=denormalize)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images, nsfw)
        return GuidedPipelineOutput.from_loop(images, result, nsfw)
