"""``sl``: sequential split learning. Clients train one after another; each starts from the client side the
previous one finished with, and all share one trunk adapter (Vepakomma et al.; the survey's vanilla SL).

With one client this is the 11-step pipeline once per micro-batch, the reference every other framework and
the centralized baseline are checked against.
"""

from __future__ import annotations

import torch

from splitlm.frameworks.base import Framework, register
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import same_cut_and_rank


def decelerated(
    previous: dict[str, torch.Tensor] | None, trained: dict[str, torch.Tensor], ema: float
) -> dict[str, torch.Tensor]:
    """SLwF's decelerated update (``train.ema``): ``ema * previous + (1 - ema) * trained`` tensor by tensor, so
    one client's local steps move the carried client side only part of the way and cannot overwrite what the
    clients before it taught. Accumulated in float64 and returned in each trained tensor's dtype; with no
    previous carry (the very first client), or a tensor it lacks or shapes differently, the trained one as it is."""
    if previous is None:
        return dict(trained)
    mixed = {}
    for name, now in trained.items():
        before = previous.get(name)
        if before is None or before.shape != now.shape or not now.is_floating_point():
            mixed[name] = now
            continue
        average = ema * before.to(now.device, torch.float64) + (1.0 - ema) * now.to(torch.float64)
        mixed[name] = average.to(now.dtype)
    return mixed


def train_in_sequence(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    """SL order: each client starts from the client-side weights the previous one finished with (with
    ``train.ema``, their moving average with the ones it started from).

    With ``data.client_eval_size`` in a sequential framework, each client's held-out loss of the client side it
    passes on is noted right then (``Member.fresh``), and its accuracy on classification-style data: the driver's
    ``forgetting`` is how much that loss grew by the end of the round, once the later clients trained, and
    ``accuracy_forgetting`` how much the accuracy fell."""
    ema = fed.config.train.ema
    watch = fed.framework.sequential and fed.config.data.client_eval_size > 0
    for member in fed.members:  # forget what a rolled-back attempt at this round noted
        if member.fresh is not None and member.fresh[0] == round_index:
            member.fresh = None
    for position, member in enumerate(members):
        member.stale = fed.carry is not None  # so local_training first loads the carried client side
        fed.local_training(member, round_index)
        previous = fed.carry
        fed.pass_on(member)
        if ema and previous is not None and fed.carry is not None:
            # the carry is now no client's own state: the next client (this one too) loads it
            fed.carry, fed.carry_from = decelerated(previous, fed.carry, ema), None
        if watch and member.held_out:  # the carry, which with train.ema is no client's own state
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
