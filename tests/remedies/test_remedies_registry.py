"""A remedy of a user's own, registered from this test module: validated with every other config problem (its
settings, its own rules, the closest name for a typo), and run in-process and over gRPC through the seams alone
(a client plugin that reads the server's reply, and a server mod that writes it). The core takes no remedy
parameters: ``SplitClient`` and ``Member`` know no remedy by name."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import Field

from splitlm.data import DataOrder, collate
from splitlm.errors import ConfigError
from splitlm.frameworks import config_problems, framework_of
from splitlm.frameworks.federation import Member, build_client, build_federation
from splitlm.frameworks.setup import load_source
from splitlm.peft import trainable_state
from splitlm.registry import ComponentSettings
from splitlm.remedies import REMEDIES, ClientSetup, Remedy
from splitlm.runtime.client import SplitClient
from splitlm.runtime.plugins import ClientPlugin, Micro
from splitlm.transport import InProcessTransport, Mod, server_chain
from splitlm.transport.base import Answer, Handler, then
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import GrpcServer
from splitlm.transport.messages import Message
from splitlm.transport.security import load_tokens, make_dev_certs

TARGET = "pull_target"


class PullTarget(Mod):
    """Server half: each training forward's reply carries the per-feature mean of the smashed data it served,
    shifted by ``shift`` (float32, (d,))."""

    name = "pull"

    def __init__(self, shift: float) -> None:
        self.shift = shift

    def serve(self, message: Message, call_next: Handler) -> Answer:
        hidden = message.tensors.get("hidden")
        if message.kind != "forward" or hidden is None:
            return call_next(message)
        target = hidden.detach().float().mean(dim=(0, 1)) + self.shift
        return then(call_next(message), lambda reply: reply.replace({**reply.tensors, TARGET: target}))


class Pull(ClientPlugin):
    """Client half: weight x || mean of the head's output - the server's target ||^2, joined to step 10."""

    name = "pull"

    def __init__(self, weight: float) -> None:
        self.weight = weight
        self.seen = 0  # replies that carried a target

    def head_loss(self, micro: Micro) -> torch.Tensor | None:
        if micro.reply is None or TARGET not in micro.reply.tensors or micro.hidden is None:
            return None
        self.seen += 1
        target = micro.reply.tensors[TARGET].to(micro.hidden.device)
        return self.weight * micro.scale * (micro.hidden.float().mean(dim=(0, 1)) - target).pow(2).sum()


@REMEDIES.component
class PullRemedy(Remedy):
    name = "pull_together"

    class Settings(ComponentSettings):
        weight: float = Field(0.5, gt=0, description="The pull's weight.")
        shift: float = Field(1.0, description="How far the server's target lies from the served mean.")

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is not None and not framework.split:
            return [f"remedies.pull_together: pulls a split client's head; framework.name={framework.name} has none"]
        return []

    def client_plugin(self, setup: ClientSetup) -> ClientPlugin | None:
        return Pull(self.settings.weight)

    def server_mod(self, config: Any) -> Mod | None:
        return PullTarget(self.settings.shift)


ON = ("remedies.pull_together.weight=2.0", "train.warmup_steps=0")


def test_the_core_takes_no_remedy_parameters() -> None:
    parameters = set(inspect.signature(SplitClient).parameters)
    assert parameters == {"client_id", "parts", "stages", "channel", "optimizer", "mode", "plugins", "schedule", "seed"}
    fields = {f.name for f in dataclasses.fields(Member)}
    assert not fields & {"personal", "replay", "adjust", "align", "personalize", "update", "prune", "pace"}
    assert "remedy_state" in fields


def test_a_registered_remedy_is_validated_with_the_config(make_config) -> None:
    config = make_config("ok", *ON)
    assert config_problems(config.model_dump(mode="json")) == []
    typo = make_config("typo", "remedies.pull_togther.weight=2.0")
    (problem,) = config_problems(typo.model_dump(mode="json"))
    assert problem.startswith("remedies: unknown remedy 'pull_togther'; choose from [")
    assert problem.endswith("(did you mean 'pull_together'?)")
    bad = make_config("bad", "remedies.pull_together.weight=0", "remedies.pull_together.wieght=1")
    assert config_problems(bad.model_dump(mode="json")) == [
        "remedies.pull_together.weight: Input should be greater than 0 (got 0)",
        "remedies.pull_together.wieght: unknown key (did you mean 'weight'?)",
    ]
    unsplit = make_config("unsplit", "framework.name=centralized", *ON)
    with pytest.raises(ConfigError) as error:
        framework_of(unsplit).check(unsplit)
    assert "remedies.pull_together: pulls a split client's head; framework.name=centralized has none" in str(
        error.value
    )
    assert "\n" not in str(error.value)


def _step(client: Any, member: Member, pad_id: int, steps: int = 2) -> list[float]:
    order = DataOrder(len(member.examples), 4, 0)
    return [
        client.train_step(step, [collate([member.examples[i] for i in order.indices(step)], pad_id)]).loss
        for step in range(steps)
    ]


def _head(client: Any) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainable_state(client.parts["head"]).items()}


def test_it_runs_in_process_through_its_plugin_and_mod(make_config) -> None:
    plain = build_federation(make_config("plain", "train.warmup_steps=0"))
    pulled = build_federation(make_config("pulled", *ON))
    plugin = next(p for p in pulled.members[0].client.plugins if isinstance(p, Pull))
    assert any(isinstance(m, PullTarget) for m in pulled.server_mods)
    losses = _step(pulled.members[0].client, pulled.members[0], pulled.pad_id)
    reference = _step(plain.members[0].client, plain.members[0], plain.pad_id)
    assert losses[0] == reference[0] and losses[1] != reference[1]  # the same first forward, then a pulled head
    assert plugin.seen == 2  # every training reply carried the server's target
    head, reference = _head(pulled.members[0].client), _head(plain.members[0].client)
    assert any(not torch.equal(head[k], reference[k]) for k in head)  # and the pull moved the head


@pytest.fixture
def served(make_config, tmp_path: Path) -> Iterator[tuple]:
    """One server with the remedy's mod, two trunk adapters that start equal: client 0 in this process, client 1
    over gRPC (TLS), each with the remedy's plugin."""
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1"])
    by_token = load_tokens(certs / "tokens.json")
    config = make_config("run", *ON)
    fed = build_federation(config)
    server = fed.server
    for client in ("0", "1"):
        server.assign(client, f"own-{client}")
    handler = server_chain(fed.server_mods, server.submit)
    grpc_server = GrpcServer(handler, by_token, "127.0.0.1:0", certs)
    server.start()
    grpc_server.start()
    tokens = {client: token for token, client in by_token.items()}
    source, examples = load_source(config), fed.members[0].examples
    local, _ = build_client(config, fed.framework, source, 0, InProcessTransport(handler), examples=examples)
    connection = GrpcConnection(f"127.0.0.1:{grpc_server.port}", "1", tokens["1"], ca=certs / "ca.pem")
    remote, _ = build_client(config, fed.framework, source, 1, connection, examples=examples)
    try:
        yield fed, local, remote
    finally:
        remote.channel.close()
        grpc_server.stop()
        server.stop()


