"""Tenants on one server are isolated: client A's training touches nothing of client B's.

Under sflv1 each client has its own head/tail, its own server adapter and that adapter's own optimizer, all
on one shared frozen base. After A trains, every tensor of B's is bit-identical (torch.equal: any leak,
even a rounding-level one, shows), and A's have changed. Unknown ids are errors, never a silent default.
"""

from __future__ import annotations

import copy

import pytest
import torch

from splitlm.errors import ProtocolError
from splitlm.frameworks.federation import Federation, build_federation
from splitlm.transport import Message

D = 64  # tiny-llama's hidden size


def _optimizer_tensors(fed: Federation, adapter: str) -> dict[str, torch.Tensor]:
    optimizer = fed.server.optimizer(adapter).optimizer
    assert optimizer is not None
    state = copy.deepcopy(optimizer.state_dict()["state"])
    return {f"{i}.{k}": v for i, entry in state.items() for k, v in entry.items() if torch.is_tensor(v)}


def _client_optimizer_tensors(member) -> dict[str, torch.Tensor]:
    state = copy.deepcopy(member.client.optimizer.optimizer.state_dict()["state"])
    return {f"{i}.{k}": v for i, entry in state.items() for k, v in entry.items() if torch.is_tensor(v)}


def _snapshot(fed: Federation, index: int) -> dict[str, dict[str, torch.Tensor]]:
    member = fed.members[index]
    adapter = fed.server.adapter_of(member.client_id)
    return {
        "server adapter": fed.server.adapter_state(adapter),
        "server optimizer": _optimizer_tensors(fed, adapter),
        "client state": {k: v.detach().clone() for k, v in member.client.state().items()},
        "client optimizer": _client_optimizer_tensors(member),
    }


def _same(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> bool:
    return set(before) == set(after) and all(torch.equal(before[k], after[k]) for k in before)


@pytest.fixture
def fed(make_config) -> Federation:
    config = make_config(
        "fed", "framework.name=sflv1", "framework.num_clients=2", "framework.local_steps=1", "train.warmup_steps=0"
    )
    return build_federation(config)


@pytest.mark.parametrize("worker", [False, True], ids=["inline", "worker"])
def test_training_a_leaves_b_bit_identical(fed: Federation, worker: bool) -> None:
    a, b = fed.members
    assert fed.server.adapter_of(a.client_id) == "client-0"
    assert fed.server.adapter_of(b.client_id) == "client-1"
    if worker:
        fed.server.start()
    try:
        fed.local_training(b, 0)  # B trains first, so its optimizers hold state worth protecting
        before_b, before_a = _snapshot(fed, 1), _snapshot(fed, 0)
        assert before_b["server optimizer"] and before_b["client optimizer"]
        assert not before_a["server optimizer"]  # A has not stepped yet: AdamW state is created lazily
        fed.local_training(a, 0)
    finally:
        fed.server.stop()
    after_b, after_a = _snapshot(fed, 1), _snapshot(fed, 0)
    for part in before_b:
        assert _same(before_b[part], after_b[part]), f"client B's {part} changed when A trained"
    assert not _same(before_a["server adapter"], after_a["server adapter"])
    assert not _same(before_a["client state"], after_a["client state"])
    assert after_a["server optimizer"] and after_a["client optimizer"]
    assert (a.steps_done, b.steps_done) == (1, 1)


def _eval_message(client_id: str) -> Message:
    hidden = torch.randn(1, 4, D, generator=torch.Generator().manual_seed(0))
    return Message("eval", client_id, -1, 0, {"hidden": hidden, "attention_mask": torch.ones(1, 4, dtype=torch.long)})


@pytest.mark.parametrize("worker", [False, True], ids=["inline", "worker"])
def test_unknown_client_is_rejected_and_the_server_keeps_serving(fed: Federation, worker: bool) -> None:
    server = fed.server
    adapters = {name: server.adapter_state(name) for name in server.bank.names}
    if worker:
        server.start()
    try:
        for kind in ("forward", "eval", "step"):
            message = _eval_message("nope")
            message.kind = kind
            with pytest.raises(ProtocolError, match=r"unknown client 'nope'.*\['0', '1'\]"):
                server.handle(message)
        reply = server.handle(_eval_message("0"))  # a valid request afterwards is answered
        assert reply.kind == "activations" and reply.tensors["hidden"].shape == (1, 4, D)
        fed.local_training(fed.members[0], 0)  # and so is a whole training step
    finally:
        server.stop()
    assert "nope" not in server.routes
    assert fed.members[0].steps_done == 1
    for name, state in adapters.items():  # the rejected requests changed no adapter; the step changed client-0
        assert _same(state, server.adapter_state(name)) == (name != "client-0"), name


def test_adapter_bank_refuses_unknown_names(fed: Federation) -> None:
    bank = fed.server.bank
    assert bank is not None
    assert sorted(bank.names) == ["client-0", "client-1", "default"]
    with pytest.raises(ProtocolError, match=r"unknown adapter 'nope'.*client-0"), bank.use("nope"):
        pass
    with pytest.raises(ProtocolError, match="unknown adapter 'nope'"):
        bank.optimizer("nope")
    with pytest.raises(ProtocolError, match="unknown client"):
        fed.server.adapter_of("nope")
    with bank.use("client-1"):  # a known name still works after the refusals
        pass
