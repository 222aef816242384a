"""Scheduling policies on scripted arrivals: each pops in its documented order, skips what may not run now
(back-pressure), and never lets an internal action jump ahead or fall behind."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from splitlm.errors import ConfigError
from splitlm.frameworks import framework_of
from splitlm.runtime.scheduling import POLICIES, Fifo, Policy, Request, make_policy, register_policy, request_tokens
from splitlm.transport import Message


def _request(kind: str, client: str, step: int, tokens: int = 0) -> Request:
    tensors = {"grad": torch.zeros(1, tokens, 2)} if tokens else {}
    return Request(Message(kind, client, step, 0, tensors))


def _action() -> Request:
    return Request(Message("internal", "-", -1), action=lambda: None)


def _name(request: Request) -> str:
    m = request.message
    return "action" if request.action is not None else f"{m.kind[0]}{m.client_id}{m.step}"


def _drain(policy: Policy, admissible=None) -> list[str]:
    order = []
    while (request := policy.pop(admissible)) is not None:
        order.append(_name(request))
    return order


def _push(policy: Policy, *requests: Request) -> Policy:
    for request in requests:
        policy.push(request)
    return policy


def test_straggler_first_serves_the_lowest_step_first_ties_in_arrival_order() -> None:
    policy = _push(
        make_policy("straggler_first"),
        _request("forward", "a", 5),
        _request("forward", "b", 2),
        _request("backward", "c", 3),
        _request("step", "b", 2),
        _request("forward", "d", 7),
        _request("forward", "c", 2),
    )
    assert _drain(policy) == ["fb2", "sb2", "fc2", "bc3", "fa5", "fd7"]


def test_straggler_first_lets_a_late_straggler_go_ahead() -> None:
    policy = _push(make_policy("straggler_first"), _request("forward", "a", 4), _request("forward", "b", 4))
    assert _name(policy.pop()) == "fa4"
    policy.push(_request("forward", "c", 1))
    assert _drain(policy) == ["fc1", "fb4"]


def test_longest_backward_first_serves_backwards_first_longest_first() -> None:
    policy = _push(
        make_policy("longest_backward_first"),
        _request("forward", "a", 0),
        _request("backward", "b", 0, tokens=4),
        _request("eval", "c", 0),
        _request("backward", "d", 0, tokens=16),
        _request("step", "e", 0),
        _request("backward", "f", 0, tokens=4),
        _request("forward", "g", 0),
    )
    # backwards by expected time (ties in arrival order), then the rest in arrival order
    assert _drain(policy) == ["bd0", "bb0", "bf0", "fa0", "ec0", "se0", "fg0"]


def test_longest_backward_first_uses_the_servers_cost_estimate() -> None:
    blocks = {"short": 1, "deep": 8}  # trunk blocks of each client's route
    policy = make_policy("longest_backward_first", cost=lambda r: blocks[r.message.client_id] * request_tokens(r))
    _push(policy, _request("backward", "short", 0, tokens=6), _request("backward", "deep", 0, tokens=1))
    assert _drain(policy) == ["bdeep0", "bshort0"]
    assert request_tokens(_request("backward", "x", 0, tokens=6)) == 6
    assert request_tokens(_request("forward", "x", 0)) == 0


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_an_internal_action_keeps_its_place_in_every_policy(name: str) -> None:
    policy = _push(
        make_policy(name),
        _request("forward", "a", 3),
        _request("backward", "b", 1, tokens=2),
        _action(),
        _request("backward", "c", 0, tokens=9),
        _request("forward", "a", 0),
    )
    order = _drain(policy)
    assert len(order) == 5
    # after both requests queued before it, before both queued after it
    assert sorted(order[:2]) == ["bb1", "fa3"] and order[2] == "action" and sorted(order[3:]) == ["bc0", "fa0"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_a_held_back_request_does_not_hold_an_action_back(name: str) -> None:
    def admissible(request: Request) -> bool:
        return request.message.kind != "forward" or held_back is False

    held_back = True
    policy = _push(
        make_policy(name),
        _request("forward", "a", 0),
        _request("backward", "b", 0, tokens=2),
        _action(),
        _request("backward", "c", 1, tokens=2),
    )
    assert _drain(policy, admissible) == ["bb0", "action", "bc1"]
    assert len(policy) == 1  # the forward waits, never dropped
    held_back = False
    assert _drain(policy, admissible) == ["fa0"]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_pop_returns_none_when_nothing_may_run(name: str) -> None:
    policy = make_policy(name)
    assert policy.pop() is None
    policy.push(_request("forward", "a", 0))
    assert policy.pop(lambda r: False) is None
    assert len(policy) == 1
    assert _name(policy.pop()) == "fa0"


def test_round_robin_skips_a_held_back_client_and_keeps_the_turns() -> None:
    policy = _push(
        make_policy("round_robin"),
        _request("forward", "a", 0),
        _request("forward", "a", 1),
        _request("forward", "b", 0),
        _request("backward", "b", 1),
        _request("forward", "c", 0),
    )
    backwards_only = _drain(policy, lambda r: r.message.kind != "forward" or r.message.client_id != "b")
    assert backwards_only == ["fa0", "bb1", "fc0", "fa1"]
    assert _drain(policy) == ["fb0"]


def test_a_policy_declares_its_own_problems_and_the_framework_check_collects_them(make_config) -> None:
    @register_policy("test_picky")
    class Picky(Fifo):
        @classmethod
        def problems(cls, config: Any, framework: Any) -> list[str]:
            if not framework.barrier:
                return []
            return [f"server.policy=test_picky: not behind a barrier; framework.name={framework.name}: use sl"]

    try:
        psl = make_config("psl", "framework.name=psl", "framework.num_clients=2", "server.policy=test_picky")
        with pytest.raises(ConfigError, match=r"server\.policy=test_picky: not behind a barrier; framework\.name=psl"):
            framework_of(psl).check(psl)
        sl = make_config("sl", "server.policy=test_picky")
        framework_of(sl).check(sl)  # no barrier: no problem
    finally:
        POLICIES.remove("test_picky")
