"""``server.policy=dissimilar_first`` (Hourglass) on scripted arrivals: forwards whose smashed data differs most
from the recently served ones go first, backwards/steps/evals before forwards in arrival order, actions keep
their place, and held-back requests wait without blocking the others."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from splitlm.frameworks import run_framework
from splitlm.runtime.scheduling import SIMHASH_WINDOW, Request, make_policy, summarise_hidden
from splitlm.transport import Message

WIDTH = 16


def _direction(seed: int) -> torch.Tensor:
    """A random unit direction of the hidden width; different seeds give (nearly) orthogonal ones."""
    vector = torch.randn(WIDTH, generator=torch.Generator().manual_seed(seed))
    return vector / vector.norm()


# Two clusters of smashed data: A and B point (almost) the same way, C the opposite way.
A, C = _direction(1), -_direction(1)
B = A + 0.01 * _direction(2)


def _forward(client: str, direction: torch.Tensor, step: int = 0, noise: int = 0) -> Request:
    """A forward whose hidden states (2, 3, d) all lie near ``direction``; the last token is padding."""
    hidden = direction.expand(2, 3, WIDTH).clone()
    hidden += 1e-3 * torch.randn(2, 3, WIDTH, generator=torch.Generator().manual_seed(noise))
    hidden[:, -1] = -100 * direction  # padding: must not count
    mask = torch.tensor([[1, 1, 0], [1, 1, 0]])
    return Request(Message("forward", client, step, 0, {"hidden": hidden, "attention_mask": mask}))


def _request(kind: str, client: str, step: int = 0) -> Request:
    return Request(Message(kind, client, step, 0, {"grad": torch.zeros(1, 2, WIDTH)} if kind == "backward" else {}))


def _action() -> Request:
    return Request(Message("internal", "-", -1), action=lambda: None)


def _name(request: Request) -> str:
    m = request.message
    return "action" if request.action is not None else f"{m.kind[0]}{m.client_id}{m.step}"


def _drain(policy, admissible=None) -> list[str]:
    order = []
    while (request := policy.pop(admissible)) is not None:
        order.append(_name(request))
    return order


def _push(policy, *requests: Request):
    for request in requests:
        policy.push(request)
    return policy


def test_the_summary_is_the_mean_over_real_tokens() -> None:
    request = _forward("a", A)
    summary = summarise_hidden(request.message)
    assert summary is not None and summary.shape == (WIDTH,)
    assert torch.allclose(summary, A, atol=1e-2)  # the padding (-100 x A) would flip it
    assert summarise_hidden(Message("forward", "a", 0, 0, {})) is None
    assert summarise_hidden(Message("forward", "a", 0, 0, {"hidden": torch.full((1, 2, WIDTH), float("nan"))})) is None
    assert summarise_hidden(Message("forward", "a", 0, 0, {"hidden": torch.ones(2, WIDTH)})) is None


def test_a_forward_unlike_the_recent_ones_goes_first() -> None:
    policy = make_policy("dissimilar_first")
    policy.push(_forward("a", A, 0))
    assert _name(policy.pop()) == "fa0"  # nothing recent yet: arrival order
    _push(policy, _forward("b", B, 0, noise=1), _forward("a", A, 1, noise=2), _forward("c", C, 0, noise=3))
    # recent: A. C is farthest from it; then B and A (both like A) in arrival order
    assert _name(policy.pop()) == "fc0"
    # recent: A, C. B and A are equally near A and far from C: arrival order
    assert _drain(policy) == ["fb0", "fa1"]


def test_the_window_forgets_old_forwards() -> None:
    policy = make_policy("dissimilar_first")
    policy.push(_forward("c", C))
    assert _name(policy.pop()) == "fc0"
    for step in range(SIMHASH_WINDOW):  # then a window full of A: C is forgotten
        policy.push(_forward("a", A, step + 1, noise=step))
        policy.pop()
    _push(policy, _forward("b", B, 0, noise=50), _forward("c", C, 1, noise=51))
    assert _drain(policy) == ["fc1", "fb0"]  # C, unlike the window, first despite arriving later


def test_backwards_steps_and_evals_go_before_forwards_in_arrival_order() -> None:
    policy = _push(
        make_policy("dissimilar_first"),
        _forward("a", A),
        _request("step", "b", 3),
        _forward("c", C, noise=1),
        _request("backward", "d", 1),
        _request("eval", "e", -1),
    )
    assert _drain(policy) == ["sb3", "bd1", "ee-1", "fa0", "fc0"]


def test_a_forward_without_a_usable_hidden_is_served_not_dropped() -> None:
    broken = Request(Message("forward", "x", 0, 0, {"hidden": torch.ones(2, WIDTH)}))  # the server rejects it
    policy = make_policy("dissimilar_first")
    policy.push(_forward("a", A))
    policy.pop()
    _push(policy, _forward("b", B, noise=1), broken)
    assert _drain(policy) == ["fx0", "fb0"]


def test_an_action_keeps_its_place() -> None:
    policy = make_policy("dissimilar_first")
    policy.push(_forward("a", A))
    policy.pop()  # recent: A
    _push(policy, _forward("b", B, 0, noise=1), _action(), _forward("c", C, 0, noise=2))
    # C is the most dissimilar but arrived after the action: it may not jump ahead of it
    assert _drain(policy) == ["fb0", "action", "fc0"]


def test_held_back_forwards_wait_and_do_not_block() -> None:
    held = {"c"}

    def admissible(request: Request) -> bool:
        return request.message.client_id not in held

    policy = make_policy("dissimilar_first")
    policy.push(_forward("a", A))
    policy.pop()  # recent: A
    _push(policy, _forward("c", C, 0, noise=1), _forward("b", B, 0, noise=2), _action(), _request("backward", "d"))
    # C would go first but is held back: B runs, the action is not blocked by C, the backward follows it
    assert _drain(policy, admissible) == ["fb0", "action", "bd0"]
    assert len(policy) == 1  # C waits, never dropped
    held.clear()
    assert _drain(policy, admissible) == ["fc0"]
    assert policy.pop() is None


def test_the_hash_is_the_same_in_every_queue_and_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    before = torch.get_rng_state()
    first, second = make_policy("dissimilar_first"), make_policy("dissimilar_first")
    for policy in (first, second):
        _push(policy, _forward("a", A), _forward("c", C, noise=1))
    assert torch.equal(torch.get_rng_state(), before)
    assert first._hashes[id(first._waiting[0])] == second._hashes[id(second._waiting[0])]
    assert first._hashes[id(first._waiting[0])] != first._hashes[id(first._waiting[1])]


def test_a_psl_run_with_dissimilar_first_trains_like_fifo(make_config, run_files) -> None:
    common = ("framework.name=psl", "framework.num_clients=3", "framework.rounds=1", "train.steps=3")
    runs = {}
    for policy in ("fifo", "dissimilar_first"):
        config = make_config(policy, *common, f"server.policy={policy}")
        run_framework(config)
        runs[policy] = sorted(
            (r["round"], r["step"], r["client"], r["loss"]) for r in run_files.metrics(Path(config.output_dir))
        )
    assert len(runs["dissimilar_first"]) == 3 * 3
    # the order of service only reassociates the sum of the clients' trunk gradients (float32 noise)
    for (*key1, fifo), (*key2, dissimilar) in zip(runs["fifo"], runs["dissimilar_first"], strict=True):
        assert key1 == key2
        assert dissimilar == pytest.approx(fifo, rel=1e-4)
