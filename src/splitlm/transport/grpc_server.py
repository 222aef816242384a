"""The networked server side: one long-lived bidirectional gRPC stream per client.

Each gRPC message is one wire frame (``transport/wire.py``): a validated header, then raw tensor chunks of at
most 4 MiB. No protobuf code generation: the service is a generic handler over raw bytes.

On a stream the client sends requests (``forward``, ``backward``, ``step``, ``eval``), which go to the server's
handler (the server's mods around the ``SplitServer``'s queue; several may be in flight, each reply carries
its request's id), and replies (``done``) to the commands the server's orchestrator sends it
(``cmd:train``, ``cmd:get_state``, ...). Every stream is authenticated by a bearer token that maps to exactly
one client id; a frame claiming another id is refused. A malformed or out-of-order frame gets an ``error``
message on the stream and changes nothing; the stream and the other clients carry on. The last replies of
each client are cached by (kind, step, micro-batch), so a request retried after a reconnect is answered
again without being applied twice.

A client says it is alive every few seconds (``alive``; the interval is in the server's ``welcome``), so the
server measures the grace period (``client_grace_s``) from the last message it received: a client silent that
long (its link cut off without a word, its process stopped, or its stream broken and not back) is gone, its
stream dropped and its commands failed, whether or not gRPC noticed a break (its keepalive may take minutes to
notice a silent link).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import itertools
import json
import logging
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import grpc

from splitlm.errors import ClientGone, ProtocolError, SplitLMError
from splitlm.transport.base import ByteMeter, Handler, resolved
from splitlm.transport.messages import REQUEST_KINDS, RID, Message
from splitlm.transport.security import certificate_client, client_subject
from splitlm.transport.wire import MAX_CHUNK, Decoder, Limits, encode

log = logging.getLogger(__name__)

SERVICE = "splitlm.v1.Split"
METHOD = f"/{SERVICE}/Session"
MAX_FRAME_BYTES = MAX_CHUNK + 256 * 1024
REPLAY_CACHE = 16
STRAGGLER_NOTE_S = 60.0  # a command waiting this long is logged, and again every as long
HEARTBEAT_S = 5.0  # a connected client says it is alive this often (at most a quarter of the grace period)
WORK_COMMANDS = ("cmd:train", "cmd:evaluate", "cmd:accuracy")  # during these a client may send work requests
HEADER_LIMIT = 1 << 20  # a train command's reply carries its step records in the header
MAX_STATE_TENSORS = 1 << 16  # the most tensors a client's hello may say its state (its client side) holds
CHANNEL_OPTIONS = [
    ("grpc.max_receive_message_length", MAX_FRAME_BYTES),
    ("grpc.max_send_message_length", MAX_FRAME_BYTES),
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # let the clients' keepalive pings through (the default server policy answers them with "too many pings")
    ("grpc.http2.min_recv_ping_interval_without_data_ms", 10_000),
    ("grpc.http2.max_ping_strikes", 0),
]


def error_message(client_id: str, about: Message | None, error: Exception) -> Message:
    step = about.step if about else -1
    micro = about.micro if about else 0
    meta: dict[str, str | int | float | bool] = {"error": str(error), "type": type(error).__name__}
    if about is not None:
        meta["about"] = about.kind
        if RID in about.meta:
            meta[RID] = about.meta[RID]
    return Message("error", client_id, step, micro, {}, meta)


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


class GrpcServer:
    """Serves clients' streams. ``handler`` answers their requests (the server's mods around the ``SplitServer``;
    it may be set after ``start``, once every client said hello); ``on_restart(client_id)`` is called when a
    new process takes over a client id, so the server can drop what the old one left half done."""

    def __init__(
        self,
        handler: Handler | None,
        tokens: dict[str, str],
        address: str,
        certs: Path | None,
        mutual_tls: bool = False,
        limits: Limits | None = None,
        work_needs_command: bool = False,
        on_restart: Callable[[str], None] | None = None,
        client_grace_s: float = 30.0,
    ) -> None:
        self.handler = handler
        self.on_restart = on_restart
        self.on_progress: Callable[[str, dict[str, object]], None] | None = None  # a client's step records
        self.client_grace_s = client_grace_s  # a client may be silent this long (its stream broken) before it is gone
        self.heartbeat_s = min(HEARTBEAT_S, client_grace_s / 4)  # how often a client says it is alive
        self.session = secrets.token_hex(8)  # commands carry it: a restarted server's are new commands
        self.tokens = tokens
        self.address = address
        self.certs = certs
        self.mutual_tls = mutual_tls
        self.limits = limits or Limits(max_header_bytes=HEADER_LIMIT)
        # With an orchestrator, a client sends work only while it carries out a command (train, evaluate...):
        # a request left over from before a restart must not touch the restored state.
        self.work_needs_command = work_needs_command
        self.connections = {client: Connection(client) for client in tokens.values()}
        self._seq = itertools.count(1)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: grpc.aio.Server | None = None
        self._watchdog: asyncio.Task[None] | None = None
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.port = 0

    # --- lifecycle (the asyncio loop runs on its own thread; the orchestrator stays synchronous) ----------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run_loop, name="splitlm-grpc", daemon=True)
        self._thread.start()
        self._ready.wait()
        if self._startup_error is not None:
            raise self._startup_error

    def _run_loop(self) -> None:
        self._loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._start_server())
        except BaseException as error:  # report to the caller of start()
            self._startup_error = error
            self._ready.set()
            return
        self._ready.set()
        self._loop.run_forever()

    async def _start_server(self) -> None:
        server = grpc.aio.server(options=CHANNEL_OPTIONS)
        handler = grpc.method_handlers_generic_handler(
            SERVICE, {"Session": grpc.stream_stream_rpc_method_handler(self._session)}
        )
        server.add_generic_rpc_handlers((handler,))
        if self.certs is None:
            self.port = server.add_insecure_port(self.address)
        else:
            root = (self.certs / "ca.pem").read_bytes() if self.mutual_tls else None
            credentials = grpc.ssl_server_credentials(
                [((self.certs / "server.key").read_bytes(), (self.certs / "server.pem").read_bytes())],
                root_certificates=root,
                require_client_auth=self.mutual_tls,
            )
            self.port = server.add_secure_port(self.address, credentials)
        if not self.port:
            raise SplitLMError(f"cannot listen on {self.address}: is the port in use?")
        await server.start()
        self._server = server
        self._watchdog = asyncio.create_task(self._watch())

    async def _watch(self) -> None:
        """Drop the stream of a client silent for ``client_grace_s`` (noted at half of it): it is gone."""
        while True:
            await asyncio.sleep(min(1.0, self.heartbeat_s))
            for connection in self.connections.values():
                if not connection.connected.is_set():
                    continue
                silent = time.monotonic() - connection.last_seen
                if silent >= self.client_grace_s:
                    log.warning("client %s: %s; its stream is dropped", connection.client_id, self._silence(connection))
                    self._drop(connection)
                elif silent >= self.client_grace_s / 2 and not connection.noted:
                    connection.noted = True
                    log.info("client %s: nothing received for %.0f s", connection.client_id, silent)

    def _drop(self, connection: Connection) -> None:
        """Give up on a client's stream now (its commands fail); a stream that cannot end yet ends later."""
        if connection.outgoing is not None:
            connection.outgoing.put_nowait(None)
        connection.outgoing = None
        connection.connected.clear()
        self._expire(connection, connection.generation)

    def stop(self) -> None:
        if self._loop is None:
            return
        for connection in self.connections.values():
            if connection.outgoing is not None and connection.loop is not None:
                connection.loop.call_soon_threadsafe(connection.outgoing.put_nowait, None)
        if self._server is not None:
            asyncio.run_coroutine_threadsafe(self._server.stop(grace=1.0), self._loop).result(timeout=10)
        if self._watchdog is not None:
            self._loop.call_soon_threadsafe(self._watchdog.cancel)
        self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(timeout=10)

    # --- orchestrator side -----------------------------------------------------------------------------

    def wait_for(self, client_id: str, timeout: float | None) -> bool:
        return self.connections[client_id].connected.wait(timeout)

    def command(
        self, client_id: str, message: Message, timeout: float | None = None, session: str | None = None
    ) -> Message:
        """Send a command to a client and wait for its ``done``. A client that is not connected (after
        ``client_grace_s``), restarted, or silent for ``timeout`` s raises ``ClientGone``; its ``error`` reply a
        ``ProtocolError``. A command in flight when the stream breaks is sent again on the next one (the client
        answers a repeated command from its cache). ``session``: only the client process of that session may
        get the command. The grace period runs from the last message received from the client."""
        connection = self.connections[client_id]
        if not connection.connected.wait(self._grace_left(connection)) or connection.loop is None:
            raise ClientGone([client_id], f"not connected ({self._silence(connection)})")
        if session is not None and connection.session != session:  # a new process, not the one that worked
            raise ClientGone([client_id], "restarted since it last worked; it rejoins at the next round")
        seq = next(self._seq)
        message.meta["seq"] = seq
        message.meta["server"] = self.session
        future: concurrent.futures.Future[Message] = concurrent.futures.Future()
        frames = encode(message)
        connection.pending[seq] = future
        connection.pending_frames[seq] = frames
        connection.meter.record(message, "down")
        work = message.kind in WORK_COMMANDS
        connection.working += work
        connection.loop.call_soon_threadsafe(self._put, connection, frames)
        started = time.monotonic()
        try:
            while True:
                waited = time.monotonic() - started
                left = None if timeout is None else timeout - waited
                try:
                    reply = future.result(timeout=STRAGGLER_NOTE_S if left is None else min(STRAGGLER_NOTE_S, left))
                    break
                except concurrent.futures.TimeoutError:
                    if left is not None and left <= STRAGGLER_NOTE_S:
                        raise ClientGone([client_id], f"did not answer {message.kind} within {timeout:.0f} s") from None
                    waited = time.monotonic() - started
                    log.warning("still waiting for client %s (%s, %.0f s)", client_id, message.kind, waited)
        finally:
            connection.pending.pop(seq, None)
            connection.pending_frames.pop(seq, None)
            connection.working -= work
        if reply.kind == "error":
            raise ProtocolError(f"client {client_id}: {reply.meta.get('error')}")
        return reply

    def _put(self, connection: Connection, frames: list[bytes]) -> None:
        """Queue frames on the client's current stream (a broken one sends them again when it is back)."""
        if connection.outgoing is not None:
            connection.outgoing.put_nowait(frames)

    def _grace_left(self, connection: Connection) -> float:
        """Seconds until ``client_grace_s`` have passed since the client's last message."""
        return max(0.0, connection.last_seen + self.client_grace_s - time.monotonic())

    def _silence(self, connection: Connection) -> str:
        silent = time.monotonic() - connection.last_seen
        return f"nothing received from it for {silent:.0f} s, framework.client_grace_s={self.client_grace_s:g}"

    def _expire(self, connection: Connection, generation: int) -> None:
        """The grace period of a broken stream ended: the commands waiting for that client fail."""
        if connection.generation != generation or connection.connected.is_set():
            return
        gone = ClientGone([connection.client_id], f"disconnected ({self._silence(connection)})")
        for future in list(connection.pending.values()):
            if not future.done():
                future.set_exception(gone)

    def clear_replies(self) -> None:
        """Forget the cached replies (a round was rolled back: the same requests will ask for new work)."""
        for connection in self.connections.values():
            if connection.loop is not None:
                connection.loop.call_soon_threadsafe(connection.replies.clear)

    # --- the stream ------------------------------------------------------------------------------------

    async def _authenticate(self, context: grpc.aio.ServicerContext) -> str:
        metadata = dict(context.invocation_metadata() or ())
        header = metadata.get("authorization", "")
        token = header.removeprefix("Bearer ").strip() if header.startswith("Bearer ") else ""
        client_id = self.tokens.get(token)
        if not token or client_id is None:
            await context.abort(grpc.StatusCode.UNAUTHENTICATED, "missing or unknown bearer token")
        claimed = metadata.get("x-splitlm-client")
        if claimed is not None and claimed != client_id:
            await context.abort(
                grpc.StatusCode.PERMISSION_DENIED, f"this token belongs to another client than {claimed!r}"
            )
        assert client_id is not None
        if self.mutual_tls:
            await self._check_certificate(context, client_id)
        return client_id

    async def _check_certificate(self, context: grpc.aio.ServicerContext, client_id: str) -> None:
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

    async def _session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        client_id = await self._authenticate(context)
        connection = self.connections[client_id]
        if connection.outgoing is not None:  # a reconnect: retire the old stream
            connection.outgoing.put_nowait(None)
        connection.loop = asyncio.get_running_loop()
        connection.outgoing = outgoing = asyncio.Queue()
        connection.generation += 1
        generation = connection.generation
        reader = asyncio.create_task(self._read(connection, requests))
        log.info("client %s connected", client_id)
        try:
            while True:
                frames = await outgoing.get()
                if frames is None:
                    return
                for frame in frames:
                    yield frame
        finally:
            reader.cancel()
            if connection.outgoing is outgoing:  # commands in flight wait for a reconnect, for a while
                connection.connected.clear()
                connection.outgoing = None
                if connection.pending:
                    connection.loop.call_later(self._grace_left(connection), self._expire, connection, generation)
            log.info("client %s disconnected", client_id)

    async def _read(self, connection: Connection, requests: AsyncIterator[bytes]) -> None:
        decoder = Decoder(self.limits)
        async for frame in requests:
            connection.last_seen, connection.noted = time.monotonic(), False
            message: Message | None = None
            try:
                message = decoder.feed(frame)
                if message is None:
                    continue
                if message.client_id != connection.client_id:
                    raise ProtocolError(
                        f"this stream is authenticated as client {connection.client_id!r} and cannot act as "
                        f"{message.client_id!r}"
                    )
                connection.meter.record(message, "up")
                if message.kind == "hello":
                    # A first hello with ready=False only checks the token; the client says it is ready (with
                    # its data and parts) once it has built them, and only then takes over its client id.
                    if message.meta.get("ready", True):
                        decoder.limits = self._limits_of(message)  # its state may now cross this stream
                        session = str(message.meta.get("session", ""))
                        if connection.session and session != connection.session:
                            self._restarted(connection)
                        elif connection.session:  # the same process, back: send what it may have missed
                            for frames in list(connection.pending_frames.values()):
                                self._put(connection, frames)
                        connection.session = session
                        connection.hello = message
                        connection.connected.set()
                        log.info("client %s ready", connection.client_id)
                    self._send(
                        connection,
                        Message("welcome", connection.client_id, -1, 0, {}, {"heartbeat_s": self.heartbeat_s}),
                    )
                elif message.kind == "alive":  # a client with nothing else to say (its frame counted as seen)
                    pass
                elif message.kind == "progress":
                    if self.on_progress is not None:
                        self.on_progress(connection.client_id, _record(message))
                elif message.kind in REQUEST_KINDS:
                    # Served in a task of its own, so the stream keeps reading: several requests may be in
                    # flight. Tasks start in the order they are created, so the server gets them in order.
                    task = asyncio.create_task(self._serve_one(connection, message))
                    connection.tasks.add(task)
                    task.add_done_callback(connection.tasks.discard)
                elif message.kind in ("done", "error") and "seq" in message.meta:
                    future = connection.pending.get(int(message.meta["seq"]))
                    if future is not None and not future.done():
                        future.set_result(message)
                else:
                    raise ProtocolError(f"unexpected message kind {message.kind!r} from a client")
            except Exception as error:  # a bug must not end the stream silently either
                self._refuse(connection, message, error)

    def _limits_of(self, hello: Message) -> Limits:
        """The limits of a ready client's stream: the server's, with room for the state (client side) its hello
        says it holds, as its ``get_state`` reply carries it."""
        count = hello.meta.get("state_tensors", 0)
        if type(count) is not int or not 0 <= count <= MAX_STATE_TENSORS:
            raise ProtocolError(
                f"hello: state_tensors must be an int in 0..{MAX_STATE_TENSORS}, got {str(count)[:40]!r}; client "
                "and server must run the same splitlm version"
            )
        return self.limits.with_states(count)

    def _refuse(self, connection: Connection, message: Message | None, error: Exception) -> None:
        """Answer a message that failed with an ``error`` message on its stream (called inside ``except``)."""
        if isinstance(error, SplitLMError):
            log.warning("client %s: %s", connection.client_id, error)
        else:
            log.exception("client %s: request failed", connection.client_id)
        self._send(connection, error_message(connection.client_id, message, error))

    def _restarted(self, connection: Connection) -> None:
        """A new process took over a client id: what the old one was doing will never be answered."""
        log.warning("client %s restarted", connection.client_id)
        connection.replies.clear()
        connection.inflight.clear()
        if self.on_restart is not None:
            self.on_restart(connection.client_id)
        for future in connection.pending.values():
            if not future.done():
                future.set_exception(ClientGone([connection.client_id], "restarted"))

    async def _serve_one(self, connection: Connection, message: Message) -> None:
        try:
            await self._serve(connection, message)
        except Exception as error:
            self._refuse(connection, message, error)

    async def _serve(self, connection: Connection, message: Message) -> None:
        key = (message.kind, message.step, message.micro)
        rid = message.meta.get(RID)
        cached = connection.replies.get(key) if message.kind != "eval" else None
        if cached is not None:  # a retry of work already done: answer again, apply nothing
            self._send(connection, _answering(cached, rid), about=message.kind)
            return
        if self.handler is None:
            raise ProtocolError("the server is still waiting for every client to connect; send no work yet")
        if self.work_needs_command and not connection.working:
            raise ProtocolError(
                f"{message.kind} outside a command: the server asked client {connection.client_id} for no work"
            )
        future = connection.inflight.get(key) if message.kind != "eval" else None
        if future is None:  # (a retry of a request still being worked on waits for that same work)
            future = resolved(self.handler(message))
            loop = asyncio.get_running_loop()
            if message.kind != "eval":
                connection.inflight[key] = future

                def remember(done: concurrent.futures.Future[Message]) -> None:
                    # Cache the reply even if this stream dies meanwhile: the retry on the next stream gets it.
                    reply = None if done.cancelled() or done.exception() is not None else done.result()
                    loop.call_soon_threadsafe(self._remember, connection, key, reply)

                future.add_done_callback(remember)
        try:
            # shield: a closed stream must not cancel work the server may already be doing
            reply = _answering(await asyncio.shield(asyncio.wrap_future(future)), rid)
        except SplitLMError as error:
            reply = error_message(connection.client_id, message, error)
        self._send(connection, reply, about=message.kind)

    def _remember(self, connection: Connection, key: tuple[str, int, int], reply: Message | None) -> None:
        connection.inflight.pop(key, None)
        if reply is None:
            return
        connection.replies[key] = reply
        while len(connection.replies) > REPLAY_CACHE:
            connection.replies.popitem(last=False)

    def _send(self, connection: Connection, message: Message, about: str | None = None) -> None:
        """Queue ``message`` on the client's current stream (from the event loop's thread); ``about``: the kind of
        the request it answers (its bytes count as that request's: training or evaluation)."""
        if connection.outgoing is not None:
            connection.meter.record(message, "down", about=about)
            connection.outgoing.put_nowait(encode(message))


def _answering(reply: Message, rid: object) -> Message:
    """``reply`` carrying the id of the request it answers now (a cached reply may answer a retry)."""
    return reply if rid is None else reply.replace(**{RID: rid})  # type: ignore[arg-type]


def _record(message: Message) -> dict[str, object]:
    """A client's step record from a ``progress`` message (a JSON object in ``meta["record"]``)."""
    try:
        record = json.loads(str(message.meta.get("record", "")))
    except ValueError:
        record = None
    if not isinstance(record, dict):
        raise ProtocolError("progress from a client: meta['record'] must be a JSON object")
    return record
