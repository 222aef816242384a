"""What crosses the cut: a ``Message`` of named tensors plus a few scalars.

Kinds, client -> server: ``forward`` (steps 3), ``backward`` (step 7), ``step`` (end of an optimizer step),
``eval`` (forward without training). Server -> client replies: ``activations`` (step 5), ``gradients``
(step 9), ``stepped``, ``loss`` (vanilla split: the server holds the labels' loss).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Scalar = int | float | str | bool

REQUEST_KINDS = ("forward", "backward", "step", "eval")
REPLY_KINDS = ("activations", "gradients", "stepped", "loss")


@dataclass
class Message:
    kind: str
    client_id: str
    step: int
    micro: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Scalar] = field(default_factory=dict)

    def payload_bytes(self) -> int:
        """Bytes of tensor data the message carries (what a wire must move, before any codec)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def detached(self) -> Message:
        """The same message with every tensor cut from its autograd graph: nothing crosses the cut but data."""
        return Message(
            self.kind,
            self.client_id,
            self.step,
            self.micro,
            {name: t.detach() for name, t in self.tensors.items()},
            dict(self.meta),
        )
