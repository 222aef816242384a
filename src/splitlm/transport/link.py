"""Link emulation (``transport.link``): a slow client <-> server link on one machine, without netem.

A ``Link`` is one direction of a link as a pure model: a FIFO serial resource with a bandwidth, a one-way
latency and an optional jitter. ``EmulatedLink`` puts one ``Link`` up and one down around any transport, below
the client's mods, so what it delays is what travels (``Message.payload_bytes()`` after every mod, i.e. the
encoded tensors); in-process, networked and Ray clients are wrapped the same way, on the client's side::

    client code -> [mods] -> EmulatedLink(up ~~> transport ~~> down) -> [mods] -> client code

Time is the emulator's clock (``time.monotonic`` unless a test passes its own); the computed delays are what
``comm_seconds`` reports, whatever the machine's load does to the actual waits.
"""

from __future__ import annotations

import logging
import math
import queue
import random
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass

from splitlm.errors import ProtocolError
from splitlm.transport.base import Transport
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)

Clock = Callable[[], float]
POLL_S = 0.05  # a waiting delivery looks at the clock at least this often (so a test's clock can jump)


@dataclass(frozen=True)
class Transfer:
    """One message's passage over a link, in seconds of the emulator's clock."""

    handed: float  # the sender handed it over
    start: float  # its first bit went on the wire (after the messages before it)
    arrival: float  # its last bit arrived

    @property
    def seconds(self) -> float:
        """Hand-over to arrival, queueing behind earlier messages included."""
        return self.arrival - self.handed

    @property
    def queued(self) -> float:
        return self.start - self.handed


class Link:
    """One direction of a link: a FIFO serial resource.

    A message of n bytes handed over at time t starts at max(t, when the previous one is sent), takes
    n*8/(bandwidth_mbps*1e6) s to send (0 for an unlimited bandwidth, ``bandwidth_mbps=0``) and arrives
    ``latency_ms`` (+- a uniform jitter of up to ``jitter_ms``, never below 0) later. Arrivals keep the order
    of hand-over. The jitter comes from the link's own generator seeded with ``seed``, never the global one.
    """

    def __init__(self, bandwidth_mbps: float = 0.0, latency_ms: float = 0.0, jitter_ms: float = 0.0, seed: int = 0):
        for name, value in (("bandwidth_mbps", bandwidth_mbps), ("latency_ms", latency_ms), ("jitter_ms", jitter_ms)):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"link {name}: {value} is not a finite number >= 0; 0 means unlimited / none")
        self.bandwidth_mbps = float(bandwidth_mbps)
        self.latency_ms = float(latency_ms)
        self.jitter_ms = float(jitter_ms)
        self._rng = random.Random(seed)
        self._free_at = -math.inf  # when the message on the wire is sent
        self._last_arrival = -math.inf
        self._lock = threading.Lock()

    def send_seconds(self, nbytes: int) -> float:
        """Time to put ``nbytes`` on the wire."""
        return nbytes * 8 / (self.bandwidth_mbps * 1e6) if self.bandwidth_mbps > 0 else 0.0

    def send(self, nbytes: int, at: float) -> Transfer:
        """Hand ``nbytes`` over at time ``at``: when they start and arrive (the link is then busy until sent)."""
        with self._lock:
            start = max(at, self._free_at)
            self._free_at = start + self.send_seconds(nbytes)
            delay = self.latency_ms / 1e3
            if self.jitter_ms > 0:
                delay = max(0.0, delay + self._rng.uniform(-self.jitter_ms, self.jitter_ms) / 1e3)
            arrival = max(self._free_at + delay, self._last_arrival)  # no overtaking
            self._last_arrival = arrival
            return Transfer(at, start, arrival)

    def settings(self) -> dict[str, float]:
        return {"bandwidth_mbps": self.bandwidth_mbps, "latency_ms": self.latency_ms, "jitter_ms": self.jitter_ms}


@dataclass
class LinkMeter:
    """Link time (hand-over to arrival, queueing included) and bytes of every message, per direction."""

    up_seconds: float = 0.0
    down_seconds: float = 0.0
    up_bytes: int = 0
    down_bytes: int = 0
    up_messages: int = 0
    down_messages: int = 0

    @property
    def seconds(self) -> float:
        return self.up_seconds + self.down_seconds


_STOP = object()


