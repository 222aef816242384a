"""Fixtures: an in-test gRPC server over TLS on loopback, raw byte streams to it, and a healthy client."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import grpc
import pytest
from network_support import CLIENTS, HEALTHY_ADAPTER, NetServer, RawStream

from splitlm.frameworks.federation import build_federation
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import CHANNEL_OPTIONS, GrpcServer
from splitlm.transport.security import load_tokens, make_dev_certs


@pytest.fixture(scope="module")
def net_server(fast_config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[NetServer]:
    """A TLS ``GrpcServer`` on 127.0.0.1 for clients 0 and 1, serving a U-shaped trunk with a worker thread."""
    root = tmp_path_factory.mktemp("net")
    certs = root / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], CLIENTS)
    by_token = load_tokens(certs / "tokens.json")
    # No warmup and no decay: every optimizer step has the full learning rate, so each shows in the weights.
    config = fast_config(root / "run", "train.warmup_steps=0", "train.schedule=constant")
    split_server = build_federation(config).server
    split_server.assign("1", HEALTHY_ADAPTER)
    grpc_server = GrpcServer(
        split_server.submit, by_token, "127.0.0.1:0", certs, on_restart=lambda c: split_server.forget(c, wait=False)
    )
    split_server.start()
    grpc_server.start()
    try:
        yield NetServer(
            grpc_server,
            split_server,
            certs,
            {client: token for token, client in by_token.items()},
            f"127.0.0.1:{grpc_server.port}",
            split_server.hidden_size,
        )
    finally:
        grpc_server.stop()
        split_server.stop()


@pytest.fixture
def open_stream(net_server: NetServer) -> Iterator[Callable[..., RawStream]]:
    """``open_stream(metadata, tls=True)``: a raw stream to the in-test server, closed after the test."""
    opened: list[tuple[grpc.Channel, RawStream]] = []

    def open_(metadata: tuple[tuple[str, str], ...], tls: bool = True) -> RawStream:
        if tls:
            channel = grpc.secure_channel(net_server.address, net_server.credentials(), options=CHANNEL_OPTIONS)
        else:
            channel = grpc.insecure_channel(net_server.address, options=CHANNEL_OPTIONS)
        stream = RawStream(channel, metadata)
        opened.append((channel, stream))
        return stream

    yield open_
    for channel, stream in opened:
        stream.close()
        channel.close()


@pytest.fixture
def healthy(net_server: NetServer) -> Iterator[GrpcConnection]:
    """Client 1 on the real client transport, with its own trunk adapter."""
    connection = GrpcConnection(
        net_server.address, "1", net_server.tokens["1"], ca=net_server.certs / "ca.pem", max_retries=2
    )
    try:
        yield connection
    finally:
        connection.close()
