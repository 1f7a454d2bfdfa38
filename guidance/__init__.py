"""Interchangeable guidance rules for diffusion sampling (pure torch; no pipeline code).

Build one by class (``APG(guidance_scale=7)``) or by name (``get_guidance("apg", guidance_scale=7)``); pass a list to
compose (``[NLG(), APG(), TAG()]``).
"""

from guidance.base import Branch, Guidance, Network, NoiseContext, Step
from guidance.compose import ComposedGuidance
from guidance.registry import available_guidance, from_config, get_guidance, register, resolve_guidance
from guidance.cfg import CFG  # noqa: E402  (registration order: CFG first, it is the reference)
from guidance.apg import APG  # noqa: E402
from guidance.adaptive import AdaptiveGuidance  # noqa: E402
from guidance.linear_ag import LinearAG  # noqa: E402
from guidance.tag import TAG, TAGCFG  # noqa: E402
from guidance.nlg import NLG  # noqa: E402
from guidance.autoguidance import AutoGuidance  # noqa: E402
from guidance.gfcg import GFCG  # noqa: E402

__all__ = [
    "APG",
    "AdaptiveGuidance",
    "AutoGuidance",
    "CFG",
    "GFCG",
    "LinearAG",
    "NLG",
    "TAG",
    "TAGCFG",
    "Branch",
    "ComposedGuidance",
    "Guidance",
    "Network",
    "NoiseContext",
    "Step",
    "available_guidance",
    "from_config",
    "get_guidance",
    "register",
    "resolve_guidance",
]
