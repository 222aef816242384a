"""The ``Transport`` interface and the byte meter every transport keeps."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from splitlm.transport.messages import Message

Handler = Callable[[Message], "Message | Future[Message]"]


@dataclass
class ByteMeter:
    """Exact tensor bytes moved in each direction, in total and per message kind."""

    up: int = 0
    down: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, message: Message, direction: str) -> None:
        size = message.payload_bytes()
        if direction == "up":
            self.up += size
        else:
            self.down += size
        self.by_kind[message.kind] += size

    def snapshot(self) -> tuple[int, int]:
        return self.up, self.down


class Transport(Protocol):
    """Moves a client's request to the server and returns the server's reply.

    Every transport has the same semantics: tensors arrive detached (the receiver makes its own leaves),
    and ``meter`` counts the bytes of every message in each direction.
    """

    meter: ByteMeter

    def request(self, message: Message) -> Message: ...

    def close(self) -> None: ...
