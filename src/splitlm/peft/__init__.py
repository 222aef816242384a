"""Parameter-efficient fine-tuning of each part through the ``peft`` library."""

from splitlm.peft.lora import (
    adapters_client,
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
    "adapters_client",
    "canonical_name",
    "load_trainable",
    "load_trainable_state",
    "make_trainable",
    "merged",
    "save_trainable",
    "trainable_parameters",
    "trainable_state",
]
