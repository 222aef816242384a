"""Built-in attacks; importing this package registers them by name."""

from splitlm.privacy.attacks.base import (
    ATTACKS,
    Attack,
    AttackContext,
    Observation,
    make_attack,
    observations,
    parse_options,
    register_attack,
    results_folder,
    run_attack,
    score,
)
from splitlm.privacy.knowledge import THREAT_MODELS

# isort: split
# Importing the attack modules registers them by name (each imports only ``base`` and its siblings).
from splitlm.privacy.attacks import bisr, inversion, pidi, sip, tag  # noqa: F401

__all__ = [
    "ATTACKS",
    "THREAT_MODELS",
    "Attack",
    "AttackContext",
    "Observation",
    "make_attack",
    "observations",
    "parse_options",
    "register_attack",
    "results_folder",
    "run_attack",
    "score",
]
