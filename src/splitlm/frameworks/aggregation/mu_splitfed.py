"""MU-SplitFed (survey §3.2.2; ``framework.server_lr_scale=mu_splitfed``): a trunk adapter that tau clients share
takes tau unbalanced steps per client step, so its learning rate is divided by tau, and the client sides' FedAvg
is stepped sqrt(tau) times as far from the global client side the round started from (eta_g, unless
``framework.aggregation``'s sync ``lr`` says otherwise)."""

from __future__ import annotations

import math
from typing import Any

from splitlm.frameworks.aggregation.scales import SCALES, LrScale


@SCALES.component
class MuSplitFed(LrScale):
    name = "mu_splitfed"
    raises_aggregation = True

    def trunk(self, sharing: int) -> float:
        return 1.0 / sharing

    def global_lr(self, sharing: int) -> float:
        return math.sqrt(sharing)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None:
            return []
        if not framework.split:
            return super().problems(settings, config, framework)
        if framework.aggregates and framework.trunk_adapters != "client":
            return []
        why = "averages no client sides"
        if framework.sequential:
            why = "passes one client side on instead of averaging them"
        elif framework.trunk_adapters == "client":
            why = "gives each client its own trunk adapter"
        return [
            f"framework.server_lr_scale=mu_splitfed: divides a shared trunk adapter's learning rate by its clients and "
            f"raises the FedAvg of the client sides; framework.name={framework.name} {why}: use sflv2 or gsfl"
        ]
