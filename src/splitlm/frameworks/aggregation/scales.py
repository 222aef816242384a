"""Scales of the trunk's learning rate in the number tau of clients that share its adapter
(``framework.server_lr_scale``; the server's unbalanced steps per client step, survey §3.2.2).

A scale is a registered component: ``trunk(tau)`` multiplies the trunk's learning rate, ``global_lr(tau)`` is
the global learning rate it gives the client sides' FedAvg unless ``framework.aggregation``'s sync ``lr`` says
otherwise (1: plain FedAvg). none, linear (x tau) and sqrt (x sqrt(tau), SGLR) live here; MU-SplitFed's, which
also raises the FedAvg, in ``mu_splitfed.py``.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, ClassVar

from splitlm.config import Config
from splitlm.registry import Component, ComponentRegistry

if TYPE_CHECKING:
    from splitlm.frameworks.federation import Federation


class LrScale(Component):
    """A scale of the trunk's learning rate (and the client sides' FedAvg step that goes with it)."""

    raises_aggregation: ClassVar[bool] = False  # global_lr is not 1: needs a FedAvg with a global step

    def trunk(self, sharing: int) -> float:
        return 1.0

    def global_lr(self, sharing: int) -> float:
        return 1.0

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None or framework.split or cls.name == "none":
            return []
        return [
            f"framework.server_lr_scale={cls.name}: scales the trunk's learning rate on the server; "
            f"framework.name={framework.name} has no server, so set framework.server_lr_scale=none"
        ]


SCALES = ComponentRegistry[LrScale](
    "server learning-rate scale",
    "framework.server_lr_scale",
    builtins=("splitlm.frameworks.aggregation.scales", "splitlm.frameworks.aggregation.mu_splitfed"),
)


@SCALES.component
class NoScale(LrScale):
    name = "none"


@SCALES.component
class Linear(LrScale):
    name = "linear"

    def trunk(self, sharing: int) -> float:
        return float(sharing)


@SCALES.component
class Sqrt(LrScale):
    name = "sqrt"

    def trunk(self, sharing: int) -> float:
        return math.sqrt(sharing)


def scale_of(config: Config) -> LrScale:
    (scale,) = SCALES.build(config.framework.server_lr_scale)
    return scale


def rates_in_effect(fed: Federation) -> dict[str, float | None]:
    """What ``summary.json`` reports of the trunk's learning-rate scale and the client sides' FedAvg learning rate in
    effect (survey §3.2.2)."""
    framework = fed.framework
    return {
        "server_lr_scale": framework.trunk_lr_scale(fed.config, fed.groups) if framework.split else None,
        "aggregation_lr": framework.global_lr(fed.config, fed.groups),
    }
