"""Pipelined micro-batches over gRPC (TLS) compute the same step as the serial schedule.

One in-test server holds two trunk adapters that start equal; client 0 runs its steps one micro-batch after
another, client 1 pipelines them (several requests in flight on its stream). Both clients start equal and see
the same micro-batches, so their losses, their own parts and their trunk adapters agree.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from splitlm.data import DataOrder, collate
from splitlm.frameworks.federation import build_client, build_federation
from splitlm.frameworks.setup import load_source
from splitlm.peft.lora import ADAPTER
from splitlm.runtime.schedule import pipelined, serial
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import GrpcServer
from splitlm.transport.security import load_tokens, make_dev_certs


@pytest.fixture(params=["ushape", "vanilla"])
def served(request, fast_config, tmp_path: Path) -> Iterator[tuple]:
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1"])
    by_token = load_tokens(certs / "tokens.json")
    config = fast_config(tmp_path / "run", f"split.mode={request.param}", "train.pipeline.micro_batches=2")
    fed = build_federation(config)
    server = fed.server
    for client in ("0", "1"):
        server.assign(client, f"own-{client}")
    grpc_server = GrpcServer(server.submit, by_token, "127.0.0.1:0", certs)
    server.start()
    grpc_server.start()
    tokens = {client: token for token, client in by_token.items()}
    source = load_source(config)
    clients = []
    try:
        for client, schedule in (("0", serial), ("1", pipelined)):
            connection = GrpcConnection(f"127.0.0.1:{grpc_server.port}", client, tokens[client], ca=certs / "ca.pem")
            built, _ = build_client(config, fed.framework, source, int(client), connection)
            built.schedule = schedule
            clients.append(built)
        yield config, fed, server, clients
    finally:
        for built in clients:
            built.channel.close()
        grpc_server.stop()
        server.stop()


def test_pipelined_over_grpc_equals_serial(served) -> None:
    config, fed, server, (one, two) = served
    member = fed.members[0]
    order = DataOrder(len(member.examples), config.train.batch_size, config.seed)
    for step in range(2):
        rows = order.indices(step)
        micro = [collate([member.examples[i] for i in part], fed.pad_id) for part in (rows[:2], rows[2:])]
        first, second = one.train_step(step, micro), two.train_step(step, micro)
        assert second.loss == pytest.approx(first.loss, rel=1e-6) and second.tokens == first.tokens
    assert one.meter.snapshot() == two.meter.snapshot()
    for key, value in one.state().items():
        torch.testing.assert_close(two.state()[key], value, rtol=1e-5, atol=1e-7, msg=key)
    own0, own1, untouched = (server.adapter_state(name) for name in ("own-0", "own-1", ADAPTER))
    assert own0 and set(own0) == set(own1) == set(untouched)
    for key, value in own0.items():
        torch.testing.assert_close(own1[key], value, rtol=1e-5, atol=1e-7, msg=key)
    assert any(not torch.equal(own0[key], untouched[key]) for key in own0), "the trunk adapters did not train"
