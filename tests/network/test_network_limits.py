"""A state larger than a training message (a client side with many LoRA tensors) crosses a gRPC stream both ways:
each side's decoder takes states of the size the client's hello declares, and nothing larger."""

from __future__ import annotations

import threading
from collections.abc import Iterator

import pytest
import torch

from splitlm.errors import ClientGone
from splitlm.transport.codecs import wire_limits
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import HEADER_LIMIT, GrpcServer
from splitlm.transport.messages import Message
from splitlm.transport.wire import Limits

pytestmark = pytest.mark.timeout(120)

TOKEN = "token-of-client-0"
STATE_TENSORS = 32  # head and tail of 2 layers each x 4 LoRA modules x (A, B): twice a training message's 16


def _state(count: int) -> dict[str, torch.Tensor]:
    return {
        f"model.layers.{i // 2}.self_attn.q_proj.lora_{'AB'[i % 2]}.weight": torch.full((2, 3), i) for i in range(count)
    }


@pytest.fixture
def server() -> Iterator[GrpcServer]:
    limits = wire_limits("none", "none", base=Limits(max_header_bytes=HEADER_LIMIT))
    server = GrpcServer(None, {TOKEN: "0"}, "127.0.0.1:0", None, limits=limits)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _client(server: GrpcServer, declared: int) -> GrpcConnection:
    """Client 0 with a state of STATE_TENSORS tensors, whose hello says it holds ``declared``."""
    hello = Message("hello", "0", -1, 0, {}, {"session": "s", "state_tensors": declared})
    connection = GrpcConnection(f"127.0.0.1:{server.port}", "0", TOKEN, hello=hello, max_retries=1)
    connection.allow_states(STATE_TENSORS)
    return connection


def _echo_states(connection: GrpcConnection) -> threading.Thread:
    """Answer one command with the tensors it carried (as cmd:set_state then cmd:get_state would)."""

    def run() -> None:
        command = connection.commands.get(timeout=60)
        assert isinstance(command, Message)
        connection.send(Message("done", "0", -1, 0, dict(command.tensors), {"seq": command.meta["seq"]}))

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_a_hello_declaring_an_absurd_state_is_refused(server: GrpcServer) -> None:
    from splitlm.errors import ProtocolError

    with pytest.raises(ProtocolError, match="state_tensors must be an int"):
        _client(server, declared=1 << 40)


def test_a_client_side_of_many_tensors_crosses_the_stream_both_ways(server: GrpcServer) -> None:
    connection = _client(server, declared=STATE_TENSORS)
    try:
        thread = _echo_states(connection)
        state = _state(STATE_TENSORS)
        reply = server.command("0", Message("cmd:set_state", "0", -1, 0, state), timeout=60)
        thread.join(timeout=10)
        assert sorted(reply.tensors) == sorted(state)
        assert all(torch.equal(reply.tensors[name], state[name]) for name in state)
    finally:
        connection.close()


def test_a_state_larger_than_the_hello_declared_is_refused(server: GrpcServer, caplog) -> None:
    connection = _client(server, declared=20)
    try:
        thread = _echo_states(connection)
        with pytest.raises(ClientGone, match="did not answer"):  # its done was refused as a malformed frame
            server.command("0", Message("cmd:set_state", "0", -1, 0, _state(STATE_TENSORS)), timeout=3)
        thread.join(timeout=10)
    finally:
        connection.close()
    assert "declares 32 tensors, limit 20 (Limits.max_state_tensors)" in caplog.text
