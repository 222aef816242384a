"""What crosses the cut: a ``Message`` of named tensors plus a few scalars.

Kinds, client -> server: ``forward`` (step 3), ``backward`` (step 7), ``step`` (end of an optimizer step),
``eval`` (forward without training). Server -> client replies: ``activations`` (step 5), ``gradients``
(step 9), ``stepped``, ``loss`` (vanilla split: the server holds the labels' loss).

A tensor may travel encoded: ``codecs[name]`` then names the codec (``transport/codecs.py``) whose parts are
stored under ``name`` and ``name#<part>``; the receiving side's codec mod decodes it before anyone reads it.
A request carries an id (``meta["rid"]``) that its reply repeats, so several requests can be in flight on
one stream.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

Scalar = int | float | str | bool

REQUEST_KINDS = ("forward", "backward", "step", "eval")
REPLY_KINDS = ("activations", "gradients", "stepped", "loss")
# Which reply kinds answer each request kind.
ANSWERS = {
    "forward": ("activations", "loss"),
    "eval": ("activations", "loss"),
    "backward": ("gradients",),
    "step": ("stepped",),
}
RID = "rid"  # meta key of a request's id, echoed by its reply
# Kinds that may carry a trainable state (an adapter's or a client side's tensors, one tensor per LoRA matrix or
# trained weight): the server's ``cmd:set_state``, a client's ``done`` (its reply to ``cmd:get_state``) and the
# Ray driver's ``state``. Their tensor count follows from the model and the run (``wire.Limits.max_state_tensors``).
STATE_KINDS = frozenset({"cmd:set_state", "done", "state"})


@dataclass
class Message:
    kind: str
    client_id: str
    step: int
    micro: int = 0
    tensors: dict[str, torch.Tensor] = field(default_factory=dict)
    meta: dict[str, Scalar] = field(default_factory=dict)
    codecs: dict[str, str] = field(default_factory=dict)  # tensor name -> codec it is encoded with

    def payload_bytes(self) -> int:
        """Bytes of tensor data the message carries (what a wire moves: encoded tensors at their encoded size)."""
        return sum(t.numel() * t.element_size() for t in self.tensors.values())

    def replace(self, tensors: dict[str, torch.Tensor] | None = None, **meta: Scalar) -> Message:
        """A copy with other tensors and/or extra meta (codecs kept); the original is left untouched."""
        return Message(
            self.kind,
            self.client_id,
            self.step,
            self.micro,
            dict(self.tensors) if tensors is None else tensors,
            {**self.meta, **meta},
            dict(self.codecs),
        )

    def detached(self) -> Message:
        """The same message with every tensor cut from its autograd graph: nothing crosses the cut but data."""
        return self.replace({name: t.detach() for name, t in self.tensors.items()})

    @property
    def key(self) -> tuple[str, int, int]:
        """(client id, step, micro-batch): which piece of work the message belongs to."""
        return self.client_id, self.step, self.micro
