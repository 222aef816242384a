"""The in-process transport: client and server objects in one process, messages passed by reference."""

from __future__ import annotations

from splitlm.transport.base import ByteMeter, Handler
from splitlm.transport.messages import Message


class InProcessTransport:
    """Calls the server's handler directly. Tensors are detached at the boundary in both directions."""

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.meter = ByteMeter()

    def request(self, message: Message) -> Message:
        outgoing = message.detached()
        self.meter.record(outgoing, "up")
        reply = self.handler(outgoing).detached()
        self.meter.record(reply, "down")
        return reply

    def close(self) -> None:
        pass
