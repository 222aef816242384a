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
    run_attack,
    score,
)

__all__ = [
    "ATTACKS",
    "Attack",
    "AttackContext",
    "Observation",
    "make_attack",
    "observations",
    "parse_options",
    "register_attack",
    "run_attack",
    "score",
]
