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
    make_dev_certs(certs, ["localhost", "127.0.0.1"], ["0"])
    split_server = build_federation(fast_config(root / "run")).server
    server = GrpcServer(split_server.submit, load_tokens(certs / "tokens.json"), "127.0.0.1:0", certs, mutual_tls=True)
    split_server.start()
    server.start()
    try:
        yield server, certs
    finally:
        server.stop()
        split_server.stop()


def _token(certs: Path) -> str:
    return next(iter(load_tokens(certs / "tokens.json")))


def _served_with_certificate(server: GrpcServer, certs: Path, client: str, token: str) -> bool:
    """Whether ``client``, connecting with its certificate from ``certs``, is taken in by ``server``."""
    connection = GrpcConnection(
        f"localhost:{server.port}", client, token, certs / "ca.pem",
        client_cert=(certs / f"client-{client}.pem", certs / f"client-{client}.key"), max_retries=1,
    )  # fmt: skip
    try:
        return server.wait_for(client, timeout=10)
    finally:
        connection.close()


def test_client_with_its_certificate_is_served(mtls_server) -> None:
    server, certs = mtls_server
    assert _served_with_certificate(server, certs, "0", _token(certs))


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
