"""``sflv2``: split-federated learning V2 (Thapa et al.). The server serves one client at a time, in a random
order each round, updating its one shared trunk adapter at once; the client sides are FedAvg'd (step 11).

With ``framework.merge`` K > 1 (MiniBatch-SFL, survey §3.1.2) the round's shuffled order is trained in chunks of K
clients: the clients of a chunk train at once behind a step barrier on the shared adapter, the server merges
their smashed data into one trunk batch per (step, micro-batch) and takes one trunk step per step of the chunk,
from the mean of their gradients; the next chunk starts from the updated trunk. The client sides are FedAvg'd
as before.
"""

from __future__ import annotations

import random

from splitlm.config import Config
from splitlm.frameworks.aggregation.fedavg import average_across_cuts, average_client_sides
from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member


def train_in_chunks(fed: Federation, order: list[Member], round_index: int, size: int) -> list[Member]:
    """``order``'s local steps, ``size`` clients at a time: each chunk in parallel behind a barrier of its own size on
    the shared trunk adapter (so the server merges its forwards and steps once per step of the chunk)."""
    adapter = fed.server.adapter_of(order[0].client_id)
    try:
        for start in range(0, len(order), size):
            chunk = order[start : start + size]
            fed.server.set_barrier(adapter, len(chunk))
            fed.train_clients(chunk, round_index, parallel=True)
    finally:
        fed.server.set_barrier(adapter, 1)  # back to one client at a time
    return sorted(order, key=lambda m: m.index)


def one_client_at_a_time(config: Config) -> tuple[str, str] | None:
    """The server serves one client at a time, unless ``framework.merge`` trains K at once."""
    return ("serves one client at a time", "set framework.merge>1") if config.framework.merge <= 1 else None


def serving_order(config: Config, round_index: int, members: list[Member]) -> list[Member]:
    """The order the server serves ``members`` in round ``round_index``: a shuffle seeded by the run's seed and the
    round (the same on every machine and every attempt)."""
    order = list(members)
    random.Random(config.seed * 104729 + round_index).shuffle(order)
    return order


def sflv2_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    order = serving_order(fed.config, round_index, members)
    merge = fed.config.framework.merge
    if merge > 1:  # MiniBatch-SFL: K clients at a time, their smashed data merged into one trunk batch
        finished = train_in_chunks(fed, order, round_index, merge)
    else:  # The server serves one client at a time, updating the shared adapter at once.
        finished = fed.train_clients(order, round_index, parallel=False)
    if fed.mixed:  # a block some run in their head and others on the trunk: averaged over both
        average_across_cuts(fed, finished)
    else:
        average_client_sides(fed, finished)
    return [finished[0]]


SFLV2 = register(
    Framework(
        "sflv2",
        sflv2_round,
        "split-federated learning V2: one client at a time in random order, one shared trunk adapter updated "
        "at once; client sides FedAvg'd every round (framework.merge K: K clients at a time, merged)",
        aggregates=True,
        serial=one_client_at_a_time,
    )
)
