"""The gRPC server's clients: who a stream belongs to, and what the server knows of each client across its streams.

``authenticate`` maps a stream to exactly one client id: by its bearer token, and under mutual TLS also by its
certificate, which must name the client the token belongs to. A ``Roster`` holds one ``Connection`` per client id
(its current stream, the commands waiting for its answer, its cached replies) and keeps the grace period: a
client says it is alive every ``heartbeat_s`` seconds, so a client silent for ``client_grace_s`` (its link cut
off without a word, its process stopped, or its stream broken and not back) is gone, its stream dropped and its
commands failed, whether or not gRPC noticed a break.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import grpc

from splitlm.errors import ClientGone
from splitlm.transport.base import ByteMeter
from splitlm.transport.messages import Message
from splitlm.transport.security import certificate_client, client_subject

log = logging.getLogger("splitlm.transport.grpc_server")  # one logger for the server's connections

HEARTBEAT_S = 5.0  # a connected client says it is alive this often (at most a quarter of the grace period)
REPLAY_CACHE = 16


async def authenticate(context: grpc.aio.ServicerContext, tokens: dict[str, str], mutual_tls: bool) -> str:
    """The client id a stream acts as: its bearer token's (one claimed in ``x-splitlm-client`` must be the same);
    under mutual TLS its certificate must name that client too. Otherwise the stream is aborted."""
    metadata = dict(context.invocation_metadata() or ())
    header = metadata.get("authorization", "")
    token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
    client_id = tokens.get(token)
    if not token or client_id is None:
        await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
    claimed = metadata.get("x-splitlm-client")
    if claimed is not None and claimed != client_id:
        await context.abort(grpc.StatusCode.PERMISSION_DENIED, f"this token belongs to another client than {claimed!r}")
    assert client_id is not None
    if mutual_tls:
        await _check_certificate(context, client_id)
    return client_id


async def _check_certificate(context: grpc.aio.ServicerContext, client_id: str) -> None:
    """Under mutual TLS the client certificate must name the client the token belongs to (its common name
    ``client-ID``, as ``splitlm certs`` issues it): another client's certificate and key are refused."""
    auth = context.auth_context() or {}
    names = [
        value.decode("utf-8", "replace")
        for key in ("x509_common_name", "x509_subject_alternative_name")
        for value in auth.get(key, ())
    ]
    owner = certificate_client(names)
    if owner != client_id:
        whose = f"client {owner}'s" if owner is not None else f"not a client's ({', '.join(names) or 'no name'})"
        reason = f"the client certificate is {whose}, not client {client_id}'s"
        log.warning("refused a stream with client %s's token: %s", client_id, reason)
        await context.abort(
            grpc.StatusCode.PERMISSION_DENIED, f"{reason}: present {client_subject(client_id)}.pem/.key"
        )


@dataclass
class Connection:
    """What the server knows of one client across its (re)connections."""

    client_id: str
    loop: asyncio.AbstractEventLoop | None = None
    outgoing: asyncio.Queue | None = None
    connected: threading.Event = field(default_factory=threading.Event)
    pending: dict[int, concurrent.futures.Future[Message]] = field(default_factory=dict)
    pending_frames: dict[int, list[bytes]] = field(default_factory=dict)  # sent again after a reconnect
    generation: int = 0  # counts the client's streams; a timer of an older stream changes nothing
    replies: OrderedDict[tuple[str, int, int], Message] = field(default_factory=OrderedDict)
    inflight: dict[tuple[str, int, int], concurrent.futures.Future[Message]] = field(default_factory=dict)
    meter: ByteMeter = field(default_factory=ByteMeter)
    hello: Message | None = None
    session: str = ""  # a client process's random id: a new one means the process restarted
    last_seen: float = 0.0  # time.monotonic() when the last frame from this client arrived
    noted: bool = False  # its present silence was logged
    working: int = 0  # commands in flight that ask this client for work (train, evaluate, accuracy)
    tasks: set[asyncio.Task[None]] = field(default_factory=set)  # requests being served

    def put(self, frames: list[bytes]) -> None:
        """Queue frames on the current stream (a broken one sends them again when it is back)."""
        if self.outgoing is not None:
            self.outgoing.put_nowait(frames)

    def remember(self, key: tuple[str, int, int], reply: Message | None) -> None:
        """The work of request ``key`` ended: cache its reply (none if it failed) for a retry of it."""
        self.inflight.pop(key, None)
        if reply is None:
            return
        self.replies[key] = reply
        while len(self.replies) > REPLAY_CACHE:
            self.replies.popitem(last=False)


