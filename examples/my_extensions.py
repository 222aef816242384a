"""A remedy, a defense and an aggregation strategy of one's own, in one module (README: Architecture).

Name the module in the config (``plugins: [my_extensions]``) and every process of the run imports it before the
config is checked: ``remedies.shrink``, ``privacy.defenses.coarsen`` and ``framework.aggregation: medoid`` are
then validated with the rest of the config and run in-process, over gRPC and under Ray.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from splitlm.frameworks.aggregation import STRATEGIES, Strategy
from splitlm.privacy.defenses import DEFENSES, MessageDefense
from splitlm.registry import ComponentSettings
from splitlm.remedies import REMEDIES, Remedy
from splitlm.runtime.plugins import ClientPlugin, Micro


class Shrink(ClientPlugin):
    """Adds weight x mean square of the head's output to the client's loss (joined to the head's backward)."""

    def __init__(self, weight: float) -> None:
        self.weight = weight

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        return self.weight * micro.scale * micro.hidden.float().pow(2).mean()


@REMEDIES.component
class ShrinkRemedy(Remedy):
    name = "shrink"

    class Settings(ComponentSettings):
        weight: float = Field(0.01, gt=0, description="Weight of the mean square of the head's output.")

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is not None and not framework.split:
            return [f"remedies.shrink: acts on a split client's head; framework.name={framework.name} has none"]
        return []

    def client_plugin(self, setup: Any) -> ClientPlugin:
        return Shrink(self.settings.weight)


@DEFENSES.component
class Coarsen(MessageDefense):
    """Rounds the smashed data (step 3) to multiples of ``step``; gradients pass straight through."""

    name = "coarsen"

    class Settings(ComponentSettings):
        step: float = Field(0.5, gt=0, description="The grid the head's output is rounded to.")

    def smashed(self, hidden: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        step = self.settings.step
        return hidden + (torch.round(hidden / step) * step - hidden).detach()


@STRATEGIES.component
class Medoid(Strategy):
    """The client side (and trunk adapter) closest to all the others, instead of their weighted mean."""

    name = "medoid"

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is not None and not framework.aggregates:
            return [f"framework.aggregation: medoid averages client sides; framework.name={framework.name} has none"]
        return []

    def average(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        flat = torch.stack([torch.cat([s[key].flatten().float() for key in states[0]]) for s in states])  # (n, P)
        nearest = int(torch.cdist(flat, flat).sum(dim=1).argmin())
        return {key: value.clone() for key, value in states[nearest].items()}
