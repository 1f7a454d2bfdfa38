"""diffusers integration: ``attach(pipe, rule)`` for diffusers' own pipelines, our loop for class-conditional models,
and thin ``Guided*Pipeline`` subclasses that take ``guidance=``."""

import guidance as _guidance

if getattr(_guidance, "__distribution__", None) != "diffusion-guidance":
    raise ImportError(
        f"'import guidance' found {getattr(_guidance, '__file__', None) or 'a namespace package'}, which is not "
        "diffusion-guidance's guidance package: another installed distribution uses the top-level name 'guidance'. "
        "Install diffusion-guidance in its own virtual environment"
    )

from pipelines.attach import Attachment, attach  # noqa: E402
from pipelines.class_conditional import GuidedClassConditionalPipeline  # noqa: E402
from pipelines.common import GuidedPipelineOutput  # noqa: E402
from pipelines.stable_diffusion import GuidedStableDiffusionPipeline  # noqa: E402
from pipelines.stable_diffusion_3 import GuidedStableDiffusion3Pipeline  # noqa: E402
from pipelines.stable_diffusion_xl import GuidedStableDiffusionXLPipeline  # noqa: E402

#: marks this package as diffusion-guidance's ``pipelines`` (a common top-level name on PyPI)
__distribution__ = "diffusion-guidance"

__all__ = [
    "Attachment",
    "GuidedClassConditionalPipeline",
    "GuidedPipelineOutput",
    "GuidedStableDiffusion3Pipeline",
    "GuidedStableDiffusionPipeline",
    "GuidedStableDiffusionXLPipeline",
    "attach",
]
