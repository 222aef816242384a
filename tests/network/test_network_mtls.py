"""Mutual TLS: with ``--mtls`` the server also demands a client certificate signed by the development CA."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from splitlm.errors import ProtocolError
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


def test_client_with_its_certificate_is_served(mtls_server) -> None:
    server, certs = mtls_server
    connection = GrpcConnection(
        f"localhost:{server.port}", "0", _token(certs), certs / "ca.pem",
        client_cert=(certs / "client-0.pem", certs / "client-0.key"), max_retries=1,
    )  # fmt: skip
    try:
        assert server.wait_for("0", timeout=10)
    finally:
        connection.close()


def test_client_without_a_certificate_is_refused(mtls_server) -> None:
    server, certs = mtls_server
    with pytest.raises(ProtocolError):
        GrpcConnection(f"localhost:{server.port}", "0", _token(certs), certs / "ca.pem", max_retries=1)