def test_over_grpc_it_computes_what_it_computes_in_process(served) -> None:
    fed, local, remote = served
    member = fed.members[0]
    assert _step(local, member, fed.pad_id) == _step(remote, member, fed.pad_id)
    for client in (local, remote):
        assert next(p for p in client.plugins if isinstance(p, Pull)).seen == 2
    one, two = _head(local), _head(remote)
    for key in one:
        torch.testing.assert_close(one[key], two[key], rtol=0, atol=0)


def test_a_members_remedy_state_is_checkpointed_snapshotted_and_restored(make_config, tmp_path: Path) -> None:
    fed = build_federation(make_config("state", "remedies=[multi_exit]"))
    member = fed.members[0]
    assert not member.remedy_state
    fed.local_training(member, 0)  # multi_exit keeps the client side its own training left
    kept = member.remedy_state["multi_exit"]
    assert kept.keys() == member.client.state().keys()
    snapshot = member.snapshot()
    member.remedy_state = {}
    member.restore(snapshot)
    assert member.remedy_state["multi_exit"] is kept
    fed.save(tmp_path / "checkpoint")
    member.remedy_state = {}
    fed.load(tmp_path / "checkpoint")
    assert member.remedy_state.keys() == {"multi_exit"}
    assert all(torch.equal(member.remedy_state["multi_exit"][k], v) for k, v in kept.items())
