"""Several requests in flight on one gRPC stream, replies matched by request id; the codec seam over gRPC; and
connection failures that each say what is wrong."""

from __future__ import annotations

import shutil
import socket
import threading
from collections.abc import Iterator
from concurrent.futures import Future
from pathlib import Path

import pytest
import torch

from splitlm.errors import ProtocolError, SplitLMError
from splitlm.transport import Channel, Message, MeterMod, grpc_client, server_chain
from splitlm.transport.codecs import CodecMod
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import GrpcServer
from splitlm.transport.security import load_tokens, make_dev_certs

TOKEN = "t0k3n-for-client-0"


class ReversingServer:
    """Holds requests until ``count`` have arrived, then answers them last first (each reply names its request)."""

    def __init__(self, count: int) -> None:
        self.count = count
        self.held: list[tuple[Message, Future[Message]]] = []
        self.answered: list[int] = []
        self.lock = threading.Lock()

    def __call__(self, message: Message) -> Future[Message]:
        future: Future[Message] = Future()
        with self.lock:
            self.held.append((message, future))
            if len(self.held) == self.count:
                for request, waiting in reversed(self.held):
                    self.answered.append(request.micro)
                    hidden = request.tensors["hidden"] * 2
                    waiting.set_result(
                        Message("activations", request.client_id, request.step, request.micro, {"hidden": hidden})
                    )
        return future


@pytest.fixture
def plain_server() -> Iterator[GrpcServer]:
    server = GrpcServer(None, {TOKEN: "0"}, "127.0.0.1:0", None)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def _forward(micro: int) -> Message:
    hidden = torch.full((1, 2, 4), float(micro + 1))
    return Message("forward", "0", 7, micro, {"hidden": hidden, "attention_mask": torch.ones(1, 2, dtype=torch.long)})


def test_requests_in_flight_get_their_own_replies_when_answered_out_of_order(plain_server: GrpcServer) -> None:
    backend = ReversingServer(count=3)
    plain_server.handler = backend
    connection = GrpcConnection(f"127.0.0.1:{plain_server.port}", "0", TOKEN, max_retries=0)
    try:
        futures = [connection.submit(_forward(micro)) for micro in range(3)]  # all three before any reply
        replies = [future.result(timeout=30) for future in futures]
    finally:
        connection.close()
    assert backend.answered == [2, 1, 0]  # the server answered last first ...
    for micro, reply in enumerate(replies):  # ... and each future still got its own reply
        assert (reply.kind, reply.step, reply.micro) == ("activations", 7, micro)
        assert torch.equal(reply.tensors["hidden"], torch.full((1, 2, 4), 2.0 * (micro + 1)))


def test_an_error_reply_fails_only_its_own_request(plain_server: GrpcServer) -> None:
    def handler(message: Message) -> Message:
        if message.micro == 1:
            raise ProtocolError("micro-batch 1 is refused")
        return Message("activations", "0", message.step, message.micro, {"hidden": message.tensors["hidden"]})

    plain_server.handler = handler
    connection = GrpcConnection(f"127.0.0.1:{plain_server.port}", "0", TOKEN, max_retries=0)
    try:
        futures = [connection.submit(_forward(micro)) for micro in range(3)]
        assert futures[0].result(timeout=30).micro == 0 and futures[2].result(timeout=30).micro == 2
        with pytest.raises(ProtocolError, match="micro-batch 1 is refused"):
            futures[1].result(timeout=30)
    finally:
        connection.close()


def test_the_fp16_codec_mod_works_over_grpc(plain_server: GrpcServer) -> None:
    seen: list[Message] = []

    def echo(message: Message) -> Message:
        seen.append(message)
        return Message("activations", "0", message.step, message.micro, {"hidden": message.tensors["hidden"] + 1})

    plain_server.handler = server_chain([CodecMod("fp16", "fp16")], echo)
    connection = GrpcConnection(f"127.0.0.1:{plain_server.port}", "0", TOKEN, max_retries=0)
    meter = MeterMod()
    try:
        exchange = Channel(connection, [CodecMod("fp16", "fp16"), meter]).request(_forward(0))
    finally:
        connection.close()
    (received,) = seen
    assert received.tensors["hidden"].dtype == torch.float32 and received.codecs == {}  # decoded by the server's mod
    assert exchange.reply.tensors["hidden"].dtype == torch.float32
    assert torch.equal(exchange.reply.tensors["hidden"], torch.full((1, 2, 4), 2.0))
    assert meter.meter.snapshot() == (1 * 2 * 4 * 2 + 1 * 2 * 8, 1 * 2 * 4 * 2)  # fp16 hidden both ways


