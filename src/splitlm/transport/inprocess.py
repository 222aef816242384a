"""The in-process transport: client and server objects in one process, messages passed by reference."""

from __future__ import annotations

from concurrent.futures import Future

from splitlm.errors import SplitLMError
from splitlm.transport.base import Handler, resolved, then
from splitlm.transport.messages import Message


class InProcessTransport:
    """Calls the server's handler directly. Tensors are detached at the boundary in both directions.

    The handler may answer with a ``Future`` (a server with a request queue): ``submit`` returns it at once
    and ``request`` waits for it.
    """

    def __init__(self, handler: Handler) -> None:
        self.handler = handler

    def submit(self, message: Message) -> Future[Message]:
        try:
            answer = self.handler(message.detached())
        except SplitLMError as error:  # a handler that refuses at once: the caller learns it from the future
            failed: Future[Message] = Future()
            failed.set_exception(error)
            return failed
        return resolved(then(answer, Message.detached))

    def request(self, message: Message) -> Message:
        return self.submit(message).result()

    def close(self) -> None:
        pass
