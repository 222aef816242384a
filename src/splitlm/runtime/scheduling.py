"""The server's request queue: which waiting request runs next on the shared trunk.

A policy is a small container with ``push`` / ``pop`` / ``len``; policies register by name in ``POLICIES``
and ``server.policy`` in a config picks one. A policy class may declare ``problems(config, framework)``: the
frameworks and settings it cannot work with, one line each (``policy_problems``, collected by ``Framework.check``).

- ``fifo``: arrival order.
- ``round_robin``: one request per client in turn, so a chatty client cannot starve the others.
- ``straggler_first`` (PipeSFL, survey §4.2.2): the client furthest behind first, i.e. the request with the
  lowest training step (``message.step``), so stragglers catch up; ties in arrival order.
- ``longest_backward_first`` (Chen et al., survey §4.2.2): backward passes before anything else, the one with
  the longest expected backward first (the server's ``cost`` estimate: the trunk blocks the client's route runs
  times its tokens), as the client that waits for it has the most left to do; forwards, steps and evals
  after them in arrival order.
- ``dissimilar_first`` (Hourglass's dissimilar priority scheduling, survey §3.1.2): among training forwards, the
  one whose smashed data differs most from what the trunk trained on lately, so each update step carries more
  new information under heterogeneous data. Each forward's ``hidden`` (B, T, d) is summarised as its mean over
  real tokens (``attention_mask``) and hashed by SimHash (the signs of ``SIMHASH_BITS`` fixed random
  projections, seeded per width, never from the global RNG); the forward with the smallest summed similarity
  (bits minus Hamming distance) to the last ``SIMHASH_WINDOW`` served forwards' hashes goes first, ties in
  arrival order. Backwards, steps and evals go before any forward, in arrival order among themselves: a client
  waiting for its gradient or its step should not wait on another's forward, and evaluation does not train. A
  forward whose ``hidden`` cannot be summarised (missing, encoded, malformed, not finite) has no hash and counts
  as the most dissimilar: it goes first among forwards, so the server rejects it without delaying the others.

Two rules hold for every policy (``_Queue``):

- ``pop(admissible)`` serves only requests ``admissible`` accepts (the server's back-pressure holds training
  forwards back while ``server.max_pending`` graphs wait for their backward); the others wait, never dropped.
  ``pop`` returns None when no waiting request may be served now.
- An internal action (``Request.action``: forget, abandon, snapshot, restore) keeps its place: it runs after
  every admissible request queued before it, and nothing queued after it runs before it. A request that is
  inadmissible when the action comes up does not hold it back (the action may be what frees it).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

from splitlm.registry import Registry
from splitlm.transport.messages import Message


@dataclass(eq=False)
class Request:
    message: Message
    future: Future[Message] = field(default_factory=Future)
    action: Callable[[], None] | None = None  # internal work run in the queue's order instead of a handler
    queued_at: float = field(default_factory=time.monotonic)  # for the server's waiting-time statistics


Admissible = Callable[[Request], bool]
Cost = Callable[[Request], float]  # expected time of a request, in any unit (longest_backward_first)


def request_tokens(request: Request) -> int:
    """Tokens a backward carries gradients for (batch x sequence of its ``grad``; 0 without one)."""
    grad = request.message.tensors.get("grad")
    return math.prod(grad.shape[:-1]) if grad is not None and grad.dim() >= 2 else 0


class Policy(Protocol):
    def push(self, request: Request) -> None: ...

    def pop(self, admissible: Admissible | None = None) -> Request | None: ...

    def __len__(self) -> int: ...


POLICIES = Registry[Callable[..., Policy]]("policy", "server.policy")
register_policy = POLICIES.register


def make_policy(name: str, cost: Cost | None = None) -> Policy:
    """A fresh queue of policy ``name``; ``cost`` estimates a request's duration for policies that use one."""
    return POLICIES.get(name)(cost)


def policy_problems(config: Any, framework: Any) -> list[str]:
    """What ``config.server.policy`` cannot work with in ``config`` under ``framework`` (a ``Framework``): its own
    ``problems``, if it declares any; an unknown name is the registry's problem, reported elsewhere."""
    name = config.server.policy
    if name not in POLICIES:
        return []
    problems = getattr(POLICIES.get(name), "problems", None)
    return list(problems(config, framework)) if problems is not None else []


class _Queue:
    """What every policy shares: arrival order, admissibility and internal actions keeping their place. A
    policy only says which of the requests that may run now goes first (``_choose``)."""

    def __init__(self, cost: Cost | None = None) -> None:
        self.cost = cost or request_tokens
        self._waiting: list[Request] = []  # arrival order

    @classmethod
    def problems(cls, config: Any, framework: Any) -> list[str]:
        """What this policy cannot work with in ``config`` under ``framework``, one line each (none here)."""
        return []

    def push(self, request: Request) -> None:
        self._waiting.append(request)

    def pop(self, admissible: Admissible | None = None) -> Request | None:
        barrier = next((i for i, r in enumerate(self._waiting) if r.action is not None), len(self._waiting))
        ready = [i for i in range(barrier) if admissible is None or admissible(self._waiting[i])]
        if ready:
            index = self._choose(ready)
        elif barrier < len(self._waiting):
            index = barrier  # every request before the action is held back: the action goes now
        else:
            return None
        request = self._waiting.pop(index)
        self._served(request)
        return request

    def _choose(self, ready: list[int]) -> int:
        """The index (into ``_waiting``) of the request to serve among ``ready`` (ascending, non-empty)."""
        return ready[0]

    def _served(self, request: Request) -> None:
        """Bookkeeping after ``request`` left the queue."""

    def __len__(self) -> int:
        return len(self._waiting)


@register_policy("fifo")
class Fifo(_Queue):
    pass


