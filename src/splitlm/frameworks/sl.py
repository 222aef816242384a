"""``sl``: sequential split learning. Clients train one after another; each starts from the client side the
previous one finished with, and all share one trunk adapter (Vepakomma et al.; the survey's vanilla SL).

With one client this is the 11-step pipeline once per micro-batch, the reference every other framework and
the centralized baseline are checked against.
"""

from __future__ import annotations

from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import same_cut_and_rank


def train_in_sequence(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    """SL order: each client starts from the client-side weights the previous one finished with."""
    for member in members:
        member.stale = fed.carry is not None  # so local_training first loads the carried client side
        fed.local_training(member, round_index)
        fed.pass_on(member)
    return list(members)


def sl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    train_in_sequence(fed, round_index, members)
    if fed.carry is not None and len(fed.members) > 1:
        fed.broadcast(fed.carry)  # everyone holds the latest client side for evaluation and the next round
    return [members[-1]]


SL = register(
    Framework(
        "sl",
        sl_round,
        "sequential split learning: clients one after another, one shared trunk adapter, the client side "
        "passed from each client to the next",
        checks=(same_cut_and_rank("passes one client side from each client to the next"),),
    )
)
