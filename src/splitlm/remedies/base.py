"""What a non-IID remedy is: a registered component that fills some of a fixed set of hooks.

A remedy (survey §3: logit adjustment, alignment, early exits, replay, EMA, pruning, how the client's head learns)
lives in its own module under ``splitlm/remedies/`` as a ``Remedy`` subclass registered in ``REMEDIES``. It owns
its ``Settings`` (what the config holds under ``remedies.<name>``) and its ``problems`` (its compatibility rules),
and it fills any of these hooks, each a default that does nothing:

| hook              | who calls it                                | what for                                          |
|-------------------|---------------------------------------------|---------------------------------------------------|
| ``client_plugin`` | the client pipeline, once per client        | a ``ClientPlugin``: rows, logits, loss terms, how |
|                   |                                             | the head learns, a personal evaluation            |
| ``server_mod``    | the server's pipeline, once                 | a ``Mod`` around the server (e.g. statistics)     |
| ``batches``       | a member's step loop, each step             | the example rows of the step's micro-batches      |
| ``member_state``  | after a member's local training             | per-member tensors, checkpointed with it          |
| ``personal``      | the evaluation of a member's own model      | a context that evaluates its personal model       |
| ``passed_on``     | a sequential framework passing the client   | the client side the next client starts from       |
|                   | side from one client to the next            |                                                   |

The core calls the hooks of the remedies a config names and never a remedy's name: a remedy of a user's own
registers itself (``@REMEDIES.component``) and is configured like a built-in one.
"""

from __future__ import annotations

import contextlib
import functools
import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from splitlm.config import Config
from splitlm.data import DataOrder, Example
from splitlm.models.split import Stage
from splitlm.registry import Component, ComponentRegistry
from splitlm.runtime.plugins import ClientPlugin
from splitlm.transport import Mod

State = dict[str, torch.Tensor]


@dataclass
class ClientSetup:
    """What a remedy may build a client's plugin from: the client's own view of the config, its parts and its
    training examples (after the held-out ones are taken out, and packed with ``data.pack``)."""

    client_id: str
    config: Config
    parts: dict[str, nn.Module]  # "head" [+ "tail"], possibly peft-wrapped
    stages: dict[str, Stage]
    examples: list[Example] = field(default_factory=list)

    @property
    def seed(self) -> int:
        return self.config.seed


@dataclass
class RoundRows:
    """What a remedy may draw a member's rows from in one round: its data order and what it dealt before."""

    client_id: str
    seed: int
    order: DataOrder
    round_start: int  # the member's steps done before this round
    grad_accum: int

    @functools.cached_property
    def earlier(self) -> list[int]:
        """The examples the order dealt this member in its steps before this round (sorted)."""
        steps = self.round_start * self.grad_accum
        return sorted({i for step in range(steps) for i in self.order.indices(step)})

    def rng(self, stream: str, step: int) -> random.Random:
        """A random stream of this client's ``step``, the same on every machine and on a resume."""
        return random.Random(f"{stream}/{self.seed}/{self.client_id}/{step}")


class Remedy(Component):
    """A non-IID remedy: its settings, its problems and the hooks it fills (see the module's table)."""

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        """This remedy's plugin for one client (None: it has none)."""
        return None

    def server_mod(self, config: Config) -> Mod | None:
        """This remedy's mod around the server's handler, innermost (None: none)."""
        return None

    def batches(self, rows: RoundRows, step: int, batches: list[list[int]]) -> list[list[int]]:
        """The example rows of the micro-batches of ``step`` (the data order's, by default)."""
        return batches

    def member_state(self, client: Any, previous: State | None) -> State | None:
        """After a member's local training: the tensors this remedy keeps for it (checkpointed and restored with
        the member; None: nothing)."""
        return previous

    def personal(self, client: Any, state: State | None) -> contextlib.AbstractContextManager[Any] | None:
        """A context inside which ``client`` evaluates the member's personal model, from what ``member_state``
        kept (None: this remedy gives it none)."""
        return None

    def passed_on(self, previous: State, trained: State) -> State | None:
        """A sequential framework: the client side the next client starts from, given the one passed to this client
        and the one it trained (None: the trained one as it is)."""
        return None


REMEDIES = ComponentRegistry[Remedy]("remedy", "remedies", builtins=("splitlm.remedies",))


def build_remedies(config: Config) -> list[Remedy]:
    """The remedies ``config.remedies`` names, each with its settings, in order."""
    return REMEDIES.build(config.remedies) if config.remedies else []


@contextlib.contextmanager
def loaded(client: Any, state: State) -> Iterator[None]:
    """``client`` with ``state`` loaded for the duration (its own state back afterwards)."""
    own = client.state()
    client.load_state(state)
    try:
        yield
    finally:
        client.load_state(own)
