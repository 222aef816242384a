"""Who may talk to the gRPC server: bearer tokens, one client id per token, TLS only, plain text on loopback only."""

from __future__ import annotations

from types import SimpleNamespace

import grpc
import pytest
import torch
from network_support import HEALTHY_ADAPTER, bearer, forward_message, healthy_step

from splitlm.errors import ProtocolError
from splitlm.transport import grpc_client
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.messages import Message

pytestmark = pytest.mark.timeout(180)


def _status(stream) -> grpc.StatusCode:
    with pytest.raises(grpc.RpcError) as refused:
        stream.reply()
    return refused.value.code()


@pytest.mark.parametrize(
    "metadata",
    [
        pytest.param(bearer("not-a-token"), id="wrong token"),
        pytest.param((), id="missing token"),
        pytest.param((("authorization", "Bearer "),), id="empty token"),
        pytest.param((("authorization", "Basic abc"),), id="not a bearer"),
    ],
)
def test_unknown_or_missing_token_is_unauthenticated(net_server, open_stream, metadata) -> None:
    assert _status(open_stream(metadata)) == grpc.StatusCode.UNAUTHENTICATED


def test_valid_token_without_bearer_prefix_is_unauthenticated(net_server, open_stream) -> None:
    assert _status(open_stream((("authorization", net_server.tokens["0"]),))) == grpc.StatusCode.UNAUTHENTICATED


def test_token_of_client_0_claiming_client_1_in_metadata_is_permission_denied(net_server, open_stream) -> None:
    assert _status(open_stream(bearer(net_server.tokens["0"], client_header="1"))) == grpc.StatusCode.PERMISSION_DENIED


def test_connection_refuses_a_token_of_another_client(net_server) -> None:
    with pytest.raises(ProtocolError, match="server refused client 1"):
        GrpcConnection(net_server.address, "1", net_server.tokens["0"], ca=net_server.certs / "ca.pem", max_retries=0)


@pytest.mark.parametrize("kind", ["forward", "step"])
def test_frames_claiming_another_client_get_an_error_and_change_nothing(net_server, open_stream, kind) -> None:
    # Prepare: a stream authenticated as client 0 whose frames say they come from client 1.
    step = next(net_server.steps)
    if kind == "forward":
        message = forward_message("1", step, net_server.hidden_size)
    else:
        message = Message("step", "1", step, 0, {}, {"grad_sq_norm": 0.0})
    stream = open_stream(bearer(net_server.tokens["0"], client_header="0"))
    trunk = net_server.trunk_snapshot()
    pending = set(net_server.split_server.handlers.pending)
    schedule = net_server.split_server.optimizer(HEALTHY_ADAPTER).scheduler.last_epoch

    # Execute
    stream.send(message)
    reply = stream.reply()

    # Assert: refused on the stream, and neither the trunk, its graphs nor client 1's optimizer moved.
    assert reply.kind == "error"
    assert reply.client_id == "0"
    assert "cannot act as '1'" in str(reply.meta["error"])
    assert reply.meta["about"] == kind
    after = net_server.trunk_snapshot()
    assert all(torch.equal(trunk[name], after[name]) for name in trunk)
    assert net_server.trunk_grads() == []
    assert set(net_server.split_server.handlers.pending) == pending
    assert net_server.split_server.optimizer(HEALTHY_ADAPTER).scheduler.last_epoch == schedule


def test_plain_text_connection_to_the_tls_server_fails(net_server, open_stream, healthy) -> None:
    stream = open_stream(bearer(net_server.tokens["0"]), tls=False)
    assert _status(stream) == grpc.StatusCode.UNAVAILABLE
    healthy_step(net_server, healthy)  # the TLS server is still up and serving


NON_LOOPBACK = ["10.0.0.1:1", "[2001:db8::1]:50051", "example.invalid:443", "127.0.0.1.example.invalid:1"]


@pytest.fixture
def no_network(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """Make any channel creation in the client fail loudly, and record (not wait out) its retry back-off."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"the client tried to open a channel to {args[0] if args else kwargs}")

    monkeypatch.setattr(grpc_client.grpc, "insecure_channel", refuse)
    monkeypatch.setattr(grpc_client.grpc, "secure_channel", refuse)
    sleeps: list[float] = []
    monkeypatch.setattr(grpc_client, "time", SimpleNamespace(sleep=sleeps.append))
    return sleeps


@pytest.mark.parametrize("address", NON_LOOPBACK)
def test_connection_refuses_plain_text_to_a_non_loopback_address_before_connecting(no_network, address) -> None:
    with pytest.raises(ProtocolError, match="plain-text transport is only allowed on loopback"):
        GrpcConnection(address, "0", "token", ca=None)


@pytest.mark.parametrize("address", NON_LOOPBACK[:1])
def test_plain_text_refusal_is_not_retried(no_network, address) -> None:
    # A refusal by policy cannot succeed on a retry: it should be raised at once, not after the back-off.
    with pytest.raises(ProtocolError, match="only allowed on loopback"):
        GrpcConnection(address, "0", "token", ca=None)
    assert no_network == [], f"the refusal was retried after sleeping {no_network} s"
