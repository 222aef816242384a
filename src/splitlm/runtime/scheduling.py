"""The server's request queue: which waiting request runs next on the shared trunk.

A policy is a small container with ``push`` / ``pop`` / ``len``; policies register by name in ``POLICIES``
and ``server.policy`` in a config picks one. ``fifo`` serves requests in arrival order; ``round_robin`` takes
one request per client in turn, so a chatty client cannot starve the others.
"""

from __future__ import annotations

from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Protocol

from splitlm.registry import Registry
from splitlm.transport.messages import Message


@dataclass
class Request:
    message: Message
    future: Future[Message] = field(default_factory=Future)
    action: Callable[[], None] | None = None  # internal work run in the queue's order instead of a handler


class Policy(Protocol):
    def push(self, request: Request) -> None: ...

    def pop(self) -> Request: ...

    def __len__(self) -> int: ...


POLICIES = Registry[Callable[[], Policy]]("policy", "server.policy")
register_policy = POLICIES.register


def make_policy(name: str) -> Policy:
    return POLICIES.get(name)()


@register_policy("fifo")
class Fifo:
    def __init__(self) -> None:
        self._queue: deque[Request] = deque()

    def push(self, request: Request) -> None:
        self._queue.append(request)

    def pop(self) -> Request:
        return self._queue.popleft()

    def __len__(self) -> int:
        return len(self._queue)


@register_policy("round_robin")
class RoundRobin:
    def __init__(self) -> None:
        self._queues: OrderedDict[str, deque[Request]] = OrderedDict()

    def push(self, request: Request) -> None:
        self._queues.setdefault(request.message.client_id, deque()).append(request)

    def pop(self) -> Request:
        client, queue = next(iter(self._queues.items()))
        request = queue.popleft()
        del self._queues[client]
        if queue:  # the client goes to the back of the line
            self._queues[client] = queue
        return request

    def __len__(self) -> int:
        return sum(len(q) for q in self._queues.values())