class Roster:
    """Every client id's ``Connection``, and their grace period (``client_grace_s``, measured from the last message
    received from each client)."""

    def __init__(self, client_ids: Iterable[str], client_grace_s: float) -> None:
        self.connections = {client: Connection(client) for client in client_ids}
        self.client_grace_s = client_grace_s  # a client may be silent this long (its stream broken) before it is gone
        self.heartbeat_s = min(HEARTBEAT_S, client_grace_s / 4)  # how often a client says it is alive

    def grace_left(self, connection: Connection) -> float:
        """Seconds until ``client_grace_s`` have passed since the client's last message."""
        return max(0.0, connection.last_seen + self.client_grace_s - time.monotonic())

    def silence(self, connection: Connection) -> str:
        silent = time.monotonic() - connection.last_seen
        return f"nothing received from it for {silent:.0f} s, framework.client_grace_s={self.client_grace_s:g}"

    async def watch(self) -> None:
        """Drop the stream of a client silent for ``client_grace_s`` (noted at half of it): it is gone."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_s))
            for connection in self.connections.values():
                if not connection.connected.is_set():
                    continue
                silent = time.monotonic() - connection.last_seen
                if silent >= self.client_grace_s:
                    log.warning("client %s: %s; its stream is dropped", connection.client_id, self.silence(connection))
                    self.drop(connection)
                elif silent >= self.client_grace_s / 2 and not connection.noted:
                    connection.noted = True
                    log.info("client %s: nothing received for %.0f s", connection.client_id, silent)

    def drop(self, connection: Connection) -> None:
        """Give up on a client's stream now (its commands fail); a stream that cannot end yet ends later."""
        if connection.outgoing is not None:
            connection.outgoing.put_nowait(None)
        connection.outgoing = None
        connection.connected.clear()
        self.expire(connection, connection.generation)

    def expire(self, connection: Connection, generation: int) -> None:
        """The grace period of a broken stream ended: the commands waiting for that client fail."""
        if connection.generation != generation or connection.connected.is_set():
            return
        gone = ClientGone([connection.client_id], f"disconnected ({self.silence(connection)})")
        for future in list(connection.pending.values()):
            if not future.done():
                future.set_exception(gone)

    def disconnected(self, connection: Connection, generation: int) -> None:
        """Stream ``generation`` of a client ended: the commands in flight wait for a reconnect, for a while."""
        connection.connected.clear()
        connection.outgoing = None
        if connection.pending and connection.loop is not None:
            connection.loop.call_later(self.grace_left(connection), self.expire, connection, generation)

    def restarted(self, connection: Connection, on_restart: Callable[[str], None] | None) -> None:
        """A new process took over a client id: what the old one was doing will never be answered."""
        log.warning("client %s restarted", connection.client_id)
        connection.replies.clear()
        connection.inflight.clear()
        if on_restart is not None:
            on_restart(connection.client_id)
        for future in connection.pending.values():
            if not future.done():
                future.set_exception(ClientGone([connection.client_id], "restarted"))

    def clear_replies(self) -> None:
        """Forget the cached replies (a round was rolled back: the same requests will ask for new work)."""
        for connection in self.connections.values():
            if connection.loop is not None:
                connection.loop.call_soon_threadsafe(connection.replies.clear)
