"""Aggregation strategies (``framework.aggregation``; Flower's ``Strategy``): how a federation's client sides become
one global model.

A strategy is a registered component (``registry.Component``) in its own module: its settings, its ``problems``
(the frameworks, transports and options it cannot work with, one line each) and two hooks. ``round`` runs one of
the driver's rounds: the synchronous FedAvg (``fedavg.py``) runs the framework's recipe, which trains the round's
clients and aggregates them through the strategy (``global_lr``); the asynchronous ones (``asynchronous.py``,
``semi_async.py``) run the clients' own loops across the rounds instead, and hand the driver an evaluation point
per round. ``save`` / ``load`` keep what a strategy holds across rounds (the global model, its versions, the
staleness bookkeeping) in a checkpoint, so a resumed run goes on exactly. The scales of the trunk's learning rate
that come with an aggregation (``framework.server_lr_scale``, MU-SplitFed's) are components too (``scales.py``).

Any framework that averages client sides (``Framework.aggregates``: sflv1, sflv2, gsfl) takes any strategy. The
robust ones (``robust.py``: median, trimmed_mean, krum) keep the synchronous round and override ``average``.
Importing this package registers nothing: the built-ins are imported the first time a name is looked up.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, ClassVar

import torch

from splitlm.config import Config
from splitlm.frameworks import aggregate
from splitlm.registry import Component, ComponentRegistry

if TYPE_CHECKING:
    from splitlm.frameworks.federation import Federation, Member


class Strategy(Component):
    """How the client sides of a round (or of every client's loop) become the global model."""

    keeps_length: ClassVar[bool] = False  # a resume may not change the run's length (train.steps, rounds)

    def global_lr(self, config: Config, sharing: int) -> float:
        """The global learning rate eta_g of the client sides' FedAvg (1: plain FedAvg): ``sharing`` clients share a
        trunk adapter (MU-SplitFed raises eta_g to sqrt of it)."""
        from splitlm.frameworks.aggregation.scales import scale_of

        return scale_of(config).global_lr(sharing)

    def average(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        """One state from the clients' ``states`` (client sides, or trunk adapters) and their ``weights`` (their
        samples): FedAvg's weighted mean by default; a robust strategy (median, trimmed mean, ...) overrides it.
        Clients of different cuts or ranks are averaged module by module instead (``fedavg.average_across_cuts``)."""
        return aggregate.fedavg(states, weights)

    def average_parts(
        self, parts: list[list[dict[str, torch.Tensor]]], weights: list[float]
    ) -> list[dict[str, torch.Tensor]]:
        """One state per part from ``parts`` (e.g. [client sides, trunk adapters]), each a list with one state per
        client in the same order: the parts of one client belong together (its client side and the trunk adapter
        trained with it). Each part ``average``d on its own by default; a strategy that picks clients (Krum)
        overrides it to pick the same clients for every part."""
        return [self.average(states, weights) for states in parts]

    def round(self, fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
        """One of the driver's rounds over ``members``; returns the members that hold the global model (the
        framework's recipe, which aggregates through this strategy)."""
        return fed.framework.round(fed, round_index, members)

    def settled(self) -> bool:
        """Whether no client is in the middle of its training (only then is a checkpoint exact)."""
        return True

    def summary(self) -> dict[str, object]:
        """What ``summary.json`` reports under ``aggregation``."""
        return {"mode": self.name}

    def save(self, fed: Federation, folder: Path) -> None:
        """Write what this strategy holds across rounds into a checkpoint's ``folder`` (nothing by default)."""

    def load(self, fed: Federation, folder: Path) -> None:
        """Restore what ``save`` wrote (a resume)."""

    def shutdown(self) -> None:
        """Stop whatever the strategy runs in the background (the run ends or fails)."""


STRATEGIES = ComponentRegistry[Strategy](
    "aggregation strategy",
    "framework.aggregation",
    builtins=(
        "splitlm.frameworks.aggregation.fedavg",
        "splitlm.frameworks.aggregation.asynchronous",
        "splitlm.frameworks.aggregation.semi_async",
        "splitlm.frameworks.aggregation.robust",
        "splitlm.frameworks.aggregation.isolation",
    ),
)


def strategy_of(config: Config) -> Strategy:
    """The strategy ``framework.aggregation`` names, with its settings (a new instance: it holds a run's state)."""
    (strategy,) = STRATEGIES.build(config.framework.aggregation)
    return strategy
