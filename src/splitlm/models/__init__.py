"""Step 1: model sources, per-architecture families, and the split into parts."""

from splitlm.models.families import FAMILIES, Family, family_for
from splitlm.models.sources import DEFAULT_MODEL, TINY_MODELS, ModelSource, resolve_model
from splitlm.models.split import SplitSpec, Stage, load_full_model, load_stage

__all__ = [
    "DEFAULT_MODEL",
    "FAMILIES",
    "TINY_MODELS",
    "Family",
    "ModelSource",
    "SplitSpec",
    "Stage",
    "family_for",
    "load_full_model",
    "load_stage",
    "resolve_model",
]
