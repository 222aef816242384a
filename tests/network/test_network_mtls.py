"""Mutual TLS: with ``--mtls`` the server also demands a client certificate signed by the development CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlm.errors import ConfigError, ProtocolError
from splitlm.frameworks.federation import build_federation
from splitlm.transport.grpc_client import GrpcConnection
from splitlm.transport.grpc_server import GrpcServer
from splitlm.transport.security import load_tokens, make_dev_certs


@pytest.fixture(scope="module")
def mtls_server(fast_config, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[GrpcServer, Path]]:
    root = tmp_path_factory.mktemp("mtls")
    certs = root / "certs"
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0", "1"])
    split_server = build_federation(fast_config(root / "run")).server
    server = GrpcServer(split_server.submit, load_tokens(certs / "tokens.json"), "127.0.0.1:0", certs, mutual_tls=True)
    split_server.start()
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()
        split_server.stop()


def _token(certs: Path, client: str = "0") -> str:
    return next(token for token, owner in load_tokens(certs / "tokens.json").items() if owner == client)


def _served_with_certificate(
    server: GrpcServer, certs: Path, client: str, token: str, certificate_of: str | None = None
) -> bool:
    """Whether ``client``, connecting with the certificate of ``certificate_of`` (its own by default) from
    ``certs``, is taken in by ``server``."""
    owner = client if certificate_of is None else certificate_of
    connection = GrpcConnection(
        f"localhost:{server.port}", client, token, certs / "ca.pem",
        client_cert=(certs / f"client-{owner}.pem", certs / f"client-{owner}.key"), max_retries=1,
    )  # fmt: skip
    try:
        return server.wait_for(client, timeout=10)
    finally:
        connection.close()


def test_client_with_its_certificate_is_served(mtls_server) -> None:
    server, certs = mtls_server
    assert _served_with_certificate(server, certs, "0", _token(certs))


def test_certificate_of_another_client_is_refused_in_one_line(mtls_server) -> None:
    # client 1's certificate and key, presented with client 0's (valid) token as client 0
    server, certs = mtls_server
    with pytest.raises(ProtocolError) as refused:
        _served_with_certificate(server, certs, "0", _token(certs, "0"), certificate_of="1")
    message = str(refused.value)
    assert "\n" not in message
    assert "server refused client 0" in message
    assert "certificate is client 1's" in message
    assert "check the token" not in message  # the token was right: the hint names the certificate


def test_a_ca_signed_certificate_that_names_no_client_is_refused(mtls_server) -> None:
    # the server's own certificate (signed by the same CA, common name localhost) presented by client 0
    server, certs = mtls_server
    with pytest.raises(ProtocolError, match="certificate is not a client's \\(localhost"):
        GrpcConnection(
            f"localhost:{server.port}", "0", _token(certs, "0"), certs / "ca.pem",
            client_cert=(certs / "server.pem", certs / "server.key"), max_retries=1,
        )  # fmt: skip


def test_client_without_a_certificate_is_refused(mtls_server) -> None:
    server, certs = mtls_server
    with pytest.raises(ProtocolError):
        GrpcConnection(f"localhost:{server.port}", "0", _token(certs), certs / "ca.pem", max_retries=1)


def test_certs_keep_the_ca_key_and_add_client_issues_one_the_server_accepts(fast_config, tmp_path: Path) -> None:
    from splitlm.cli.main import main

    certs = tmp_path / "certs"
    assert main(["certs", str(certs), "--clients", "1", "--hosts", "localhost"]) == 0
    assert (certs / "ca.key").stat().st_mode & 0o777 == 0o600
    assert main(["certs", str(certs), "--add-client", "7"]) == 0
    tokens = load_tokens(certs / "tokens.json")
    assert sorted(tokens.values()) == ["0", "7"]
    assert (certs / "client-7.key").stat().st_mode & 0o777 == 0o600
    assert main(["certs", str(certs), "--add-client", "7"]) == ConfigError.exit_code  # the same id twice is refused
    assert sorted(load_tokens(certs / "tokens.json").values()) == ["0", "7"]  # and nothing is lost

    split_server = build_federation(fast_config(tmp_path / "run", "framework.num_clients=8")).server
    server = GrpcServer(split_server.submit, tokens, "127.0.0.1:0", certs, mutual_tls=True)
    split_server.start()
    server.start()
    try:
        token = next(t for t, c in tokens.items() if c == "7")
        assert _served_with_certificate(server, certs, "7", token)
    finally:
        server.stop()
        split_server.stop()
