"""``clock: wall``: the asynchronous strategies with every client on its own thread, in real time (sflv1, in-process).

A synchronous SFL round waits for its slowest client. Here every client runs its own loop on its own thread and
never waits for the others: take the global model if a newer one exists, train ``local_steps`` steps, hand its
update in, go on. Each client does the same work as in a synchronous run (``rounds x local_steps`` steps); fast
clients just do theirs sooner. The order updates arrive in is the order the threads happen to finish in, so two
runs differ; ``clock: steps`` (``clock.py``) is the reproducible one.

For the driver, a round is an evaluation point: it ends once as many updates were handed in as there are clients
(a synchronous round's work), applied at once (``async``) or when their window closes (``semi_async``). Between
rounds the held-out loss is that of the global model, computed on an unsplit copy of the model (a
``CentralizedClient``) while the clients go on training; after the last round every client side and trunk adapter
takes the global model, so ``adapters/`` holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import TYPE_CHECKING

from splitlm.frameworks.aggregate import aggregate, fit
from splitlm.frameworks.aggregation.updates import AsyncStats, State, apply_updates, window_weights
from splitlm.frameworks.centralized import CentralizedClient
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import build_centralized, load_source
from splitlm.peft import load_trainable_state, trainable_state

if TYPE_CHECKING:
    from splitlm.frameworks.aggregation.asynchronous import Asynchronous

log = logging.getLogger(__name__)


@dataclass
class _Arrival:
    member: Member
    delta: State  # what the client's training changed (its own shapes)
    state: State  # what it holds now (for a rank that differs from the global model's)
    base: int  # the global version the client trained from


class Continuous:
    """The clients' threads, the global model and its versions, across the driver's rounds."""

    def __init__(self, fed: Federation, strategy: Asynchronous) -> None:
        self.fed = fed
        self.config = fed.config
        self.strategy = strategy
        self.mode = strategy.name
        self.lock = threading.Condition()
        self.stats = AsyncStats(self.mode)
        self.arrivals: list[_Arrival] = []  # semi_async: updates of the current window
        self.last_window: dict[str, int] = {}  # semi_async: the window each client last took part in
        self.held: dict[str, int] = {}  # the global version each client holds
        self.bases: dict[str, State] = {}  # what each client held after taking the model or handing in
        self.done: set[str] = set()
        self.error: BaseException | None = None
        self.over = False  # finish() ran: every client is done and holds the global model
        self.evaluator = self._evaluator()
        self.template = trainable_state(self.evaluator.client.model)  # the global model's keys and ranks
        members = fed.members
        self.weights = {m.client_id: float(m.num_examples) for m in members}
        start = aggregate([self.fed.contribution(m) for m in members], fed.weights(members))
        self.global_state = fit(self.template, start)
        self.window_started = time.monotonic()
        self.window = 0
        self.pool = ThreadPoolExecutor(max_workers=len(members), thread_name_prefix="splitlm-async")
        self.futures: list[Future[None]] = [self.pool.submit(self._client_loop, m) for m in members]

    # --- the global model ------------------------------------------------------------------------------

    def _evaluator(self) -> Member:
        """An unsplit copy of the model that holds the global state, for held-out evaluation between rounds."""
        config = self.config
        ranks = [config.for_client(m.index).lora.rank for m in self.fed.members]
        view = config.model_copy(update={"lora": config.lora.model_copy(update={"rank": max(ranks)})})
        model = build_centralized(view, load_source(config))
        client = CentralizedClient(model, config.train, config.seed)
        client.client_id = "global"
        return Member(-1, client, [], None, {})

    def _take(self, member: Member) -> None:
        """Give ``member`` (its client side and its trunk adapter) the global model, if it holds an older one."""
        with self.lock:
            version, state = self.stats.versions, self.global_state
            if self.held.get(member.client_id) == version:
                return
            self.held[member.client_id] = version
        server = self.fed.server
        adapter = server.adapter_of(member.client_id)
        member.client.load_state(fit(member.client.state(), state))
        server.load_adapter_state(adapter, fit(server.adapter_state(adapter), state))
        self.bases[member.client_id] = self.fed.contribution(member)

    def _apply(self, arrivals: list[_Arrival], weights: list[float]) -> None:
        """Move the global model by the arrivals' weighted deltas: a new version (under the lock)."""
        updates = [(a.delta, a.state) for a in arrivals]
        self.global_state = apply_updates(self.global_state, updates, weights)
        self.stats.versions += 1
        self.stats.applied += len(arrivals)
        self.lock.notify_all()

    # --- each client's loop --------------------------------------------------------------------------

    def _client_loop(self, member: Member) -> None:
        fed, local = self.fed, max(self.fed.local_steps, 1)
        try:
            for local_round in range(member.steps_done // local, self.config.framework.rounds):
                self._take(member)
                base = self.held[member.client_id]
                member.train_round(fed, local_round)
                now = self.fed.contribution(member)
                before = self.bases[member.client_id]
                delta = {k: v - before[k] for k, v in now.items()}
                self.bases[member.client_id] = now  # the next update carries only what follows
                self._hand_in(_Arrival(member, delta, now, base))
        except BaseException as error:
            with self.lock:
                self.error = self.error or error
            raise
        finally:
            with self.lock:
                self.done.add(member.client_id)
                self.lock.notify_all()

    def _hand_in(self, arrival: _Arrival) -> None:
        with self.lock:
            self.stats.handed_in += 1
            if self.strategy.windowed:  # a client's second update in a window adds to its first
                earlier = next((a for a in self.arrivals if a.member is arrival.member), None)
                if earlier is not None:
                    earlier.delta = {k: v + arrival.delta[k] for k, v in earlier.delta.items()}
                    earlier.state = arrival.state
                    self.stats.superseded += 1
                else:
                    self.arrivals.append(arrival)
                self.lock.notify_all()
                return
            staleness = self.stats.versions - arrival.base
            self.stats.staleness.append(staleness)
            mean = sum(self.weights.values()) / len(self.weights)
            weight = self.strategy.weigh(self.weights[arrival.member.client_id] / mean, staleness)
            if weight is None:
                self.stats.dropped += 1
                log.info("client %s: update %d versions stale dropped", arrival.member.client_id, staleness)
                self.lock.notify_all()
                return
            self._apply([arrival], [weight])

    def _close_window(self) -> None:
        """semi_async: apply what arrived in the window that just ended (under the lock)."""
        self.window += 1
        arrivals, self.arrivals = self.arrivals, []
        if not arrivals:
            return
        total = sum(self.weights.values())
        shares, missed = [], []
        for arrival in arrivals:
            client = arrival.member.client_id
            shares.append(self.weights[client] / total)
            missed.append(self.window - self.last_window.get(client, 0))  # windows since it last took part
            self.last_window[client] = self.window
            self.stats.staleness.append(self.stats.versions - arrival.base)
        self._apply(arrivals, window_weights(shares, missed))

    # --- the driver's rounds -------------------------------------------------------------------------

    @property
    def finished(self) -> bool:
        return len(self.done) == len(self.fed.members)

    def wait_round(self, round_index: int) -> None:
        """Until the round's evaluation point: as many updates handed in per round as there are clients (the work
        of a synchronous round), applied at once (async) or at the end of the window they arrived in
        (semi_async)."""
        goal = (round_index + 1) * len(self.fed.members)
        window = self.strategy.window_seconds
        with self.lock:
            reached = lambda: self.stats.handed_in >= goal or self.finished or self.error is not None  # noqa: E731
            if not self.strategy.windowed:
                self.lock.wait_for(reached)
                return
            while True:
                end = self.window_started + (self.window + 1) * window
                while not self.finished and self.error is None and time.monotonic() < end:
                    self.lock.wait(timeout=max(0.0, end - time.monotonic()))
                self._close_window()
                if reached():
                    return

    def finish(self) -> None:
        """Wait for every client's last update, apply what is left, and give everyone the global model."""
        for future in self.futures:
            future.result()
        self.pool.shutdown()
        with self.lock:
            if self.arrivals:
                self._close_window()
        for member in self.fed.members:
            self._take(member)
        self.over = True

    def failure(self) -> BaseException | None:
        """The first error of a client's thread (it stops the run), if any."""
        return self.error

    def shutdown(self) -> None:
        self.fed.stop.set()
        self.pool.shutdown(wait=True)


def wall_round(fed: Federation, strategy: Asynchronous, round_index: int) -> list[Member]:
    """One evaluation point of a ``clock: wall`` run: the clients train on regardless."""
    runner = strategy.runner
    if runner is None:
        runner = strategy.runner = Continuous(fed, strategy)
    assert isinstance(runner, Continuous)
    if runner.over:  # every client finished early: the rounds left only evaluate the final model
        return [fed.members[0]]
    try:
        runner.wait_round(round_index)
        error = runner.failure()
        if error is not None:
            raise error
        if round_index + 1 < fed.config.framework.rounds and not runner.finished:
            with runner.lock:
                load_trainable_state(runner.evaluator.client.model, runner.global_state, "the global model")
            return [runner.evaluator]
        runner.finish()
    except BaseException:
        runner.shutdown()
        raise
    return [fed.members[0]]
