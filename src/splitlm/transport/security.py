"""TLS material and bearer tokens for the networked transport.

``make_dev_certs`` writes a development CA (its key kept in ``ca.key``, mode 0600), a server certificate (for the
given host names / IPs) and one client certificate per client id, plus ``tokens.json`` mapping a fresh random
bearer token to each client id; ``add_client`` issues one more client certificate and token later. A token maps
to exactly one client id; the server lets a stream act only as that id. A client certificate names its client
in its subject's common name, ``client-ID`` (``client_subject``); under mutual TLS the server takes a stream
only if its certificate names the client its token belongs to (``certificate_client``).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import json
import os
import secrets
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from splitlm.errors import ConfigError

VALID_DAYS = 30
CLIENT_PREFIX = "client-"  # a client certificate's common name: client-ID


def client_subject(client_id: str) -> str:
    """The common name (and file stem) of client ``client_id``'s certificate."""
    return f"{CLIENT_PREFIX}{client_id}"


def certificate_client(names: list[str]) -> str | None:
    """The client id a peer certificate names (``names``: its subject common name and alternative names, as the
    TLS layer reports them), or ``None`` if it names no client or several."""
    ids = {name.removeprefix(CLIENT_PREFIX) for name in names if name.startswith(CLIENT_PREFIX)}
    return ids.pop() if len(ids) == 1 else None


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "splitlm dev"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


def _key() -> ec.EllipticCurvePrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _write_private(path: Path, data: bytes) -> None:
    path.write_bytes(data)
    os.chmod(path, 0o600)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )


def _sign(
    subject: x509.Name,
    public_key,
    issuer: x509.Name,
    issuer_key,
    *,
    ca: bool,
    sans: list[x509.GeneralName] | None = None,
) -> x509.Certificate:
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if sans:
        builder = builder.add_extension(x509.SubjectAlternativeName(sans), critical=False)
    return builder.sign(issuer_key, hashes.SHA256())


def make_dev_certs(folder: Path, hosts: list[str], clients: list[str]) -> dict[str, Path]:
    """Write ca.pem, server.pem/server.key, client-ID.pem/.key and tokens.json under ``folder``."""
    folder.mkdir(parents=True, exist_ok=True)
    if (folder / "tokens.json").exists():
        raise ConfigError(f"{folder} already holds certificates and tokens: choose an empty folder")
    ca_key = _key()
    ca_name = _name("splitlm dev CA")
    ca_cert = _sign(ca_name, ca_key.public_key(), ca_name, ca_key, ca=True)
    (folder / "ca.pem").write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "ca.key", _pem_key(ca_key))
    sans: list[x509.GeneralName] = []
    for host in hosts:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            sans.append(x509.DNSName(host))
    server_key = _key()
    server_cert = _sign(_name(hosts[0]), server_key.public_key(), ca_name, ca_key, ca=False, sans=sans)
    (folder / "server.pem").write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / "server.key", _pem_key(server_key))
    tokens = {_issue_client(folder, client, ca_name, ca_key): client for client in clients}
    _write_tokens(folder / "tokens.json", tokens)
    return {"ca": folder / "ca.pem", "tokens": folder / "tokens.json"}


def _issue_client(folder: Path, client: str, ca_name: x509.Name, ca_key: ec.EllipticCurvePrivateKey) -> str:
    """Write client-ID.pem/.key signed by the CA; return a fresh bearer token for the client."""
    key = _key()
    cert = _sign(_name(client_subject(client)), key.public_key(), ca_name, ca_key, ca=False)
    (folder / f"{client_subject(client)}.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(folder / f"{client_subject(client)}.key", _pem_key(key))
    return secrets.token_urlsafe(24)


def _write_tokens(path: Path, tokens: dict[str, str]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    _write_private(tmp, (json.dumps(tokens, indent=2) + "\n").encode())
    tmp.replace(path)


def add_client(folder: Path, client: str) -> str:
    """Issue one more client certificate and token with the CA in ``folder``; return the token."""
    tokens = load_tokens(folder / "tokens.json")
    if client in tokens.values():
        raise ConfigError(f"{folder} has client {client!r} already; choose another id")
    if not client or not client.isprintable() or "/" in client:
        raise ConfigError(f"client id {client!r}: use letters and digits, e.g. 3")
    try:
        ca_cert = x509.load_pem_x509_certificate((folder / "ca.pem").read_bytes())
        ca_key = serialization.load_pem_private_key((folder / "ca.key").read_bytes(), password=None)
    except (OSError, ValueError) as error:
        raise ConfigError(
            f"{folder} has no usable CA key ({error}): it was made by an older splitlm; make new certificates"
        ) from None
    if not isinstance(ca_key, ec.EllipticCurvePrivateKey):
        raise ConfigError(f"{folder}/ca.key is not the CA's EC key; make new certificates")
    token = _issue_client(folder, client, ca_cert.subject, ca_key)
    _write_tokens(folder / "tokens.json", {**tokens, token: client})
    return token


def load_tokens(path: Path) -> dict[str, str]:
    """token -> client id, from a JSON object; every client id at most once."""
    try:
        tokens = json.loads(Path(path).read_text())
    except (OSError, ValueError) as error:
        raise ConfigError(f"tokens file {path} unreadable ({error}): make one with `splitlm certs`") from None
    if not isinstance(tokens, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in tokens.items()):
        raise ConfigError(f"tokens file {path}: expected a JSON object of token -> client id")
    ids = list(tokens.values())
    if len(ids) != len(set(ids)):
        raise ConfigError(f"tokens file {path}: a client id has several tokens; give each client exactly one")
    return tokens


def token_for(path: Path, client_id: str) -> str:
    for token, owner in load_tokens(path).items():
        if owner == client_id:
            return token
    raise ConfigError(f"tokens file {path} has no token for client {client_id!r}")
