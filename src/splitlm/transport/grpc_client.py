"""The networked client side: a ``Transport`` over one bidirectional gRPC stream.

``submit`` sends a request with a fresh id (``meta["rid"]``) and returns a future that the reply carrying the
same id completes, so several requests may be in flight; ``request`` waits for one. Commands the server pushes
(``cmd:*``) are queued for the client's agent loop. If the stream breaks, the connection reconnects with
backoff and sends every request still in flight again; the server answers a retried request from its replay
cache, so nothing is applied twice. While connected it says it is alive as often as the server's ``welcome``
asks, so the server can tell how long it has been silent.

A connection that cannot be made is diagnosed (``diagnose``): nothing listening, an unreachable host, a
server certificate for another name, an unknown CA, a client certificate the server requires, or a refused
token each get their own one-line message. A failure that no retry can mend (a host name that does not resolve,
a certificate or token the server refuses) is reported at once; one that may pass (nothing listening yet, no
answer) is retried within ``connect_timeout``, after a line saying what failed and how long it waits.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import ssl
import threading
import time
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from pathlib import Path

import grpc

from splitlm.errors import ProtocolError
from splitlm.transport.base import ByteMeter
from splitlm.transport.grpc_server import CHANNEL_OPTIONS, HEADER_LIMIT, METHOD
from splitlm.transport.messages import RID, Message
from splitlm.transport.wire import Decoder, Limits, WireError, encode

log = logging.getLogger(__name__)

ATTEMPT_TIMEOUT = 5.0  # one attempt to open the channel
LOOPBACK = ("127.0.0.1", "localhost", "::1")
_CLOSED = object()
_AUTH_CODES = (grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED)


class _HelloRefused(ProtocolError):
    """The server answered the hello with an error: trying again would get the same answer."""


def split_address(address: str) -> tuple[str, int]:
    host, _, port = address.rpartition(":")
    try:
        return host.strip("[]"), int(port)
    except ValueError:
        raise ProtocolError(f"server address {address!r}: expected HOST:PORT, e.g. 127.0.0.1:50051") from None


# getaddrinfo's answers that a retry would only repeat (EAI_AGAIN, a resolver that did not answer, may pass)
_UNKNOWN_NAME = {getattr(socket, name) for name in ("EAI_NONAME", "EAI_NODATA", "EAI_FAIL") if hasattr(socket, name)}


def unresolvable(address: str) -> str:
    """Why ``address``'s host name can never resolve, in one line ("" if it resolves, or may on a retry)."""
    host, port = split_address(address)
    try:
        socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except socket.gaierror as error:
        if error.errno in _UNKNOWN_NAME:
            return f"cannot resolve the host name {host!r} ({error.strerror}): check the server address"
    except (OSError, UnicodeError):
        pass  # the connection attempt says what is wrong
    return ""


def diagnose(address: str, ca: Path | None, client_cert: tuple[Path, Path] | None, timeout: float = 5.0) -> str:
    """Why a stream to ``address`` cannot be opened, in one line naming the likely fix ("" if TLS works)."""
    return diagnosis(address, ca, client_cert, timeout)[0]


def diagnosis(
    address: str, ca: Path | None, client_cert: tuple[Path, Path] | None, timeout: float = 5.0
) -> tuple[str, bool]:
    """``(why, final)``: ``diagnose``'s line, and whether a retry could not change it (the name does not resolve, the
    server's certificate or its handshake refuses us) rather than may (nothing listening yet, no answer)."""
    host, port = split_address(address)
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except ConnectionRefusedError:
        why = f"nothing is listening at {address} (connection refused): is the server running, and is the port right?"
        return why, False
    except TimeoutError:
        return f"{address} does not answer (no reply in {timeout:.0f} s): check the host name and any firewall", False
    except socket.gaierror as error:
        return f"cannot resolve the host name {host!r}: check the server address", error.errno in _UNKNOWN_NAME
    except OSError as error:
        return f"cannot reach {address}: {error.strerror or error}", False
    return _tls_diagnosis(sock, address, host, ca, client_cert)


