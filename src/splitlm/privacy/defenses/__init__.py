"""Built-in defenses; importing this package registers them by name."""

from splitlm.privacy.defenses.base import (
    DEFENSES,
    Defense,
    DefenseChain,
    DefenseContext,
    build_defenses,
    register_defense,
)

__all__ = ["DEFENSES", "Defense", "DefenseChain", "DefenseContext", "build_defenses", "register_defense"]
