"""3-Tier SL's aggregator (survey §5.2.5), as an exact mixer: ``privacy.protocols=[three_tier]``.

3-Tier SL puts an aggregator between the clients and the server: the clients send it their activations and it
forwards them mixed, so the server never sees one client's activations as that client sent them. The paper's
aggregator averages them, which changes what the trunk computes and costs accuracy. This one mixes exactly: each
training micro-batch's rows (its smashed data, and with them its attention mask, position ids and, in a vanilla
split, labels) are shuffled by a fresh secret permutation before the server sees them, and the inverse is applied
to what comes back (the trunk's output in a U-shaped split, the gradient of the smashed data) while the client's
gradient for the trunk output is shuffled the same way on its way in. The trunk treats rows independently and the
loss sums over them, so the run trains as without the mixer (up to the order of floating-point sums, and exactly
so when no trunk dropout draws per row).

What it hides: which row of a micro-batch is which, i.e. the link between a rebuilt sequence and its place in the
client's batch. What it does not hide: the rows themselves. An inversion attack still rebuilds every sequence's
text (scores that pair guesses with truths row by row understate that: compare bags of rows, or ``pii_recovered``
over the whole micro-batch). The mixer only mixes one request's rows: requests of several clients are not pooled
(that needs the server's merged passes, ``framework.merge``, which run after the tap), so a micro-batch of one row
leaves it nothing to mix and is refused.
"""

from __future__ import annotations

import secrets
import threading
from typing import Any, Self

import torch
from pydantic import Field

from splitlm.privacy.protocols import PROTOCOLS, Protocol
from splitlm.registry import ComponentSettings
from splitlm.transport.base import Answer, Handler, then
from splitlm.transport.messages import Message

_ROWS = ("hidden", "attention_mask", "position_ids", "labels")  # a forward's per-row tensors (B, ...)


@PROTOCOLS.component
class ThreeTier(Protocol):
    name = "three_tier"

    class Settings(ComponentSettings):
        seed: int | None = Field(
            None,
            description="Seed of the secret permutations (tests only: the server must not know it); unset: drawn "
            "from the operating system.",
        )

    @classmethod
    def create(cls, settings: Settings, config: Any) -> Self:
        return cls(settings.seed)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        rows = config.train.batch_size // max(1, config.train.pipeline.micro_batches)
        if rows < 2:
            return [
                f"privacy.protocols.three_tier mixes the rows of each micro-batch, and this run's have {rows} "
                "(train.batch_size / train.pipeline.micro_batches); use at least 2 rows per micro-batch"
            ]
        return []

    def __init__(self, seed: int | None = None) -> None:
        self.generator = torch.Generator().manual_seed(secrets.randbits(63) if seed is None else seed)
        self._orders: dict[tuple[str, int, int], torch.Tensor] = {}  # (client, step, micro) -> permutation
        self._lock = threading.Lock()

    def serve(self, message: Message, call_next: Handler) -> Answer:
        if message.kind == "forward" and "hidden" in message.tensors:
            rows = message.tensors["hidden"].shape[0]
            with self._lock:
                order = torch.randperm(rows, generator=self.generator)
                self._orders[message.key] = order
            tensors = {
                name: _take(t, order) if name in _ROWS and t.shape[0] == rows else t
                for name, t in message.tensors.items()
            }
            return then(call_next(message.replace(tensors)), lambda reply: self._restore(message.key, reply))
        if message.kind == "backward" and "grad" in message.tensors:
            with self._lock:
                order = self._orders.get(message.key)
            if order is not None:
                shuffled = {**message.tensors, "grad": _take(message.tensors["grad"], order)}
                return then(call_next(message.replace(shuffled)), lambda reply: self._restore(message.key, reply, True))
        return call_next(message)

    def _restore(self, key: tuple[str, int, int], reply: Message, last: bool = False) -> Message:
        """``reply`` with its per-row tensors back in the client's order; the permutation is forgotten after the
        last reply that needs it (the backward's, or a forward's that expects no backward)."""
        with self._lock:
            order = self._orders.get(key)
            if order is not None and (last or reply.kind != "activations" or not reply.meta.get("needs_grad", True)):
                del self._orders[key]
        if order is None:
            return reply
        inverse = torch.argsort(order)
        tensors = {
            name: _take(t, inverse) if name in ("hidden", "grad") and t.dim() >= 1 and t.shape[0] == len(order) else t
            for name, t in reply.tensors.items()
        }
        return reply.replace(tensors)


def _take(tensor: torch.Tensor, order: torch.Tensor) -> torch.Tensor:
    return tensor.index_select(0, order.to(tensor.device))
