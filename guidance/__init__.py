"""Interchangeable guidance rules for diffusion sampling (pure torch; no pipeline code).

Build one by class (``APG(guidance_scale=7)``) or by name (``get_guidance("apg", guidance_scale=7)``,
``resolve_guidance("nlg+apg+tag")``); pass a list to compose (``[NLG(), APG(), TAG()]``).
"""

from guidance.base import Branch, Guidance, Network, NoiseContext, Step
from guidance.compose import ComposedGuidance
from guidance.registry import available_guidance, from_config, get_guidance, register, resolve_guidance
from guidance.cfg import CFG  # noqa: E402  (registration order: CFG first, it is the reference)
from guidance.apg import APG  # noqa: E402
from guidance.adaptive import AdaptiveGuidance  # noqa: E402
from guidance.linear_ag import LinearAG  # noqa: E402
from guidance.linear_ag_fit import LinearAGCoefficients, fit_linear_ag  # noqa: E402
from guidance.tag import TAG  # noqa: E402
from guidance.tag_cfg import TAGCFG  # noqa: E402
from guidance.nlg import NLG  # noqa: E402
from guidance.autoguidance import AutoGuidance  # noqa: E402
from guidance.gfcg import GFCG  # noqa: E402
from guidance.interval import GuidanceInterval  # noqa: E402
from guidance.schedule import ScaleSchedule  # noqa: E402
from guidance.dynamic import DynamicCFG  # noqa: E402
from guidance.ag_calibration import calibrate_threshold  # noqa: E402

#: marks this package as diffusion-guidance's ``guidance`` (another PyPI distribution installs a ``guidance`` too)
__distribution__ = "diffusion-guidance"

__all__ = [
    # the rules
    "APG",
    "AdaptiveGuidance",
    "AutoGuidance",
    "CFG",
    "DynamicCFG",
    "GFCG",
    "GuidanceInterval",
    "LinearAG",
    "NLG",
    "ScaleSchedule",
    "TAG",
    "TAGCFG",
    # building rules by name, config or composition
    "ComposedGuidance",
    "available_guidance",
    "from_config",
    "get_guidance",
    "resolve_guidance",
    # fitting and calibration
    "LinearAGCoefficients",
    "calibrate_threshold",
    "fit_linear_ag",
    # writing a rule of your own
    "Branch",
    "Guidance",
    "Network",
    "NoiseContext",
    "Step",
    "register",
]