# --- connection failures, each with its own message, within the timeout ---------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@pytest.fixture(scope="module")
def tls_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GrpcServer, Path]]:
    certs = tmp_path_factory.mktemp("diag") / "certs"
    make_dev_certs(certs, ["127.0.0.1"], ["0"])  # not for "localhost"
    server = GrpcServer(None, load_tokens(certs / "tokens.json"), "127.0.0.1:0", certs)
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()


def _refused(address: str, ca: Path | None, timeout: float = 3.0, token: str = "x", **extra: object) -> str:
    # it gives up after its connect_timeout (nothing timed is asserted here; the message says what went wrong)
    with pytest.raises(ProtocolError) as caught:
        GrpcConnection(address, "0", token, ca=ca, connect_timeout=timeout, **extra)  # type: ignore[arg-type]
    message = str(caught.value)
    assert "\n" not in message
    return message


def test_nothing_listening(tmp_path: Path) -> None:
    assert "nothing is listening" in _refused(f"127.0.0.1:{_free_port()}", None)


def test_nothing_listening_is_retried_after_a_line_saying_how_long(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(grpc_client, "ATTEMPT_TIMEOUT", 0.5)  # several attempts within the timeout
    with caplog.at_level("WARNING", logger="splitlm.transport.grpc_client"):
        assert "nothing is listening" in _refused(f"127.0.0.1:{_free_port()}", None, timeout=3.0)
    (line,) = [record.getMessage() for record in caplog.records]
    assert line.startswith("not connected yet, retrying for up to ") and "s more: nothing is listening at" in line


def test_no_waiting_asked_connection_refused_is_reported_without_a_retry(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level("WARNING", logger="splitlm.transport.grpc_client"):
        assert "connection refused" in _refused(f"127.0.0.1:{_free_port()}", None, timeout=0.0)
    assert not caplog.records  # no "retrying" line: it did not wait


# A final failure is reported at once: with a 600 s connect timeout these would hang if it were retried
# (the module's pytest timeout stops them; nothing timed is asserted).


def test_a_server_address_that_cannot_resolve_is_one_line(tls_server) -> None:
    _, certs = tls_server
    server = GrpcServer(None, load_tokens(certs / "tokens.json"), "nonexistent.invalid:50051", certs)
    with pytest.raises(SplitLMError) as caught:
        server.start()
    message = str(caught.value)  # not grpc's RuntimeError "Failed to bind to address ..."
    assert message.startswith("cannot listen on nonexistent.invalid:50051: cannot resolve the host name")
    assert "\n" not in message


@pytest.fixture
def attempts(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """The timeouts of the connection's attempts to open a stream, as it makes them."""
    made: list[float] = []
    open_stream = GrpcConnection._open

    def counted(self: GrpcConnection, timeout: float) -> None:
        made.append(timeout)
        open_stream(self, timeout)

    monkeypatch.setattr(GrpcConnection, "_open", counted)
    return made


@pytest.mark.timeout(120)
def test_an_unresolvable_host_is_reported_as_such_at_once(tls_server, attempts: list[float]) -> None:
    _, certs = tls_server
    message = _refused("nonexistent.invalid:50051", certs / "ca.pem", timeout=600.0)
    assert message.startswith("cannot connect to nonexistent.invalid:50051: cannot resolve the host name")
    assert attempts == []  # no stream was tried: no retry could make the name resolve


@pytest.mark.timeout(120)
def test_a_certificate_for_another_name_is_not_retried(tls_server, attempts: list[float]) -> None:
    server, certs = tls_server
    assert "certificate is not for 'localhost'" in _refused(f"localhost:{server.port}", certs / "ca.pem", timeout=600.0)
    assert len(attempts) == 1


def test_certificate_for_another_name(tls_server) -> None:
    server, certs = tls_server
    message = _refused(f"localhost:{server.port}", certs / "ca.pem")
    assert "certificate is not for 'localhost'" in message


def test_unknown_ca(tls_server, tmp_path: Path) -> None:
    server, _ = tls_server
    other = tmp_path / "other"
    make_dev_certs(other, ["127.0.0.1"], ["0"])
    assert "unknown CA" in _refused(f"127.0.0.1:{server.port}", other / "ca.pem")


def test_token_refused(tls_server) -> None:
    server, certs = tls_server
    message = _refused(f"127.0.0.1:{server.port}", certs / "ca.pem", token="wrong", max_retries=0)
    assert "server refused client 0" in message and "token" in message


def test_client_certificate_required(tmp_path: Path) -> None:
    certs = tmp_path / "certs"
    make_dev_certs(certs, ["127.0.0.1"], ["0"])
    server = GrpcServer(None, load_tokens(certs / "tokens.json"), "127.0.0.1:0", certs, mutual_tls=True)
    server.start()
    try:
        assert "requires a client" in _refused(f"127.0.0.1:{server.port}", certs / "ca.pem")
    finally:
        server.stop()
        shutil.rmtree(certs, ignore_errors=True)