class _Courier:
    """A thread that runs actions at their due times, in the order they were queued (due times never decrease)."""

    def __init__(self, name: str, clock: Clock) -> None:
        self._clock = clock
        self._queue: queue.SimpleQueue[tuple[float, Callable[[], None]] | object] = queue.SimpleQueue()
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    def put(self, due: float, action: Callable[[], None]) -> None:
        self._queue.put((due, action))

    def stop(self) -> None:
        self._stopped.set()
        self._queue.put(_STOP)
        if self._thread is not threading.current_thread():
            self._thread.join()

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _STOP or self._stopped.is_set():
                return
            due, action = item  # type: ignore[misc]
            while (left := due - self._clock()) > 0:
                if self._stopped.wait(min(left, POLL_S)):
                    return
            try:
                action()
            except Exception:  # an action completes a future; it must not take the courier down with it
                log.exception("emulated link: a delivery failed")


class EmulatedLink:
    """A ``Transport`` that sends requests up and replies down over emulated ``Link``\\ s around ``transport``.

    ``submit`` returns at once: the request is handed to the inner transport when it arrives up the link, its
    reply (or error) crosses the down link, and the returned future completes when that arrives. Several
    requests may be in flight; each direction delivers in order. ``meter`` holds the link time and bytes of
    every message; ``close`` stops the deliveries (requests still in flight fail) and closes the inner transport.
    """

    def __init__(self, transport: Transport, up: Link, down: Link, clock: Clock = time.monotonic) -> None:
        self.transport = transport
        self.up, self.down = up, down
        self.meter = LinkMeter()
        self._clock = clock
        self._lock = threading.Lock()  # hand-over order = queue order = arrival order, and the meter
        self._pending: set[Future[Message]] = set()
        self._closed = False
        self._couriers = (_Courier("splitlm-link-up", clock), _Courier("splitlm-link-down", clock))

    def seconds(self) -> float:
        """Link time of every message so far, both directions (take differences for a step's share)."""
        with self._lock:
            return self.meter.seconds

    def submit(self, message: Message) -> Future[Message]:
        outer: Future[Message] = Future()
        message = message.detached()
        nbytes = message.payload_bytes()
        with self._lock:
            if self._closed:
                outer.set_exception(ProtocolError("the emulated link is closed"))
                return outer
            transfer = self.up.send(nbytes, self._clock())
            self.meter.up_seconds += transfer.seconds
            self.meter.up_bytes += nbytes
            self.meter.up_messages += 1
            self._pending.add(outer)
            self._couriers[0].put(transfer.arrival, lambda: self._deliver(message, outer))
        return outer

    def request(self, message: Message) -> Message:
        return self.submit(message).result()

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            pending, self._pending = list(self._pending), set()
        for courier in self._couriers:
            courier.stop()
        for future in pending:
            if not future.done():
                future.set_exception(ProtocolError("the emulated link was closed with this request in flight"))
        self.transport.close()

    # --- the deliveries (on the couriers' threads) ----------------------------------------------------------

    def _deliver(self, message: Message, outer: Future[Message]) -> None:
        """The request arrived at the server's end: hand it to the inner transport."""
        try:
            inner = self.transport.submit(message)
        except Exception as error:  # a transport that raises instead of failing its future
            self._reply(None, error, outer)
            return
        inner.add_done_callback(lambda done: self._replied(done, outer))

    def _replied(self, done: Future[Message], outer: Future[Message]) -> None:
        try:
            reply = done.result()
        except BaseException as error:  # the server's error, a broken connection, a cancellation
            self._reply(None, error, outer)
            return
        self._reply(reply, None, outer)

    def _reply(self, reply: Message | None, error: BaseException | None, outer: Future[Message]) -> None:
        """Send the reply (or the error, as a message without tensors) down the link."""
        nbytes = reply.payload_bytes() if reply is not None else 0
        with self._lock:
            if self._closed:
                return
            transfer = self.down.send(nbytes, self._clock())
            self.meter.down_seconds += transfer.seconds
            self.meter.down_bytes += nbytes
            self.meter.down_messages += 1
            self._couriers[1].put(transfer.arrival, lambda: self._arrive(reply, error, outer))

    def _arrive(self, reply: Message | None, error: BaseException | None, outer: Future[Message]) -> None:
        with self._lock:
            self._pending.discard(outer)
        if outer.done():
            return
        if error is not None:
            outer.set_exception(error)
        else:
            outer.set_result(reply)  # type: ignore[arg-type]
