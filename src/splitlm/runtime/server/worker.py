"""The worker: the server's request queue and the thread that serves it, one request at a time.

Requests go through a queue and a worker thread (``start``), in the order a scheduling policy picks
(``runtime/scheduling.py``), so concurrent clients are served one request at a time. Without a worker,
``handle`` runs a request at once. Internal work (forget, abandon, snapshot, restore) is queued as an action
behind the requests already waiting (``between_requests``), so it never runs in the middle of one.

Back-pressure: with ``max_pending``, at most that many trunk graphs wait for their backward (U-shape): the worker
leaves further training forwards in the queue until a backward frees a slot, and serves every other request
meanwhile (never a refusal). ``serving_stats`` reports the worker's idle fraction and each client's time queued.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future
from typing import Any, TypeVar

from splitlm.errors import ProtocolError
from splitlm.runtime.scheduling import Request, make_policy, request_tokens
from splitlm.runtime.server.handlers import Handlers
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)

T = TypeVar("T")


class Worker:
    """The queue of requests, in a policy's order, and the thread that hands each to the handlers."""

    def __init__(self, handlers: Handlers, policy: str = "fifo") -> None:
        self.handlers = handlers
        self._policy = make_policy(policy, cost=self._backward_cost)
        self._wakeup = threading.Condition()
        self._thread: threading.Thread | None = None
        self._running = False
        # serving statistics (``serving_stats``), updated under ``_wakeup``
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._idle_seconds = 0.0
        self._idle_since: float | None = None  # the worker waits for work since then
        self._busy_seconds = 0.0
        self._waits: dict[str, tuple[int, float]] = {}  # client -> (requests served, seconds they were queued)

    def start(self) -> None:
        """Serve queued requests on a worker thread, in the order the scheduling policy picks."""
        if self._thread is None:
            self._running = True
            self._started_at = self._started_at or time.monotonic()
            self._stopped_at = None
            self._thread = threading.Thread(target=self._serve, name="splitlm-server", daemon=True)
            self._thread.start()

    def stop(self) -> None:
        if self._thread is not None:
            with self._wakeup:
                self._running = False
                self._wakeup.notify_all()
            self._thread.join()
            self._thread = None
            self._stopped_at = time.monotonic()

    def submit(self, message: Message) -> Future[Message]:
        request = Request(message)
        if self._thread is None:
            self._record_wait(request)
            self._timed_dispatch(request)
        else:
            with self._wakeup:
                self._policy.push(request)
                self._wakeup.notify()
        return request.future

    def handle(self, message: Message) -> Message:
        future = self.submit(message)
        if self._thread is None and not future.done():
            raise ProtocolError("this step waits for other clients: start() the server worker for parallel clients")
        return future.result()

    def between_requests(self, work: Callable[[], T], wait: bool = True) -> T | None:
        """Run ``work`` on the worker, in the queue's order (at once without a worker); ``wait=False`` only
        queues it (for callers that must not block, like the network's event loop)."""
        if self._thread is None:
            return work()
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work())
            except BaseException as error:  # reaches the caller
                done.set_exception(error)

        with self._wakeup:
            self._policy.push(Request(Message("internal", "-", -1), action=run))
            self._wakeup.notify()
        return done.result() if wait else None

    def serving_stats(self) -> dict[str, Any]:
        """How the worker spent its time since ``start`` (idle: waiting with nothing admissible to serve) and
        how long each client's requests waited in the queue before being served."""
        with self._wakeup:
            now = time.monotonic()
            idle = self._idle_seconds + (now - self._idle_since if self._idle_since is not None else 0.0)
            elapsed = (self._stopped_at or now) - self._started_at if self._started_at is not None else 0.0
            clients = {
                client: {"requests": count, "wait_seconds": seconds, "mean_wait_s": seconds / count}
                for client, (count, seconds) in self._waits.items()
            }
            return {
                "idle_fraction": min(1.0, idle / elapsed) if elapsed > 0 else 0.0,
                "busy_seconds": self._busy_seconds,
                "idle_seconds": idle,
                "clients": clients,
            }

    # --- the thread -------------------------------------------------------------------------------------

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while True:
                    if not self._running:
                        return
                    request = self._policy.pop(self._admissible) if len(self._policy) else None
                    if request is not None:
                        break
                    self._idle_since = time.monotonic()  # nothing (admissible) to serve
                    self._wakeup.wait()
                    self._idle_seconds += time.monotonic() - self._idle_since
                    self._idle_since = None
                self._record_wait(request)
            self._timed_dispatch(request)

    def _admissible(self, request: Request) -> bool:
        """Back-pressure: a U-shaped training forward needs a free graph slot; everything else can run now.
        Only the worker changes the handlers' graphs, so a slot freed by a backward is seen on its next look."""
        message = request.message
        if request.action is not None or message.kind != "forward":
            return True
        return self.handlers.slot_free(message)

    def _backward_cost(self, request: Request) -> float:
        """Expected time of a backward (longest_backward_first): trunk blocks of the client's route x tokens."""
        route = self.handlers.router.routes.get(request.message.client_id)
        return (len(route.blocks) if route is not None else 1) * request_tokens(request)

    def _record_wait(self, request: Request) -> None:
        if request.action is None:
            client = request.message.client_id
            count, seconds = self._waits.get(client, (0, 0.0))
            self._waits[client] = (count + 1, seconds + max(0.0, time.monotonic() - request.queued_at))

    def _timed_dispatch(self, request: Request) -> None:
        began = time.monotonic()
        try:
            self._dispatch(request)
        finally:
            with self._wakeup:
                self._busy_seconds += time.monotonic() - began

    def _dispatch(self, request: Request) -> None:
        if request.action is not None:  # internal work queued behind the requests already waiting
            try:
                request.action()
            except Exception:  # a bug must not stop the worker
                log.exception("internal server action failed")
            return
        self.handlers.serve(request)
