"""diffusers integration: ``attach(pipe, rule)`` for diffusers' own pipelines, our loop for class-conditional models,
and thin ``Guided*Pipeline`` subclasses that take ``guidance=``."""

from pipelines.attach import Attachment, attach
from pipelines.class_conditional import GuidedClassConditionalPipeline
from pipelines.common import GuidedPipelineOutput
from pipelines.conditioning import BranchConditioning
from pipelines.loop import LoopResult, denoise
from pipelines.stable_diffusion import GuidedStableDiffusionPipeline
from pipelines.stable_diffusion_3 import GuidedStableDiffusion3Pipeline
from pipelines.stable_diffusion_xl import GuidedStableDiffusionXLPipeline
from pipelines.schedulers import SchedulerAdapter, scheduler_family

__all__ = [
    "Attachment",
    "BranchConditioning",
    "GuidedClassConditionalPipeline",
    "GuidedPipelineOutput",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionXLPipeline",
    "LoopResult",
    "SchedulerAdapter",
    "attach",
    "denoise",
    "scheduler_family",
]
