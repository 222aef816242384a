"""``gsfl``: grouped split-federated learning. Groups of clients train at once, sequential SL inside a group,
one trunk adapter per group; at the end of a round the groups' client sides and trunk adapters are FedAvg'd
(weighted by each group's samples). Groups: ``framework.groups``, else ``framework.grouping`` (default
label_kmeans: clients of similar label mix; feature_hash: clients whose smashed data look alike, GSFL as published;
``frameworks/grouping.py``). The aggregation strategy's global learning rate steps the client sides' FedAvg as in sflv1.
"""

from __future__ import annotations

import torch

from splitlm.config import Config
from splitlm.errors import ConfigError
from splitlm.frameworks.aggregation.fedavg import stepped
from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.grouping import GROUPINGS
from splitlm.frameworks.setup import same_cut_and_rank


def gsfl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    chosen = {m.index for m in members}
    groups = [[fed.members[i] for i in group if i in chosen] for group in fed.groups]
    groups = [g for g in groups if g]
    fed.hold_global(members)  # a global learning rate: the global client side the round steps from
    start = fed.carry
    finished: list[dict[str, torch.Tensor]] = [{} for _ in groups]

    def run_group(position: int) -> None:
        carry = start
        for member in groups[position]:  # sequential SL inside the group
            if carry is not None:
                member.client.load_state(carry)
            fed.local_training(member, round_index)
            carry = member.client.state()
        finished[position] = carry or {}

    fed.parallel([lambda p=p: run_group(p) for p in range(len(groups))])
    weights = [sum(fed.weights(g)) for g in groups]
    adapters = [fed.server.adapter_of(g[0].client_id) for g in groups]
    trunks = [fed.server.adapter_state(a) for a in adapters]
    side, trunk = fed.strategy.average_parts([finished, trunks], weights)  # a group's parts together
    fed.broadcast(stepped(fed, side))
    for adapter in {fed.server.adapter_of(m.client_id) for m in fed.members}:
        fed.server.load_adapter_state(adapter, trunk)
    return [members[0]]


def check_grouping(config: Config) -> None:
    """A grouping by smashed-data sketches (feature_hash) computes them in this process (``sketch.py``), before
    the server is built; Ray runs build their parties elsewhere (``splitlm serve`` refuses it too)."""
    fw = config.framework
    if fw.groups or fw.grouping not in GROUPINGS or GROUPINGS.get(fw.grouping).needs == "histograms":
        return
    if config.transport.name != "inprocess":
        raise ConfigError(
            f"framework.grouping={fw.grouping}: the clients' smashed-data sketches are computed in-process; with "
            f"transport.name={config.transport.name} set framework.groups or a grouping by labels (label_kmeans)"
        )


GSFL = register(
    Framework(
        "gsfl",
        gsfl_round,
        "grouped split-federated learning: groups at once, sequential SL inside a group, one trunk adapter per "
        "group; FedAvg'd over groups every round",
        trunk_adapters="group",
        aggregates=True,
        checks=(same_cut_and_rank("passes one client side from client to client inside a group"), check_grouping),
    )
)
