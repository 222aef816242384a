"""The server process (``splitlm serve``): the trunk and the aggregator, for clients in other processes.

It waits for every client to connect (each authenticated by its token), builds the trunk with its mods,
and runs the configured framework through the same driver as an in-process run; each member is a
``RemoteMember`` whose work is done by the client process. With the same config and seed, a networked run
computes what the in-process run computes.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any

from splitlm.config import Config
from splitlm.deploy.remote import RemoteClientProxy, RemoteMember, remote_member
from splitlm.errors import ConfigError, Interrupted, ProtocolError
from splitlm.frameworks.checkpoint import checkpoints, prepare_output
from splitlm.frameworks.driver import drive
from splitlm.frameworks.federation import Federation, build_parties, check_placement
from splitlm.frameworks.setup import load_source, spec_of
from splitlm.models import ModelSource, SplitSpec
from splitlm.transport import Message
from splitlm.transport.codecs import wire_limits
from splitlm.transport.grpc_server import HEADER_LIMIT, GrpcServer
from splitlm.transport.security import load_tokens
from splitlm.transport.wire import Limits

log = logging.getLogger(__name__)


def _say(text: str) -> None:
    print(f"splitlm server: {text}", flush=True)


def serve(
    config: Config,
    address: str,
    certs: Path | None,
    tokens_file: Path,
    mutual_tls: bool = False,
    connect_timeout: float = 600.0,
    resume: bool = False,
    started: float | None = None,
) -> dict[str, Any]:
    """Host the trunk and the aggregator; wait for every client; run the configured framework."""
    started = time.perf_counter() if started is None else started
    check_placement(config, "serve")
    fw = config.framework
    tokens = load_tokens(tokens_file)
    expected = [str(i) for i in range(fw.num_clients)]
    if sorted(tokens.values()) != sorted(expected):
        raise ConfigError(
            f"{tokens_file} names clients {sorted(tokens.values())}, but framework.num_clients={fw.num_clients} "
            f"needs exactly {expected}"
        )
    out = prepare_output(config, resume=resume)
    source = load_source(config)
    # Groups by label mix need the clients' histograms: the trunk is built once they said hello.
    for name in ("splitlm.transport.grpc_server", "splitlm.deploy"):  # connections, rejoins: worth seeing
        logging.getLogger(name).setLevel(logging.INFO)
    codec = config.transport.codec
    grpc_server = GrpcServer(
        None, tokens, address, certs, mutual_tls, work_needs_command=True, client_grace_s=fw.client_grace_s,
        limits=wire_limits(codec.activations, codec.gradients, base=Limits(max_header_bytes=HEADER_LIMIT)),
    )  # fmt: skip
    grpc_server.start()
    print(f"splitlm server listening on {address.rsplit(':', 1)[0]}:{grpc_server.port}", flush=True)
    try:
        try:
            fed, members = _prepare(config, source, grpc_server, expected, connect_timeout)
        except KeyboardInterrupt:  # Ctrl-C or SIGTERM before the first round
            raise Interrupted(_stopped_early(out)) from None
        summary = drive(fed, out, resume, started)
        for member in members:
            _catch_up(fed, member)
        for kind in ("save_adapters", "finish"):  # each client writes its own adapters, on its own machine
            for member in members:
                try:
                    member.proxy.command(kind)
                except ProtocolError as error:  # the run is complete either way
                    log.warning("%s on client %s: %s", kind, member.client_id, error)
        return summary
    finally:
        grpc_server.stop()


def _catch_up(fed: Federation, member: RemoteMember) -> None:
    """A client left out of the last round and back by now rejoins, and takes the global client side, so that it
    ends with the others (one still away cannot)."""
    proxy = member.proxy
    if not proxy.left_out and proxy.session() == proxy.expected_session:
        return
    try:
        if member.ready(fed, time.monotonic()) and fed.carry is not None:
            proxy.load_state(fed.fitted(member, fed.carry))
    except ProtocolError as error:
        log.warning("client %s could not rejoin at the end: %s", member.client_id, error)


def _stopped_early(out: Path) -> str:
    found = checkpoints(out)
    if found:
        return f"interrupted before training started; --resume continues from {found[-1]}"
    return "interrupted before training started; no checkpoint was written: run the same command again to start"


def _prepare(
    config: Config, source: ModelSource, grpc_server: GrpcServer, expected: list[str], connect_timeout: float
) -> tuple[Federation, list[RemoteMember]]:
    """Wait for every client; the federation of their remote members and the trunk built for them."""
    fw = config.framework
    _say(f"waiting for clients {', '.join(expected)} (up to {connect_timeout:.0f} s)")
    for client_id in expected:
        if not grpc_server.wait_for(client_id, connect_timeout):
            raise ProtocolError(f"client {client_id} did not connect within {connect_timeout:.0f} s")
        hello = grpc_server.connections[client_id].hello
        assert hello is not None
        _say(f"client {client_id} ready ({hello.meta.get('examples')} examples)")
    hellos = {cid: grpc_server.connections[cid].hello for cid in expected}
    members = []
    for index, client_id in enumerate(expected):
        connection = grpc_server.connections[client_id]

        def send(message: Message, session: str | None, client_id: str = client_id) -> Message:
            return grpc_server.command(client_id, message, fw.round_timeout_s, session)

        proxy = RemoteClientProxy(
            client_id, send, lambda c=connection: c.meter, session=lambda c=connection: c.session,
            wait_connected=lambda timeout, c=connection: c.connected.wait(timeout),
        )  # fmt: skip
        members.append(remote_member(index, proxy, hellos[client_id]))  # type: ignore[arg-type]
    for index, client_id in enumerate(expected):
        _check_cut(config, index, client_id, hellos[client_id])
    fed = build_parties(config, "serve", members=members, source=source)
    server = fed.server
    grpc_server.on_restart = lambda client_id: server.forget(client_id, wait=False)
    grpc_server.handler = fed.handler
    fed.rollback_hooks.append(grpc_server.clear_replies)  # a rolled-back round's requests come again
    by_id = {m.client_id: m for m in members}
    grpc_server.on_progress = lambda client_id, record: by_id[client_id].progress(fed, dict(record))
    _say(f"{fed.framework.name}: {fw.rounds} rounds of {fed.local_steps} steps per client")
    return fed, members


def _check_cut(config: Config, index: int, client_id: str, hello: Message | None) -> None:
    """Client ``index`` cuts the model where the server's config says it does (its own cut: framework.clients)."""
    assert hello is not None
    split = config.for_client(index).split
    mode = str(hello.meta.get("mode", split.mode))
    spec = SplitSpec(
        mode,  # type: ignore[arg-type]
        int(hello.meta.get("head_layers", split.head_layers)),
        int(hello.meta.get("tail_layers", split.tail_layers)) if mode == "ushape" else 0,
    )
    if spec != spec_of(config.for_client(index)):
        raise ConfigError(
            f"client {client_id} cuts the model at (head {spec.head_layers}, tail {spec.tail_layers}, "
            f"{spec.mode}); the server's config says (head {split.head_layers}, tail "
            f"{split.tail_layers}, {split.mode}): use the same split settings on every side"
        )
