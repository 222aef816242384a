"""The in-process transport: client and server objects in one process, messages passed by reference."""

from __future__ import annotations

from concurrent.futures import Future

from splitlm.transport.base import ByteMeter, Handler
from splitlm.transport.messages import Message


class InProcessTransport:
    """Calls the server's handler directly. Tensors are detached at the boundary in both directions.

    The handler may answer with a ``Future`` (a server with a request queue): the call then waits for it.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler
        self.meter = ByteMeter()

    def request(self, message: Message) -> Message:
        outgoing = message.detached()
        self.meter.record(outgoing, "up")
        answer = self.handler(outgoing)
        reply = (answer.result() if isinstance(answer, Future) else answer).detached()
        self.meter.record(reply, "down")
        return reply

    def close(self) -> None:
        pass
