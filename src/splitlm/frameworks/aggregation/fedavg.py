"""``sync``: FedAvg at the end of every round (step 11), with an optional global learning rate.

The framework's recipe trains the round's clients and hands them here: the client sides are averaged weighted by
samples (``aggregate.fedavg``), and the new global client side is ``old + lr x (average - old)``, ``old`` the one
the round started from (``lr``, eta_g; MU-SplitFed, survey §3.2.2; unset: 1, plain FedAvg, or what
``framework.server_lr_scale`` gives). Clients with different cuts or LoRA ranks (``framework.clients``) are averaged
module by module instead, their LoRA factors of mixed ranks stacked (``average_across_cuts``, ``aggregate.aggregate``
and ``aggregate.fit``). The trunk adapters are averaged by the recipes that keep several (sflv1, gsfl).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field

from splitlm.config import Config
from splitlm.frameworks.aggregate import aggregate, fit, global_step
from splitlm.frameworks.aggregation import STRATEGIES, Strategy
from splitlm.frameworks.aggregation.scales import scale_of
from splitlm.registry import ComponentSettings

if TYPE_CHECKING:
    from splitlm.frameworks.federation import Federation, Member

KEY = "framework.aggregation.sync.lr"


@STRATEGIES.component
class FedAvg(Strategy):
    name = "sync"
    former_keys = (("framework.aggregation_lr", "framework.aggregation.sync.lr"),)

    class Settings(ComponentSettings):
        lr: float | None = Field(
            None,
            gt=0,
            allow_inf_nan=False,
            description="Global learning rate of the client sides' FedAvg: the new global client side is old + lr x "
            "(average - old), old being the one the round started from (the trunk adapters are averaged as before). "
            "Unset: 1 (plain FedAvg), or sqrt(tau) with framework.server_lr_scale=mu_splitfed.",
        )

    def global_lr(self, config: Config, sharing: int) -> float:
        lr = self.settings.lr  # type: ignore[attr-defined]
        return lr if lr is not None else super().global_lr(config, sharing)

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None:
            return []
        name = framework.name
        if settings.lr is not None and not framework.aggregates:
            if not framework.split:
                why = "trains one unsplit model, so unset"
            elif framework.sequential:
                why = "passes one client side on instead: use sflv1, sflv2 or gsfl, or unset"
            else:
                why = "lets each client keep its own: use sflv1, sflv2 or gsfl, or unset"
            return [f"{KEY}: steps the FedAvg of the clients' client sides; framework.name={name} {why} {KEY}"]
        from splitlm.frameworks.setup import mixed_clients

        lr = settings.lr if settings.lr is not None else scale_of(config).global_lr(framework.sharing(config, []))
        if framework.aggregates and lr != 1.0 and mixed_clients(config):
            return [
                f"{KEY}={lr:g}: steps the global client side tensor by tensor, but framework.clients gives the clients "
                f"different cuts or LoRA ranks; set {KEY}=1 or drop split and lora from framework.clients"
            ]
        return []


def stepped(fed: Federation, average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The new global client side from the client sides' FedAvg ``average``: ``average`` itself with a global learning
    rate of 1 (plain FedAvg), else eta_g times its step from the global client side the round started from
    (``Federation.hold_global``; ``aggregate.global_step``)."""
    lr = fed.framework.global_lr(fed.config, fed.groups)
    if lr == 1.0 or fed.carry is None:
        return average
    return global_step(fed.carry, average, lr)


def average_client_sides(fed: Federation, finished: list[Member]) -> None:
    fed.broadcast(stepped(fed, fed.strategy.average([m.client.state() for m in finished], fed.weights(finished))))


def average_across_cuts(fed: Federation, finished: list[Member]) -> None:
    """Step 11 for clients of different cuts or ranks (``aggregate.aggregate``): each client contributes its
    client side and the blocks its cut leaves to the server, from its trunk adapter. Per-client adapters (sflv1)
    contribute all of those; one shared adapter (sflv2) contributes the blocks other clients run in their head
    or tail, once for each client it ran them for, so such a block is averaged over both. Every client side and
    trunk adapter then takes the average fitted to its own blocks and ranks (``aggregate.fit``)."""
    server = fed.server
    average = aggregate([fed.contribution(m) for m in finished], fed.weights(finished))
    fed.broadcast(average)
    for adapter in dict.fromkeys(server.adapter_of(m.client_id) for m in fed.members):
        current = server.adapter_state(adapter)
        averaged = {k: v for k, v in current.items() if k in average}
        if averaged:
            server.load_adapter_state(adapter, {**current, **fit(averaged, average)})
