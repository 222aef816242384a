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
    """SL order: each client starts from the client-side weights the previous one finished with (or what a remedy
    makes of them and the ones it started from: ``Remedy.passed_on``, e.g. a moving average).

    With ``data.client_eval_size`` in a sequential framework, each client's held-out loss of the client side it
    passes on is noted right then (``Member.fresh``), and its accuracy on classification-style data: the driver's
    ``forgetting`` is how much that loss grew by the end of the round, once the later clients trained, and
    ``accuracy_forgetting`` how much the accuracy fell."""
    watch = fed.framework.sequential and fed.config.data.client_eval_size > 0
    for member in fed.members:  # forget what a rolled-back attempt at this round noted
        if member.fresh is not None and member.fresh[0] == round_index:
            member.fresh = None
    for position, member in enumerate(members):
        member.stale = fed.carry is not None  # so local_training first loads the carried client side
        fed.local_training(member, round_index)
        previous = fed.carry
        fed.pass_on(member)
        for remedy in fed.remedies:
            passed = remedy.passed_on(previous, fed.carry) if previous is not None and fed.carry is not None else None
            if passed is not None:  # the carry is now no client's own state: the next client (this one too) loads it
                fed.carry, fed.carry_from = passed, None
        if watch and member.held_out:  # the carry, which with a remedy's passed_on may be no client's own state
            carried = fed.carry if fed.carry_from != member.client_id else None
            member.fresh = (round_index, position, *member.held_out_scores(fed, carried))
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
        sequential=True,
    )
)
