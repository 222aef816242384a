"""Server-side guards (``privacy.guards``): the server watches each client's change to the parts it trains.

A guard is a registered component (``registry.Component``) in its own module: its ``Settings``, its ``problems``
and the hooks below. The federation calls every configured guard at fixed points of a round and never learns a
guard's name:

- ``open_round(round_index, client_ids)``: an attempt at a round starts (forget what a rolled-back attempt noted);
- ``trained(round_index, client_id, before, after, steps)``: right after a client's local training, the parts it
  trained as the server holds them, before and after its training, each a state keyed by part (``watches()`` says
  which parts a guard is shown), and the optimizer steps it took. The parts (``PARTS``):
  - ``trunk``: the trunk adapter it trained (sequential frameworks, sl and sflv2: the shared adapter right before and
    after that client's turn; sflv1: the client's own adapter; gsfl: its group's, inside the group's sequence);
  - ``client_side``: its client side (head [+ tail] adapters), which the server receives to average (sflv1, sflv2,
    gsfl) or to pass on to the next client (sl), read from the client before and after its training (a networked
    client is asked for it: one more transfer of its client side per round, only when a guard watches it);
- ``check(round_index)``: once the round's training is done (before it is evaluated or checkpointed), the clients it
  flags, each with why.

The federation raises ``ClientsFlagged`` for the flagged clients and the driver handles it as it handles a lost
client (``ClientGone``): the round is a transaction (with a guard configured, every round is snapshotted, in-process
too), so it is rolled back and run again without them: it computes what the same round computes with those clients
left out (``framework.leave_out``). A guard's ``report()`` is ``summary.json``'s ``privacy.guards.<name>``; its
``state()`` rides in every checkpoint (``guards.json``), so a resumed run keeps the flags raised before.

Guards run where the server is (``splitlm serve``, or in-process); they see only what the server holds.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import TYPE_CHECKING, Any, Self

import torch

from splitlm.config.schema import as_mapping
from splitlm.errors import PrivacyError
from splitlm.registry import Component, ComponentRegistry

if TYPE_CHECKING:
    from splitlm.config import Config

State = Mapping[str, torch.Tensor]
Parts = Mapping[str, State]  # part ("trunk", "client_side") -> its tensors
PARTS = ("trunk", "client_side")


class Guard(Component):
    """Base of a server-side guard: hooks around each client's local training and at the end of a round."""

    def watches(self) -> frozenset[str]:
        """The parts (of ``PARTS``) whose change ``trained`` is shown; the trunk adapter by default."""
        return frozenset({"trunk"})

    @classmethod
    def create(cls, settings: Any, config: Config) -> Self:
        """The guard with ``settings`` for the run ``config``."""
        return cls(settings)

    def open_round(self, round_index: int, client_ids: list[str]) -> None:
        """An attempt at round ``round_index`` (0-based) over ``client_ids`` starts."""

    def trained(self, round_index: int, client_id: str, before: Parts, after: Parts, steps: int) -> None:
        """``client_id`` trained each part this guard ``watches`` from ``before[part]`` to ``after[part]`` in
        ``steps`` optimizer steps (called from the client's thread: clients of a parallel framework call it at
        once)."""

    def check(self, round_index: int) -> dict[str, str]:
        """The clients of this attempt at the round that this guard flags, each with why (empty: none)."""
        return {}

    def report(self) -> dict[str, Any]:
        """What ``summary.json`` reports under ``privacy.guards.<name>``: at least ``flags``, a list of ``{"round"
        (1-based), "client"}``."""
        return {"flags": []}

    def state(self) -> dict[str, Any]:
        """What a checkpoint keeps of this guard (JSON), for ``load_state`` on ``--resume``."""
        return {}

    def load_state(self, state: dict[str, Any]) -> None:
        """Restore what ``state`` returned."""


GUARDS = ComponentRegistry[Guard](
    "guard", "privacy.guards", error=PrivacyError, builtins=("splitlm.privacy.guards.safesplit",)
)


def build_guards(spec: Any, config: Config) -> list[Guard]:
    """The guards ``spec`` (``privacy.guards``) names, with their settings: none by default."""
    return GUARDS.build(as_mapping(spec), config)


def watch_problems(
    key: str, config: Config, framework: Any, minimum: int, parts: Collection[str] = ("trunk",)
) -> list[str]:
    """What stops a guard (``key``: its config key) from watching each client's own change to ``parts`` (of
    ``PARTS``) and judging it against the round's other ``minimum - 1`` or more clients, under ``framework``."""
    if framework is None:
        return []
    fw = config.framework
    if not framework.split:
        return [f"{key}: framework.name={framework.name} has no server to watch the clients' changes on; unset {key}"]
    problems = []
    if "trunk" in parts:
        if framework.barrier:
            problems.append(
                f"{key}: framework.name={framework.name} takes one trunk step from all clients' steps at once, so no "
                f"client's own change to the trunk adapter can be watched; use sl, sflv1, sflv2 or gsfl, or unset {key}"
            )
        if fw.merge > 1:
            problems.append(
                f"{key}: framework.merge={fw.merge} trains several clients at once on the shared trunk adapter, so no "
                f"client's own change to it can be watched; set framework.merge=1 or unset {key}"
            )
        if config.lora.part("trunk").method != "lora":
            problems.append(
                f"{key}: watches the trunk's LoRA adapter and lora.trunk.method={config.lora.part('trunk').method}; "
                f"set lora.trunk.method=lora or unset {key}"
            )
    shared = framework.aggregates or framework.sequential
    if "client_side" in parts and not shared and not ("trunk" in parts and framework.barrier):  # psl: said once
        problems.append(
            f"{key}: watches the client sides the server receives, and framework.name={framework.name} keeps each "
            f"client's side on the client; use sl, sflv1, sflv2 or gsfl, or leave client_side out of what {key} watches"
        )
    own = [config.for_client(i) for i in range(fw.num_clients)]
    if any(c.split != own[0].split or c.lora != own[0].lora for c in own):
        problems.append(
            f"{key}: compares the clients' updates, which differ in shape or blocks when framework.clients gives "
            f"clients their own cut or LoRA rank; drop split and lora from framework.clients or unset {key}"
        )
    per_round = min(fw.clients_per_round or fw.num_clients, fw.num_clients)
    if per_round < minimum:
        problems.append(
            f"{key}: judges each client against the majority of a round's clients, and a round has {per_round}; set "
            f"framework.num_clients (and framework.clients_per_round) to {minimum} or more, or unset {key}"
        )
    return problems
