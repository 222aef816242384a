"""``psl``: parallel split learning. Clients train at once, each keeping its own client side; the server's
one trunk adapter takes one update per synchronised step, from the mean of all clients' gradients
(Jeon & Kim 2020; the survey's PSL).

With ``framework.merge`` K > 1 (MiniBatch-SFL / SCALA, survey §3.1.2) the server concatenates the smashed data
of K of the step's clients into one trunk batch (per micro-batch) and splits outputs and gradients back, instead
of one trunk pass per client; the step's update is the same (the trunk's gradient is still the sum of the
clients' ones, divided by their number).
"""

from __future__ import annotations

from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member


def psl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    # One trunk update per step from all clients' gradients (no drop-out tolerance: the step waits for all).
    fed.server.set_barrier("default", len(members))
    fed.parallel([lambda m=m: fed.local_training(m, round_index) for m in members])
    return members


PSL = register(
    Framework(
        "psl",
        psl_round,
        "parallel split learning: clients at once, each keeping its own client side; one shared trunk adapter "
        "updated once per step from all clients' gradients",
        barrier=True,
    )
)
