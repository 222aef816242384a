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
notice a silent link). Authentication, the clients' ``Connection`` records and the grace period live in
``grpc_clients.py``.
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
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import grpc

from splitlm.errors import ClientGone, ProtocolError, SplitLMError
from splitlm.transport.base import Handler, resolved
from splitlm.transport.grpc_clients import Connection, Roster, authenticate
from splitlm.transport.messages import REQUEST_KINDS, RID, Message
from splitlm.transport.wire import MAX_CHUNK, Decoder, Limits, encode

log = logging.getLogger(__name__)

SERVICE = "splitlm.v1.Split"
METHOD = f"/{SERVICE}/Session"
MAX_FRAME_BYTES = MAX_CHUNK + 256 * 1024
STRAGGLER_NOTE_S = 60.0  # a command waiting this long is logged, and again every as long
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
        self.session = secrets.token_hex(8)  # commands carry it: a restarted server's are new commands
        self.tokens = tokens
        self.address = address
        self.certs = certs
        self.mutual_tls = mutual_tls
        self.limits = limits or Limits(max_header_bytes=HEADER_LIMIT)
        # With an orchestrator, a client sends work only while it carries out a command (train, evaluate...):
        # a request left over from before a restart must not touch the restored state.
        self.work_needs_command = work_needs_command
        self.roster = Roster(tokens.values(), client_grace_s)
        self.connections = self.roster.connections
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
        credentials = None
        if self.certs is not None:
            root = (self.certs / "ca.pem").read_bytes() if self.mutual_tls else None
            credentials = grpc.ssl_server_credentials(
                [((self.certs / "server.key").read_bytes(), (self.certs / "server.pem").read_bytes())],
                root_certificates=root,
                require_client_auth=self.mutual_tls,
            )
        try:
            if credentials is None:
                self.port = server.add_insecure_port(self.address)
            else:
                self.port = server.add_secure_port(self.address, credentials)
        except RuntimeError:  # grpcio >= 1.60 raises where it returned port 0
            self.port = 0
        if not self.port:
            from splitlm.transport.grpc_client import unresolvable  # (it imports this module)

            why = unresolvable(self.address) or "is the port in use, and is the host an address of this machine?"
            raise SplitLMError(f"cannot listen on {self.address}: {why}")
        await server.start()
        self._server = server
        self._watchdog = asyncio.create_task(self.roster.watch())

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
        if not connection.connected.wait(self.roster.grace_left(connection)) or connection.loop is None:
            raise ClientGone([client_id], f"not connected ({self.roster.silence(connection)})")
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
        connection.loop.call_soon_threadsafe(connection.put, frames)
        try:
            reply = _answer_of(future, client_id, message.kind, timeout)
        finally:
            connection.pending.pop(seq, None)
            connection.pending_frames.pop(seq, None)
            connection.working -= work
        if reply.kind == "error":
            raise ProtocolError(f"client {client_id}: {reply.meta.get('error')}")
        return reply

    def clear_replies(self) -> None:
        """Forget the cached replies (a round was rolled back: the same requests will ask for new work)."""
        self.roster.clear_replies()

    # --- the stream ------------------------------------------------------------------------------------

    async def _session(self, requests: AsyncIterator[bytes], context: grpc.aio.ServicerContext) -> AsyncIterator[bytes]:
        client_id = await authenticate(context, self.tokens, self.mutual_tls)
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
                self.roster.disconnected(connection, generation)
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
                        decoder.limits = _limits_of(self.limits, message)  # its state may now cross this stream
                        session = str(message.meta.get("session", ""))
                        if connection.session and session != connection.session:
                            self.roster.restarted(connection, self.on_restart)
                        elif connection.session:  # the same process, back: send what it may have missed
                            for frames in list(connection.pending_frames.values()):
                                connection.put(frames)
                        connection.session = session
                        connection.hello = message
                        connection.connected.set()
                        log.info("client %s ready", connection.client_id)
                    self._send(
                        connection,
                        Message("welcome", connection.client_id, -1, 0, {}, {"heartbeat_s": self.roster.heartbeat_s}),
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

    def _refuse(self, connection: Connection, message: Message | None, error: Exception) -> None:
        """Answer a message that failed with an ``error`` message on its stream (called inside ``except``)."""
        if isinstance(error, SplitLMError):
            log.warning("client %s: %s", connection.client_id, error)
        else:
            log.exception("client %s: request failed", connection.client_id)
        self._send(connection, error_message(connection.client_id, message, error))

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
                    loop.call_soon_threadsafe(connection.remember, key, reply)

                future.add_done_callback(remember)
        try:
            # shield: a closed stream must not cancel work the server may already be doing
            reply = _answering(await asyncio.shield(asyncio.wrap_future(future)), rid)
        except SplitLMError as error:
            reply = error_message(connection.client_id, message, error)
        self._send(connection, reply, about=message.kind)

    def _send(self, connection: Connection, message: Message, about: str | None = None) -> None:
        """Queue ``message`` on the client's current stream (from the event loop's thread); ``about``: the kind of
        the request it answers (its bytes count as that request's: training or evaluation)."""
        if connection.outgoing is not None:
            connection.meter.record(message, "down", about=about)
            connection.outgoing.put_nowait(encode(message))


def _answer_of(future: concurrent.futures.Future[Message], client_id: str, kind: str, timeout: float | None) -> Message:
    """The client's answer to command ``kind`` (waited for, a note logged every ``STRAGGLER_NOTE_S``); ``ClientGone``
    after ``timeout`` s without one."""
    started = time.monotonic()
    while True:
        left = None if timeout is None else timeout - (time.monotonic() - started)
        try:
            return future.result(timeout=STRAGGLER_NOTE_S if left is None else min(STRAGGLER_NOTE_S, left))
        except concurrent.futures.TimeoutError:
            if left is not None and left <= STRAGGLER_NOTE_S:
                raise ClientGone([client_id], f"did not answer {kind} within {timeout:.0f} s") from None
            log.warning("still waiting for client %s (%s, %.0f s)", client_id, kind, time.monotonic() - started)


def _limits_of(limits: Limits, hello: Message) -> Limits:
    """The limits of a ready client's stream: the server's ``limits``, with room for the state (client side) its
    hello says it holds, as its ``get_state`` reply carries it."""
    count = hello.meta.get("state_tensors", 0)
    if type(count) is not int or not 0 <= count <= MAX_STATE_TENSORS:
        raise ProtocolError(
            f"hello: state_tensors must be an int in 0..{MAX_STATE_TENSORS}, got {str(count)[:40]!r}; client "
            "and server must run the same splitlm version"
        )
    return limits.with_states(count)


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
