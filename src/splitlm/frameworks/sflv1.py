"""``sflv1``: split-federated learning V1 (Thapa et al.). Clients train at once, each with its own trunk
adapter on the server; at the end of a round the client sides and the trunk adapters are each FedAvg'd
(step 11) and given back to everyone.

Clients with different cuts or LoRA ranks (``framework.clients``) are averaged module by module instead
(``average_across_cuts``): each client's client side with the blocks its own trunk adapter ran for it.

``framework.aggregation_lr`` (eta_g; MU-SplitFed, survey §3.2.2) moves the global client side eta_g times the
FedAvg's step from the global client side the round started from (``stepped``); sflv2 and gsfl share these
functions. The trunk adapters are averaged as before.
"""

from __future__ import annotations

import torch

from splitlm.config import Config
from splitlm.errors import ConfigError
from splitlm.frameworks import asynchronous
from splitlm.frameworks.aggregate import aggregate, fedavg, fit, global_step
from splitlm.frameworks.asynchronous import async_round
from splitlm.frameworks.base import Framework, framework_of, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import mixed_clients


def stepped(fed: Federation, average: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The new global client side from the client sides' FedAvg ``average``: ``average`` itself with the default
    ``framework.aggregation_lr`` of 1 (plain FedAvg), else eta_g times its step from the global client side the round
    started from (``Federation.hold_global``; ``aggregate.global_step``)."""
    lr = fed.framework.aggregation_lr(fed.config, fed.groups)
    if lr == 1.0 or fed.carry is None:
        return average
    return global_step(fed.carry, average, lr)


def average_client_sides(fed: Federation, finished: list[Member]) -> None:
    fed.broadcast(stepped(fed, fedavg([m.client.state() for m in finished], fed.weights(finished))))


def check_aggregation_lr(config: Config) -> None:
    """A framework check (sflv1, sflv2): a global learning rate other than 1 steps each tensor of the global client
    side; clients of different cuts or ranks are aggregated module by module with stacked LoRA factors, which
    such a step does not apply to. The asynchronous modes mix updates with their own weights."""
    fw = config.framework
    if fw.aggregation_lr is not None and fw.aggregation != "sync":
        raise ConfigError(
            f"framework.aggregation_lr: framework.aggregation={fw.aggregation} mixes each update in with "
            "framework.async_mix and staleness weights; unset framework.aggregation_lr or set "
            "framework.aggregation=sync"
        )
    lr = framework_of(config).aggregation_lr(config, [])
    if lr != 1.0 and mixed_clients(config):
        raise ConfigError(
            f"framework.aggregation_lr={lr:g}: steps the global client side tensor by tensor, but framework.clients "
            "gives the clients different cuts or LoRA ranks; set framework.aggregation_lr=1 or drop split and lora "
            "from framework.clients"
        )


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


def sflv1_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    if fed.config.framework.aggregation != "sync":  # no round barrier: the clients' own loops (§4.4)
        return async_round(fed, round_index, members)
    finished = fed.train_clients(members, round_index, parallel=True)
    if fed.mixed:
        average_across_cuts(fed, finished)
        return [finished[0]]
    average_client_sides(fed, finished)
    adapters = [fed.server.adapter_of(m.client_id) for m in finished]
    trunk = fedavg([fed.server.adapter_state(a) for a in adapters], fed.weights(finished))
    for member in fed.members:
        fed.server.load_adapter_state(fed.server.adapter_of(member.client_id), trunk)
    return [finished[0]]


SFLV1 = register(
    Framework(
        "sflv1",
        sflv1_round,
        "split-federated learning V1: clients at once, one trunk adapter per client; client sides and trunk "
        "adapters FedAvg'd every round",
        trunk_adapters="client",
        checks=(asynchronous.check, check_aggregation_lr),
    )
)
