"""Non-IID remedies (survey §3), one module each, registered in ``REMEDIES`` and configured under ``remedies``."""

from splitlm.remedies import align_kl, ema, logit_adjustment, multi_exit, prune, replay, updates
from splitlm.remedies.base import REMEDIES, ClientSetup, Remedy, StepRows, build_remedies

__all__ = [
    "REMEDIES",
    "ClientSetup",
    "Remedy",
    "StepRows",
    "align_kl",
    "build_remedies",
    "ema",
    "logit_adjustment",
    "multi_exit",
    "prune",
    "replay",
    "updates",
]