def _tls_diagnosis(
    sock: socket.socket, address: str, host: str, ca: Path | None, client_cert: tuple[Path, Path] | None
) -> tuple[str, bool]:
    """What a TLS handshake over the connected ``sock`` says is wrong (``""``: nothing), and whether it is final: a
    certificate refused either way is; a broken handshake, or a plain-text attempt at a server, may pass."""
    with sock:
        if ca is None:
            why = f"{address} accepts connections but no plain-text gRPC stream: does it need TLS (pass --certs)?"
            return why, False
        context = ssl.create_default_context(cafile=str(ca))
        context.set_alpn_protocols(["h2"])
        if client_cert is not None:
            context.load_cert_chain(str(client_cert[0]), str(client_cert[1]))
        try:
            with context.wrap_socket(sock, server_hostname=host) as tls:
                tls.settimeout(1.0)
                closed = False
                with contextlib.suppress(TimeoutError, ssl.SSLWantReadError):
                    closed = tls.recv(1) == b""  # a healthy server waits for us to speak first
                if closed:  # TLS 1.3 refuses a missing client certificate only after the handshake
                    if client_cert is None:
                        why = (
                            "the server closed the connection after the TLS handshake: it requires a client "
                            "certificate, pass --mtls (with client-ID.pem/.key in --certs)"
                        )
                        return why, True
                    why = f"the server closed the connection after the TLS handshake (is {client_cert[0]} its CA's?)"
                    return why, True
        except ssl.SSLCertVerificationError as error:
            if error.verify_code == 62:  # X509_V_ERR_HOSTNAME_MISMATCH
                why = (
                    f"the server's certificate is not for {host!r}: connect with a name it was issued for, or "
                    "re-issue it with `splitlm certs DIR --hosts NAME ...`"
                )
                return why, True
            if error.verify_code in (2, 7, 18, 19, 20, 21):  # not signed by (or no issuer in) our CA file
                return f"the server's certificate is not signed by {ca} (unknown CA): use the ca.pem of its certs", True
            return f"the server's certificate was refused: {error.verify_message}", True
        except ssl.SSLError as error:
            text = str(error).upper()
            if "CERTIFICATE_REQUIRED" in text or ("HANDSHAKE_FAILURE" in text and client_cert is None):
                return (
                    "the server requires a client certificate: pass --mtls (with client-ID.pem/.key in --certs)",
                    True,
                )
            return f"TLS handshake with {address} failed ({error.reason or error})", False
        except OSError as error:
            return f"the connection to {address} broke during the TLS handshake ({error})", False
    return "", False


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
        connect_timeout: float = 30.0,
        reconnect_timeout: float = 120.0,
        limits: Limits | None = None,
    ) -> None:
        self.address = address
        self.client_id = client_id
        self.token = token
        self.ca = ca
        self.client_cert = client_cert
        self.request_timeout = request_timeout
        self.max_retries = max_retries  # re-sends of one request across reconnects
        self.connect_timeout = connect_timeout
        self.reconnect_timeout = reconnect_timeout
        self.hello = hello or Message("hello", client_id, -1)
        # what frames from the server may declare; a client raises it once it knows its state (``allow_states``)
        self.limits = limits or Limits(max_header_bytes=HEADER_LIMIT)
        self.meter = ByteMeter()  # every frame's tensors (commands and their answers as control traffic)
        self.commands: queue.Queue[Message | object] = queue.Queue()
        self._ids = itertools.count(1)
        self._inflight: dict[int, tuple[Message, Future[Message], int]] = {}  # rid -> (request, future, sends)
        self._lock = threading.RLock()  # guards the stream's outgoing queue and the in-flight table
        self._outgoing: queue.Queue[bytes | object] | None = None
        self._channel: grpc.Channel | None = None
        self._generation = 0  # which stream is current; a reader of an old one changes nothing
        self._broken = threading.Event()
        self._closing = False
        self._welcome = threading.Event()
        self._auth_error: grpc.RpcError | None = None
        self._hello_refused = ""  # why the server answered our hello with an error (then the stream is given up)
        self._heartbeat_s = 0.0  # from the server's welcome (0: it wants none)
        self._heartbeat: threading.Thread | None = None
        host = split_address(address)[0]
        if ca is None and host not in LOOPBACK:
            raise ProtocolError(f"plain-text transport is only allowed on loopback, not {host}: pass --ca")
        self.connect(self.connect_timeout, attempts=max_retries + 1)

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

    def connect(self, timeout: float | None = None, attempts: int | None = None) -> None:
        """(Re)open the stream within ``timeout`` seconds, with backoff; say hello so the server knows us.

        A failure no retry can mend is raised at once; before the first retry of one that may pass, a line says
        what failed and how long it keeps trying."""
        deadline = time.monotonic() + (self.connect_timeout if timeout is None else timeout)
        # gRPC would retry a name that cannot resolve until the deadline (a reconnect retries: the name did resolve)
        unknown_host = unresolvable(self.address) if self._generation == 0 else ""
        if unknown_host:
            raise ProtocolError(f"cannot connect to {self.address}: {unknown_host}")
        delay, attempt = 0.2, 0
        while True:
            attempt += 1
            try:
                self._open(max(0.5, min(ATTEMPT_TIMEOUT, deadline - time.monotonic())))
                return
            except (grpc.RpcError, grpc.FutureTimeoutError, ProtocolError) as error:
                if isinstance(error, _HelloRefused):
                    raise ProtocolError(f"server refused client {self.client_id}: {error}") from None
                if isinstance(error, grpc.RpcError) and error.code() in _AUTH_CODES:
                    details = str(error.details())
                    hint = " (check the token: --token, $SPLITLM_TOKEN or tokens.json)"
                    hint = "" if "certificate" in details else hint  # a certificate refusal names its own fix
                    raise ProtocolError(f"server refused client {self.client_id}: {details}{hint}") from None
                out_of_time = time.monotonic() + delay >= deadline or (attempts is not None and attempt >= attempts)
                if out_of_time or attempt == 1:
                    why, final = diagnosis(self.address, self.ca, self.client_cert, 5.0 if out_of_time else 1.0)
                    reason = why or (
                        str(error) if isinstance(error, ProtocolError) else "no gRPC stream could be opened"
                    )
                    if out_of_time or final:
                        raise ProtocolError(f"cannot connect to {self.address}: {reason}") from None
                    left = deadline - time.monotonic()
                    log.warning("not connected yet, retrying for up to %.0f s more: %s", left, reason)
                log.info("connect to %s failed (%s); retrying in %.1f s", self.address, type(error).__name__, delay)
                time.sleep(delay)
                delay = min(delay * 2, 5.0)

    def _open(self, timeout: float) -> None:
        with self._lock:
            if self._channel is not None:
                self._channel.close()
            self._generation += 1
            generation = self._generation
            self._broken.clear()
            self._auth_error = None
            self._hello_refused = ""
            self._channel = self._credentials_channel()
        grpc.channel_ready_future(self._channel).result(timeout=timeout)
        outgoing: queue.Queue[bytes | object] = queue.Queue()
        call = self._channel.stream_stream(METHOD)(
            iter(outgoing.get, _CLOSED),
            metadata=(("authorization", f"Bearer {self.token}"), ("x-splitlm-client", self.client_id)),
        )
        with self._lock:
            self._outgoing = outgoing
        threading.Thread(target=self._read, args=(call, generation), daemon=True, name="splitlm-reader").start()
        self._welcome.clear()
        self._put(self.hello)
        # The server answers hello with welcome; an auth failure ends the stream instead.
        while not self._welcome.wait(0.05):
            if self._broken.is_set():
                if self._auth_error is not None:
                    raise self._auth_error
                if self._hello_refused:
                    raise _HelloRefused(self._hello_refused)
                raise ProtocolError(f"the server at {self.address} closed the stream at hello")

    def _read(self, call: grpc.Call, generation: int) -> None:
        decoder = Decoder(self.limits)
        try:
            for frame in call:
                decoder.limits = self.limits  # (raised by allow_states while the stream runs)
                message = decoder.feed(frame)
                if message is None:
                    continue
                self.meter.record(message, "down")
                if message.kind == "welcome":
                    self._heartbeat_s = float(message.meta.get("heartbeat_s", 0.0) or 0.0)
                    self._welcome.set()
                    if self._heartbeat is None and self._heartbeat_s > 0:
                        self._heartbeat = threading.Thread(target=self._beat, daemon=True, name="splitlm-alive")
                        self._heartbeat.start()
                elif message.kind == "error" and message.meta.get("about") == "hello" and not self._welcome.is_set():
                    self._hello_refused = str(message.meta.get("error", "no reason given"))
                    return  # the server will not take this stream; connect() says why
                elif message.kind.startswith("cmd:"):
                    self.commands.put(message)
                else:
                    self._answer(message)
        except grpc.RpcError as error:
            if error.code() in _AUTH_CODES:
                self._auth_error = error
            elif not self._closing:
                log.warning("stream to %s broke: %s", self.address, error.code())
        except WireError as error:
            log.warning("bad frame from server: %s", error)
        finally:
            if generation == self._generation:
                self._broken.set()
                if self._closing:
                    self.commands.put(_CLOSED)
                elif self._welcome.is_set():  # a working stream broke: get it back
                    threading.Thread(target=self._recover, args=(generation,), daemon=True).start()

    def _beat(self) -> None:
        """Say ``alive`` every ``heartbeat_s`` while the stream is up (until closed)."""
        while not self._closing:
            time.sleep(self._heartbeat_s)
            with self._lock:
                if not self._closing and not self._broken.is_set() and self._outgoing is not None:
                    self._put(Message("alive", self.client_id, -1))

    def _answer(self, reply: Message) -> None:
        """Complete the future of the request ``reply`` answers (by id); drop a duplicate of an old answer."""
        rid = reply.meta.get(RID)
        with self._lock:
            if rid is None and reply.kind == "error" and self._inflight:
                rid = min(self._inflight)  # an error about a frame the server could not read: the oldest request
            entry = self._inflight.pop(int(rid), None) if isinstance(rid, int) else None
        if entry is None:
            log.debug("dropped a stale %s for step %d", reply.kind, reply.step)
            return
        request, future, _ = entry
        if reply.kind == "error":
            future.set_exception(ProtocolError(f"server rejected {request.kind}: {reply.meta.get('error')}"))
        else:
            future.set_result(reply)

    def _recover(self, generation: int) -> None:
        """Reconnect after a broken stream and send every request in flight again; give up on them (and on the
        commands) if the server stays away."""
        try:
            if generation != self._generation:
                return
            self.connect(self.reconnect_timeout)
            with self._lock:
                resend = sorted(self._inflight.items())
                for rid, (request, future, sends) in resend:
                    if sends > self.max_retries:
                        del self._inflight[rid]
                        future.set_exception(ProtocolError(f"lost the server at {self.address}"))
                    else:
                        self._inflight[rid] = (request, future, sends + 1)
                        self._put(request)
        except ProtocolError as error:
            self._fail_all(ProtocolError(f"lost the server at {self.address}: {error}"))
            self.commands.put(_CLOSED)

    def _fail_all(self, error: ProtocolError) -> None:
        with self._lock:
            pending, self._inflight = self._inflight, {}
        for _, future, _ in pending.values():
            if not future.done():
                future.set_exception(error)

    def _put(self, message: Message) -> None:
        with self._lock:
            assert self._outgoing is not None
            self.meter.record(message, "up")
            for frame in encode(message):
                self._outgoing.put(frame)

    def allow_states(self, count: int) -> None:
        """Accept states (``cmd:set_state``) of ``count`` tensors from the server: this client's own state's size."""
        self.limits = self.limits.with_states(count)

    def update_hello(self, hello: Message) -> None:
        """Say more about this client (its data and parts, once built); repeated on every reconnect."""
        self.hello = hello
        self._put(hello)

    @property
    def broken(self) -> bool:
        return self._broken.is_set()

    def wait_closed(self, timeout: float) -> bool:
        """Wait for the server to end the stream."""
        return self._broken.wait(timeout)

    def expect_close(self) -> None:
        """The server is about to end the stream (the run is over): do not reconnect."""
        self._closing = True

    def close(self) -> None:
        self._closing = True
        self._fail_all(ProtocolError("the connection was closed"))
        with self._lock:
            if self._outgoing is not None:
                self._outgoing.put(_CLOSED)
            if self._channel is not None:
                self._channel.close()

    # --- Transport --------------------------------------------------------------------------------------

    def submit(self, message: Message) -> Future[Message]:
        """Send a request now; its future completes with the reply (or a ``ProtocolError``)."""
        future: Future[Message] = Future()
        with self._lock:
            rid = next(self._ids)
            request = message.detached().replace(**{RID: rid})
            self._inflight[rid] = (request, future, 1)
            if not self._broken.is_set():
                self._put(request)  # else the reconnect in progress sends it
        return future

    def request(self, message: Message) -> Message:
        """Send a request and wait for its reply."""
        try:
            return self.submit(message).result(timeout=self.request_timeout)
        except FutureTimeout:
            raise ProtocolError(f"no reply from {self.address} within {self.request_timeout:.0f} s") from None

    def send(self, message: Message) -> None:
        """Send a message that needs no reply (a command's ``done``)."""
        self._put(message)
