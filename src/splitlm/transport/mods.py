"""The message pipeline: mods wrap what crosses the cut at steps 3, 5, 7 and 9, on both sides (Flower's mods).

A ``Mod`` has a client half and a server half; each defaults to passing messages through, so a mod overrides
only what it acts on:

- client: ``on_request(message)`` before a request leaves, ``on_reply(request, reply)`` after its reply
  arrives (``request`` as this mod passed it on);
- server: ``serve(message, call_next)``, around the handler (what it returns may be a future).

The client's ``Channel`` runs its mods in list order on a request and in reverse order on the reply; the
server's chain (``server_chain``) runs its mods in list order from the wire inwards. Every transport
(in-process, gRPC, Ray) is wrapped the same way, so a mod behaves identically whichever moves the bytes.
``splitlm.frameworks.pipeline`` builds both chains from a config, in this order::

    client code -> [defenses, detector, codec, meter] -> transport ~~> [codec, tap, attacker] -> server

Mods may change tensors differentiably (a defense that clips the smashed data); the client then
backpropagates the gradient it gets back through the last *differentiable* version of each tensor it sent
(``Exchange.sent``). Mods that are not differentiable (codecs) are thereby straight-through.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from splitlm.transport.base import Answer, ByteMeter, Handler, Transport
from splitlm.transport.messages import Message


class Mod:
    """A pass-through mod; subclasses override the hooks of the side(s) they act on."""

    name = "mod"

    def on_request(self, message: Message) -> Message:
        return message

    def on_reply(self, request: Message, reply: Message) -> Message:
        return reply

    def serve(self, message: Message, call_next: Handler) -> Answer:
        return call_next(message)


def server_chain(mods: Sequence[Mod], handler: Handler) -> Handler:
    """``handler`` wrapped by ``mods``: ``mods[0]`` sees a request first (nearest the wire), the handler last."""
    wrapped = handler
    for mod in reversed(mods):
        wrapped = _bind(mod, wrapped)
    return wrapped


def _bind(mod: Mod, call_next: Handler) -> Handler:
    def handle(message: Message) -> Answer:
        return mod.serve(message, call_next)

    handle.__qualname__ = f"{type(mod).__name__}.serve"
    return handle


@dataclass
class Exchange:
    """One request's round trip as the client code sees it."""

    reply: Message  # after every mod's on_reply
    sent: dict[str, torch.Tensor]  # the last differentiable version of each tensor sent (for the backward)


class Pending:
    """A request in flight. ``result()`` waits for the reply and runs the mods' reply hooks (once, in the
    caller's thread)."""

    def __init__(
        self, mods: Sequence[Mod], requests: list[Message], future: Future[Message], sent: dict[str, torch.Tensor]
    ) -> None:
        self._mods = mods
        self._requests = requests  # requests[i]: the request as mods[i] passed it on
        self._future = future
        self._sent = sent
        self._exchange: Exchange | None = None

    def done(self) -> bool:
        return self._future.done()

    def result(self, timeout: float | None = None) -> Exchange:
        if self._exchange is None:
            reply = self._future.result(timeout)
            for mod, request in zip(reversed(self._mods), reversed(self._requests), strict=True):
                reply = mod.on_reply(request, reply)
            self._exchange = Exchange(reply, self._sent)
        return self._exchange


class Channel:
    """A client's way to the server: its mods around a transport."""

    def __init__(self, transport: Transport, mods: Sequence[Mod] = ()) -> None:
        self.transport = transport
        self.mods = list(mods)

    def submit(self, message: Message) -> Pending:
        """Run the request hooks, hand the request to the transport, return at once."""
        sent = {name: t for name, t in message.tensors.items() if t.requires_grad}
        requests = []
        for mod in self.mods:
            message = mod.on_request(message)
            requests.append(message)
            sent.update({name: t for name, t in message.tensors.items() if t.requires_grad})
        return Pending(self.mods, requests, self.transport.submit(message), sent)

    def request(self, message: Message) -> Exchange:
        return self.submit(message).result()

    @property
    def meter(self) -> ByteMeter:
        """The meter mod's counts (a channel without one has nothing counted)."""
        for mod in self.mods:
            if isinstance(mod, MeterMod):
                return mod.meter
        return ByteMeter()

    def close(self) -> None:
        self.transport.close()


class MeterMod(Mod):
    """Counts the bytes of every request and reply as they travel: last in the client's chain, so encoded
    tensors count at their encoded size."""

    name = "meter"

    def __init__(self, meter: ByteMeter | None = None) -> None:
        self.meter = meter or ByteMeter()

    def on_request(self, message: Message) -> Message:
        self.meter.record(message, "up")
        return message

    def on_reply(self, request: Message, reply: Message) -> Message:
        self.meter.record(reply, "down", about=request.kind)
        return reply
