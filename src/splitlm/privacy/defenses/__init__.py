"""Built-in defenses; importing this package registers them by name."""

# Each built-in defense module registers itself on import; each imports ``base`` itself, so order is free.
from splitlm.privacy.defenses import (  # noqa: F401
    adversarial,
    dualguard,
    label_dp,
    mi_bottleneck,
    noise,
    nopeek,
    text_obfuscator,
    token,
)
from splitlm.privacy.defenses.base import (
    DEFENSES,
    Defense,
    DefenseChain,
    DefenseContext,
    InputDefense,
    MessageDefense,
    build_defenses,
    token_texts,
)

__all__ = [
    "DEFENSES",
    "Defense",
    "DefenseChain",
    "DefenseContext",
    "InputDefense",
    "MessageDefense",
    "build_defenses",
    "token_texts",
]
