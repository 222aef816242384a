"""``sflv2``: split-federated learning V2 (Thapa et al.). The server serves one client at a time, in a random
order each round, updating its one shared trunk adapter at once; the client sides are FedAvg'd (step 11).
"""

from __future__ import annotations

import random

from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.sflv1 import average_across_cuts, average_client_sides


def sflv2_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    order = list(members)
    random.Random(fed.config.seed * 104729 + round_index).shuffle(order)
    # The server serves one client at a time, updating the shared adapter at once.
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
        "at once; client sides FedAvg'd every round",
    )
)
