"""The frameworks, each a short recipe for one round: who trains when, and what gets averaged.

Every recipe receives the round's participants and returns the members whose client side is the global
model after the round (one member), or all participants when each keeps its own (psl).

| framework | clients run      | server adapter              | client side after the round          |
|-----------|------------------|-----------------------------|--------------------------------------|
| sl        | one after another| one, shared                 | passed from each client to the next  |
| psl       | at once          | one, shared, one update/step| each client keeps its own            |
| sflv1     | at once          | one per client, FedAvg'd    | FedAvg'd                             |
| sflv2     | one at a time, random order | one, shared      | FedAvg'd                             |
| gsfl      | groups at once, SL inside   | one per group, FedAvg'd | FedAvg'd over groups             |
"""

from __future__ import annotations

import random
from typing import Any

from splitlm.config import Config
from splitlm.frameworks.aggregate import fedavg
from splitlm.frameworks.federation import Federation, Member, check_supported, run_rounds
from splitlm.frameworks.registry import register


def _train_in_sequence(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    """SL order: each client starts from the client-side weights the previous one finished with."""
    finished = []
    for member in members:
        member.stale = fed.carry is not None  # so local_training first loads the carried client side
        if fed.try_training(member, round_index):
            finished.append(member)
            fed.carry = member.client.state()
    fed.check_quorum(finished, members, round_index)
    return finished


def sl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    finished = _train_in_sequence(fed, round_index, members)
    if fed.carry is not None:
        fed.broadcast(fed.carry)  # everyone holds the latest client side for evaluation and the next round
    return [finished[-1]] if finished else [members[0]]


def psl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    # One trunk update per step from all clients' gradients (no drop-out tolerance: the step waits for all).
    fed.server.barriers["default"] = len(members)
    fed.parallel([lambda m=m: fed.local_training(m, round_index) for m in members])
    return members


def _average_client_sides(fed: Federation, finished: list[Member]) -> None:
    fed.broadcast(fedavg([m.client.state() for m in finished], fed.weights(finished)))


def sflv1_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    finished = fed.train_clients(members, round_index, parallel=True)
    _average_client_sides(fed, finished)
    adapters = [fed.server.adapter_of(m.client_id) for m in finished]
    trunk = fedavg([fed.server.adapter_state(a) for a in adapters], fed.weights(finished))
    for member in fed.members:
        fed.server.load_adapter_state(fed.server.adapter_of(member.client_id), trunk)
    return [finished[0]]


def sflv2_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    order = list(members)
    random.Random(fed.config.seed * 104729 + round_index).shuffle(order)
    # The server serves one client at a time, updating the shared adapter at once.
    finished = fed.train_clients(order, round_index, parallel=False)
    _average_client_sides(fed, finished)
    return [finished[0]]


def gsfl_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    chosen = {m.index for m in members}
    groups = [[fed.members[i] for i in group if i in chosen] for group in fed.groups]
    groups = [g for g in groups if g]
    start = fed.carry
    finished: list[dict] = [{} for _ in groups]

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
    fed.broadcast(fedavg(finished, weights))
    adapters = [fed.server.adapter_of(g[0].client_id) for g in groups]
    trunk = fedavg([fed.server.adapter_state(a) for a in adapters], weights)
    for adapter in {fed.server.adapter_of(m.client_id) for m in fed.members}:
        fed.server.load_adapter_state(adapter, trunk)
    return [members[0]]


ROUNDS = {"sl": sl_round, "psl": psl_round, "sflv1": sflv1_round, "sflv2": sflv2_round, "gsfl": gsfl_round}


def _recipe(name: str):
    def run(config: Config, resume: bool = False) -> dict[str, Any]:
        check_supported(config)
        return run_rounds(config, ROUNDS[name], resume)

    run.__name__ = f"run_{name}"
    return run


for _name in ("psl", "sflv1", "sflv2", "gsfl"):
    register(_name)(_recipe(_name))
run_multi_sl = _recipe("sl")