@register_policy("round_robin")
class RoundRobin(_Queue):
    def __init__(self, cost: Cost | None = None) -> None:
        super().__init__(cost)
        self._turns: OrderedDict[str, None] = OrderedDict()  # clients with waiting requests, next turn first

    def push(self, request: Request) -> None:
        super().push(request)
        if request.action is None:
            self._turns.setdefault(request.message.client_id, None)

    def _choose(self, ready: list[int]) -> int:
        first: dict[str, int] = {}
        for index in ready:  # each client's earliest request that may run
            first.setdefault(self._waiting[index].message.client_id, index)
        return next(first[client] for client in self._turns if client in first)

    def _served(self, request: Request) -> None:
        client = request.message.client_id
        if request.action is not None or client not in self._turns:
            return
        del self._turns[client]
        if any(r.action is None and r.message.client_id == client for r in self._waiting):
            self._turns[client] = None  # the client goes to the back of the line


@register_policy("straggler_first")
class StragglerFirst(_Queue):
    def _choose(self, ready: list[int]) -> int:
        return min(ready, key=lambda i: (self._waiting[i].message.step, i))


@register_policy("longest_backward_first")
class LongestBackwardFirst(_Queue):
    def _choose(self, ready: list[int]) -> int:
        backwards = [i for i in ready if self._waiting[i].message.kind == "backward"]
        if not backwards:
            return ready[0]
        return min(backwards, key=lambda i: (-self.cost(self._waiting[i]), i))


SIMHASH_BITS = 32  # random hyperplanes of dissimilar_first's locality-sensitive hash
SIMHASH_WINDOW = 8  # served forwards whose hashes count as "recent"
SIMHASH_SEED = 0x5EED  # fixes the hyperplanes of each width: the same data hashes the same in every run


def summarise_hidden(message: Message) -> torch.Tensor | None:
    """The mean over real tokens of a forward's ``hidden`` (d,) in float32 on the CPU, or None when it has no
    usable one (missing, encoded, not (B, T, d), a mask of another shape, not finite): the server rejects such a
    request itself, so the policy must not fail on it first."""
    hidden = message.tensors.get("hidden")
    if hidden is None or "hidden" in message.codecs or hidden.dim() != 3 or hidden.numel() == 0:
        return None
    hidden = hidden.detach().float()
    mask = message.tensors.get("attention_mask")
    if mask is None or "attention_mask" in message.codecs or mask.shape not in (hidden.shape[:2], (1, hidden.shape[1])):
        summary = hidden.mean(dim=(0, 1))
    else:
        weights = mask.to(device=hidden.device, dtype=hidden.dtype).expand(hidden.shape[:2]).unsqueeze(-1)
        real = weights.sum()
        summary = (hidden * weights).sum(dim=(0, 1)) / real if real > 0 else hidden.mean(dim=(0, 1))
    summary = summary.cpu()
    return summary if bool(torch.isfinite(summary).all()) else None


@register_policy("dissimilar_first")
class DissimilarFirst(_Queue):
    @classmethod
    def problems(cls, config: Any, framework: Any) -> list[str]:
        """Reordering needs several clients' smashed data waiting at the server at once: none without a server,
        nor where the framework has it serve one client at a time (``Framework.one_client_at_a_time``)."""
        name = framework.name
        if not framework.split:
            return [
                f"server.policy=dissimilar_first: orders the clients' smashed data waiting at the server; "
                f"framework.name={name} has no server, so set server.policy=fifo"
            ]
        serial = framework.one_client_at_a_time(config)
        if serial is None:
            return []
        how, instead = serial
        return [
            f"server.policy=dissimilar_first: reorders the smashed data of clients waiting at once; "
            f"framework.name={name} {how}: {f'{instead}, ' if instead else ''}use psl, sflv1 or gsfl, or set "
            "server.policy=fifo"
        ]

    def __init__(self, cost: Cost | None = None) -> None:
        super().__init__(cost)
        self._planes: dict[int, torch.Tensor] = {}  # width d -> (SIMHASH_BITS, d) hyperplanes, made on first use
        self._hashes: dict[int, int | None] = {}  # id(request) -> hash of a waiting forward (None: no usable hidden)
        self._recent: deque[int] = deque(maxlen=SIMHASH_WINDOW)  # hashes of the last forwards served

    def push(self, request: Request) -> None:
        super().push(request)
        if request.action is None and request.message.kind == "forward":  # hashed once, not at every pop
            self._hashes[id(request)] = self._hash(request.message)

    def _hash(self, message: Message) -> int | None:
        summary = summarise_hidden(message)
        if summary is None:
            return None
        width = summary.shape[0]
        if width not in self._planes:
            generator = torch.Generator().manual_seed(SIMHASH_SEED + width)
            self._planes[width] = torch.randn(SIMHASH_BITS, width, generator=generator)
        bits = (self._planes[width] @ summary > 0).tolist()
        return sum(1 << i for i, bit in enumerate(bits) if bit)

    def _similarity(self, index: int) -> int:
        """Summed similarity (matching bits) of a waiting forward to the recent hashes; -1 without a hash."""
        code = self._hashes.get(id(self._waiting[index]))
        if code is None:
            return -1
        return sum(SIMHASH_BITS - (code ^ recent).bit_count() for recent in self._recent)

    def _choose(self, ready: list[int]) -> int:
        forwards = [i for i in ready if self._waiting[i].message.kind == "forward"]
        others = [i for i in ready if self._waiting[i].message.kind != "forward"]
        if others:
            return others[0]
        return min(forwards, key=lambda i: (self._similarity(i), i))

    def _served(self, request: Request) -> None:
        if request.action is not None or request.message.kind != "forward":
            return
        code = self._hashes.pop(id(request), None)
        if code is not None:
            self._recent.append(code)
