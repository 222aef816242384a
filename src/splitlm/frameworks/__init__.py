"""Frameworks: the order of pipeline steps across clients and rounds, each a short recipe."""

from splitlm.frameworks import centralized, recipes, sl  # noqa: F401  (register the recipes)
from splitlm.frameworks.registry import FRAMEWORKS, register, run_framework

__all__ = ["FRAMEWORKS", "register", "run_framework"]
