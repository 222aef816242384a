"""Parameter-efficient fine-tuning of each part through the ``peft`` library."""

from splitlm.peft.lora import (
    canonical_name,
    load_trainable,
    load_trainable_state,
    make_trainable,
    merged,
    save_trainable,
    trainable_parameters,
    trainable_state,
)

__all__ = [
    "canonical_name",
    "load_trainable",
    "load_trainable_state",
    "make_trainable",
    "merged",
    "save_trainable",
    "trainable_parameters",
    "trainable_state",
]
