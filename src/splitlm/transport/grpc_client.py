"""The networked client side: a ``Transport`` over one bidirectional gRPC stream.

``request`` sends a request and waits for its reply; commands the server pushes (``cmd:*``) are queued for
the client's agent loop. If the stream breaks, the connection reconnects with exponential backoff and
re-sends the request in flight; the server answers a retried request from its replay cache, so nothing is
applied twice.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from pathlib import Path

import grpc

from splitlm.errors import ProtocolError
from splitlm.transport.base import ByteMeter
from splitlm.transport.grpc_server import CHANNEL_OPTIONS, HEADER_LIMIT, METHOD
from splitlm.transport.messages import Message
from splitlm.transport.wire import Decoder, Limits, WireError, encode

log = logging.getLogger(__name__)

REPLY_KINDS = ("activations", "gradients", "stepped", "loss")
ANSWERS = {
    "forward": ("activations", "loss"),
    "eval": ("activations", "loss"),
    "backward": ("gradients",),
    "step": ("stepped",),
}
CONNECT_TIMEOUT = 5.0
_CLOSED = object()


class GrpcConnection:
    def __init__(
        self,
        address: str,
        client_id: str,
        token: str,
        ca: Path | None = None,
        client_cert: tuple[Path, Path] | None = None,
        request_timeout: float = 600.0,
        max_retries: int = 8,
        hello: Message | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.token = token
        self.ca = ca
        self.client_cert = client_cert
        self.request_timeout = request_timeout
        self.max_retries = max_retries
        self.hello = hello or Message("hello", client_id, -1)
        self.meter = ByteMeter()
        self.commands: queue.Queue[Message | object] = queue.Queue()
        self._replies: queue.Queue[Message | object] = queue.Queue()
        self._outgoing: queue.Queue[bytes | object] | None = None
        self._channel: grpc.Channel | None = None
        self._reader: threading.Thread | None = None
        self._broken = threading.Event()
        self._closing = False
        self._welcome = threading.Event()
        self._lock = threading.Lock()
        if ca is None:
            host = address.rsplit(":", 1)[0].strip("[]")
            if host not in ("127.0.0.1", "localhost", "::1"):
                raise ProtocolError(f"plain-text transport is only allowed on loopback, not {host}: pass --ca")
        self.connect()

    # --- connection management -------------------------------------------------------------------------

    def _credentials_channel(self) -> grpc.Channel:
        if self.ca is None:  # loopback only: checked in __init__
            return grpc.insecure_channel(self.address, options=CHANNEL_OPTIONS)
        key_chain = None
        if self.client_cert is not None:
            key_chain = (self.client_cert[1].read_bytes(), self.client_cert[0].read_bytes())
        credentials = grpc.ssl_channel_credentials(
            root_certificates=self.ca.read_bytes(),
            private_key=key_chain[0] if key_chain else None,
            certificate_chain=key_chain[1] if key_chain else None,
        )
        return grpc.secure_channel(self.address, credentials, options=CHANNEL_OPTIONS)

    def connect(self) -> None:
        """(Re)open the stream, with exponential backoff; say hello so the server knows we are here."""
        delay = 0.2
        for attempt in range(self.max_retries + 1):
            try:
                self._open()
                return
            except (grpc.RpcError, grpc.FutureTimeoutError, ProtocolError) as error:
                if isinstance(error, grpc.RpcError) and error.code() in (
                    grpc.StatusCode.UNAUTHENTICATED,
                    grpc.StatusCode.PERMISSION_DENIED,
                ):
                    raise ProtocolError(f"server refused client {self.client_id}: {error.details()}") from None
                if attempt == self.max_retries:
                    why = (
                        "no TLS connection (wrong CA, or a client certificate needed?)"
                        if isinstance(error, grpc.FutureTimeoutError)
                        else str(error)
                    )
                    raise ProtocolError(f"cannot reach {self.address}: {why}") from None
                log.info("connect failed (%s); retrying in %.1f s", error, delay)
                time.sleep(delay)
                delay = min(delay * 2, 10.0)

    def _open(self) -> None:
        if self._channel is not None:
            self._channel.close()
        self._broken.clear()
        self._channel = self._credentials_channel()
        grpc.channel_ready_future(self._channel).result(timeout=CONNECT_TIMEOUT)
        outgoing: queue.Queue[bytes | object] = queue.Queue()
        self._outgoing = outgoing
        call = self._channel.stream_stream(METHOD)(
            iter(lambda: outgoing.get(), _CLOSED),
            metadata=(("authorization", f"Bearer {self.token}"), ("x-splitlm-client", self.client_id)),
        )
        # A fresh reply queue per stream: nothing left over from a broken stream is taken for a new reply.
        self._replies = queue.Queue()
        self._reader = threading.Thread(
            target=self._read, args=(call, self._replies), daemon=True, name="splitlm-reader"
        )
        self._reader.start()
        self._welcome.clear()
        self._put(self.hello)
        # The server answers hello with welcome; an auth failure ends the stream instead.
        while not self._welcome.wait(0.05):
            if self._broken.is_set():
                if self._auth_error is not None:
                    raise self._auth_error
                raise ProtocolError(f"the server at {self.address} closed the stream at hello")

    _auth_error: grpc.RpcError | None = None

    def _read(self, call, replies: queue.Queue[Message | object]) -> None:
        decoder = Decoder(Limits(max_header_bytes=HEADER_LIMIT))
        try:
            for frame in call:
                message = decoder.feed(frame)
                if message is None:
                    continue
                self.meter.record(message, "down")
                if message.kind == "welcome":
                    self._welcome.set()
                elif message.kind.startswith("cmd:"):
                    self.commands.put(message)
                else:
                    replies.put(message)
        except grpc.RpcError as error:
            if error.code() in (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED):
                self._auth_error = error
            elif not self._closing:
                log.warning("stream to %s broke: %s", self.address, error.code())
        except WireError as error:
            log.warning("bad frame from server: %s", error)
        finally:
            self._broken.set()
            replies.put(_CLOSED)
            if self._closing:
                self.commands.put(_CLOSED)

    def _put(self, message: Message) -> None:
        assert self._outgoing is not None
        self.meter.record(message, "up")
        for frame in encode(message):
            self._outgoing.put(frame)

    def wait_closed(self, timeout: float) -> bool:
        """Wait for the server to end the stream."""
        return self._broken.wait(timeout)

    def close(self) -> None:
        self._closing = True
        if self._outgoing is not None:
            self._outgoing.put(_CLOSED)
        if self._channel is not None:
            self._channel.close()

    # --- Transport --------------------------------------------------------------------------------------

    def request(self, message: Message) -> Message:
        """Send a request, wait for its reply; on a broken stream reconnect and send it again."""
        with self._lock:
            for attempt in range(self.max_retries + 1):
                if self._broken.is_set():
                    self.connect()
                self._put(message.detached())
                reply = self._next_reply(message)
                if reply is _CLOSED:
                    if attempt == self.max_retries:
                        raise ProtocolError(f"lost the server at {self.address}")
                    continue  # the stream broke: reconnect and retry; the server replays if it had the work
                assert isinstance(reply, Message)
                if reply.kind == "error":
                    raise ProtocolError(f"server rejected {message.kind}: {reply.meta.get('error')}")
                return reply
        raise ProtocolError(f"lost the server at {self.address}")

    def _next_reply(self, request: Message) -> Message | object:
        """The reply to ``request``: same step and micro-batch, a kind that answers it; anything else is a
        duplicate of an earlier answer (a request re-sent after a reconnect) and is dropped."""
        expected = ANSWERS[request.kind]
        while True:
            try:
                reply = self._replies.get(timeout=self.request_timeout)
            except queue.Empty:
                raise ProtocolError(f"no reply from {self.address} within {self.request_timeout:.0f} s") from None
            if reply is _CLOSED:
                return reply
            assert isinstance(reply, Message)
            if reply.kind == "error" and (reply.meta.get("about") in (None, request.kind)):
                return reply
            if reply.kind in expected and (reply.step, reply.micro) == (request.step, request.micro):
                return reply
            log.debug("dropped a stale %s for step %d", reply.kind, reply.step)

    def send(self, message: Message) -> None:
        """Send a message that needs no reply (a command's ``done``)."""
        self._put(message)
