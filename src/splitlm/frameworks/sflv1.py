"""``sflv1``: split-federated learning V1 (Thapa et al.). Clients train at once, each with its own trunk
adapter on the server; at the end of a round the client sides and the trunk adapters are each FedAvg'd
(step 11, ``aggregation/fedavg.py``) and given back to everyone.

Clients with different cuts or LoRA ranks (``framework.clients``) are averaged module by module instead
(``average_across_cuts``): each client's client side with the blocks its own trunk adapter ran for it. The
aggregation strategy (``framework.aggregation``) may replace the round altogether (the asynchronous ones).
"""

from __future__ import annotations

from splitlm.frameworks.aggregation.fedavg import average_across_cuts, stepped
from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member


def sflv1_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    finished = fed.train_clients(members, round_index, parallel=True)
    if fed.mixed:
        average_across_cuts(fed, finished)
        return [finished[0]]
    adapters = [fed.server.adapter_of(m.client_id) for m in finished]
    sides, trunks = [m.client.state() for m in finished], [fed.server.adapter_state(a) for a in adapters]
    side, trunk = fed.strategy.average_parts([sides, trunks], fed.weights(finished))  # a client's parts together
    fed.broadcast(stepped(fed, side))
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
        aggregates=True,
    )
)
