"""The ``Transport`` interface and the byte meter.

A transport moves a request to the server and brings back its reply, nothing else: encoding, defenses,
recording and byte counting are mods (``transport/mods.py``) that wrap it the same way for every transport.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from splitlm.transport.messages import Message

Answer = Message | Future[Message]
Handler = Callable[[Message], Answer]

EVAL_KINDS = ("eval",)  # requests (and their replies) that evaluate rather than train
# Messages that drive a remote client rather than train through the cut: a server's commands (``cmd:*``, e.g. the
# client-side state for FedAvg) and a client's answers to them, its hello and its progress reports.
CONTROL_KINDS = ("hello", "welcome", "progress", "done")


def is_control(kind: str) -> bool:
    return kind.startswith("cmd:") or kind in CONTROL_KINDS


@dataclass
class ByteMeter:
    """Exact tensor bytes moved in each direction.

    Training traffic (``up``, ``down``) and evaluation traffic (``eval_up``, ``eval_down``) are kept apart, so a
    client that evaluates for everyone does not look chattier than the others. A reply is counted with the
    request it answers. What drives a remote client (``CONTROL_KINDS``: commands, their answers) is neither:
    ``control_up``, ``control_down`` (a meter in the client's pipeline never sees any). ``by_kind`` holds the bytes
    of each message kind, both directions.
    """

    up: int = 0
    down: int = 0
    eval_up: int = 0
    eval_down: int = 0
    control_up: int = 0
    control_down: int = 0
    by_kind: dict[str, int] = field(default_factory=lambda: defaultdict(int))

    def record(self, message: Message, direction: str, about: str | None = None) -> None:
        """Count ``message`` going ``up`` (client -> server) or ``down``; ``about``: the request kind it answers."""
        size = message.payload_bytes()
        kind = about or message.kind
        up = direction == "up"
        if is_control(kind):
            if up:
                self.control_up += size
            else:
                self.control_down += size
        elif kind in EVAL_KINDS:
            if up:
                self.eval_up += size
            else:
                self.eval_down += size
        elif up:
            self.up += size
        else:
            self.down += size
        self.by_kind[message.kind] += size

    def snapshot(self) -> tuple[int, int]:
        """Training bytes (up, down) so far."""
        return self.up, self.down

    def eval_snapshot(self) -> tuple[int, int]:
        return self.eval_up, self.eval_down

    def control_snapshot(self) -> tuple[int, int]:
        return self.control_up, self.control_down


class Transport(Protocol):
    """Moves a client's request to the server and returns the server's reply.

    Every transport has the same semantics: tensors arrive detached (the receiver makes its own leaves);
    ``submit`` returns at once with a future, so several requests may be in flight; ``request`` waits.
    A reply of kind ``error`` becomes a ``ProtocolError`` raised by the future.
    """

    def submit(self, message: Message) -> Future[Message]: ...

    def request(self, message: Message) -> Message: ...

    def close(self) -> None: ...


def resolved(answer: Answer) -> Future[Message]:
    """An answer as a future (a plain message becomes an already finished one)."""
    if isinstance(answer, Future):
        return answer
    future: Future[Message] = Future()
    future.set_result(answer)
    return future


def then(answer: Answer, fn: Callable[[Message], Message]) -> Answer:
    """``fn`` applied to an answer: now if it is a message, when it arrives if it is a future.

    An error of the answer (or of ``fn``) reaches whoever waits on the returned future.
    """
    if not isinstance(answer, Future):
        return fn(answer)
    mapped: Future[Message] = Future()

    def relay(done: Future[Message]) -> None:
        try:
            mapped.set_result(fn(done.result()))
        except BaseException as error:  # the handler's error, a cancellation, or fn's own
            mapped.set_exception(error)

    answer.add_done_callback(relay)
    return mapped
