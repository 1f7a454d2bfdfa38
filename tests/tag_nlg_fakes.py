"""Fixed fake models for the TAG / NLG tests: a deterministic nonlinear denoiser and a tiny class-conditional UNet."""

from __future__ import annotations

import math

import torch
from diffusers import UNet2DModel

from pipelines.class_conditional import GuidedClassConditionalPipeline
from pipelines.conditioning import BranchConditioning

NULL_LABEL = 10


class FakeDenoiser:
    """``out = 0.6 x + 0.4 tanh(W x) + 0.3 e[label] + t / 4000`` per sample (flattened), any prediction type.

    A fixed, deterministic, nonlinear function of input, timestep and label (label ``NULL_LABEL`` is unconditional),
    so trajectories are reproducible and the branches differ.
    """

    def __init__(self, shape: tuple[int, ...], seed: int = 0, dtype: torch.dtype = torch.float64) -> None:
        generator = torch.Generator().manual_seed(seed)
        dim = math.prod(shape)
        self.shape = shape
        self.weight = (torch.randn(dim, dim, generator=generator, dtype=torch.float64) / math.sqrt(dim)).to(dtype)
        self.embedding = torch.randn(NULL_LABEL + 1, dim, generator=generator, dtype=torch.float64).to(dtype)
        self.embedding[NULL_LABEL] = 0

    def __call__(self, x: torch.Tensor, t: torch.Tensor, class_labels: torch.Tensor | None = None) -> torch.Tensor:
        flat = x.reshape(x.shape[0], -1)
        out = 0.6 * flat + 0.4 * torch.tanh(flat @ self.weight.to(x.dtype).T) + float(t) / 4000
        if class_labels is not None:
            out = out + 0.3 * self.embedding.to(x.dtype)[class_labels]
        return out.reshape(x.shape)


def label_conditioning(labels: torch.Tensor) -> BranchConditioning:
    """``cond`` (the labels) and ``uncond`` (the null label) branches for :class:`FakeDenoiser`."""
    return BranchConditioning(
        {"cond": {"class_labels": labels}, "uncond": {"class_labels": torch.full_like(labels, NULL_LABEL)}},
        target_labels=labels,
    )


def tiny_class_pipeline(scheduler: object, null_class_label: int | None = NULL_LABEL) -> GuidedClassConditionalPipeline:
    """A random 8x8x1 class-conditional ``UNet2DModel`` (labels 0-9, null label 10) in the guided pipeline."""
    torch.manual_seed(0)
    unet = UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, num_class_embeds=NULL_LABEL + 1, block_out_channels=(8, 16),
        layers_per_block=1, down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
        norm_num_groups=4,
    ).eval()
    pipe = GuidedClassConditionalPipeline(scheduler=scheduler, unet=unet, null_class_label=null_class_label)
    pipe.set_progress_bar_config(disable=True)
    return pipe
