"""Asynchronous aggregation for split-federated learning (``framework.aggregation``; survey §4.4).

A synchronous SFL round waits for its slowest client. In the asynchronous modes every client runs its own
loop on its own thread and never waits for the others: take the global model if a newer one exists, train
``local_steps`` steps, hand its update in, go on. Each client does the same work as in a synchronous run
(``rounds x local_steps`` steps); fast clients just do theirs sooner.

An update is what the client's training changed since it last took the global model or handed an update in,
``delta = L - base`` (per tensor, in the client's own shapes), and the global model moves by weighted deltas,
``G <- G + sum w_i delta_i``. Deltas, not models, are applied: an update trained from an older global model
still carries only its own progress, instead of dragging the global model back toward the old one, and with
one client and no staleness the result is that client's own training.

- ``async`` (DT-ASFL, SFL-LEO): an update is applied the moment it arrives, with
  ``w = async_mix * (n_i / mean n) * (1 + s) ** -staleness_exponent``, ``s`` the global versions made since the
  client took its model (a soft penalty); updates more than ``max_staleness`` versions stale are dropped (the
  hard cutoff).
- ``semi_async`` (SAFSL): updates wait for the end of the current window of ``round_window_s`` seconds, then
  are applied together with ``w_i`` proportional to ``n_i * k_i``, ``k_i`` the windows since client i last took
  part (participation-interval weighting: a slow client's rarer update counts for the windows it missed, so fast
  clients do not dominate), normalised to sum to 1 (the mean delta, as FedBuff applies it). A client that is not
  done when the window closes keeps training into the next one; one that hands in twice in a window sends the
  sum of its deltas.

The global model is one flat state under unsplit-model names, each LoRA module once: a client's update covers
its client side and the blocks its trunk adapter runs for it on the server (``Federation.contribution``), so
clients with different cuts mix module by module; each tensor's weights are renormalised over the updates that
hold it. The global model keeps the largest client rank; a client of another rank is mixed in by its LoRA
product instead (``G <- fit(G, aggregate([G, L], [1 - w, w]))``, ``aggregate.py``), since factor deltas of
different ranks do not add.

For the driver, a round is an evaluation point: it ends once as many updates were handed in as there are
clients (a synchronous round's work), applied at once (``async``) or when their window closes (``semi_async``).
Between rounds the held-out loss is that of the global model, computed on an unsplit copy of the model (a
``CentralizedClient``) while the clients go on training; after the last round every client side and trunk
adapter takes the global model, so ``adapters/`` holds it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from splitlm.config import Config
from splitlm.config.schema import FrameworkConfig
from splitlm.errors import ConfigError
from splitlm.frameworks.aggregate import aggregate, fit, lora_pair
from splitlm.frameworks.centralized import CentralizedClient
from splitlm.frameworks.federation import Federation, Member
from splitlm.frameworks.setup import build_centralized, load_source
from splitlm.models.lowrank import learned_rank
from splitlm.peft import load_trainable_state, trainable_state

log = logging.getLogger(__name__)

State = dict[str, torch.Tensor]


@dataclass
class _Arrival:
    member: Member
    delta: State  # what the client's training changed (its own shapes)
    state: State  # what it holds now (for a rank that differs from the global model's)
    base: int  # the global version the client trained from


@dataclass
class AsyncStats:
    """What ``summary.json`` reports under ``aggregation``."""

    mode: str
    versions: int = 0
    handed_in: int = 0
    applied: int = 0
    dropped: int = 0
    superseded: int = 0  # semi_async: replaced by a later update of the same client in the same window
    staleness: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        stale = self.staleness
        return {
            "mode": self.mode, "versions": self.versions, "handed_in": self.handed_in, "applied": self.applied,
            "dropped": self.dropped, "superseded": self.superseded,
            "mean_staleness": sum(stale) / len(stale) if stale else 0.0, "max_staleness": max(stale, default=0),
        }  # fmt: skip


def staleness_weight(fw: FrameworkConfig, share: float, staleness: int) -> float | None:
    """async: the weight an update gets in ``G <- (1 - a) G + a L``, or None past ``max_staleness`` (dropped).
    ``share`` is the client's samples over the mean client's."""
    if staleness > fw.max_staleness:
        return None
    return min(1.0, fw.async_mix * share * (1.0 + staleness) ** -fw.staleness_exponent)


def window_weights(shares: list[float], missed: list[int]) -> list[float]:
    """semi_async: each arrival's weight, its share of the samples times the windows since it last took part,
    normalised to sum to 1."""
    weights = [share * max(count, 1) for share, count in zip(shares, missed, strict=True)]
    total = sum(weights)
    return [w / total for w in weights]


def apply_updates(
    global_state: State, updates: Sequence[tuple[State, State]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``G + sum_i w_i delta_i`` per tensor. ``updates`` are (delta, state) pairs; a tensor's weights are
    rescaled over the updates that hold it to the sum of all the weights. A LoRA pair whose shape differs from
    the global model's (another rank) is mixed in by its product instead: ``fit(G, aggregate([G, L], [1 - w, w]))``.
    Sums in float64; every tensor keeps the global model's dtype."""
    total = float(sum(weights))
    result = dict(global_state)
    for key, current in global_state.items():
        holders = [(delta, state, w) for (delta, state), w in zip(updates, weights, strict=True) if key in delta]
        held = sum(w for _, _, w in holders)
        if not holders or held <= 0:
            continue
        scale = total / held
        acc = current.detach().to("cpu", torch.float64)
        for delta, _, w in holders:
            if delta[key].shape == current.shape:
                acc = acc + delta[key].detach().to("cpu", torch.float64) * (w * scale)
        result[key] = acc.to(current.dtype)
    for (delta, state), w in zip(updates, weights, strict=True):  # other ranks: by their product
        mismatched = {k for k in delta if k in global_state and delta[k].shape != global_state[k].shape}
        for a_key in sorted(k for k in mismatched if (pair := lora_pair(k)) is not None and pair[0] == k):
            b_key = lora_pair(a_key)[1]  # type: ignore[index]
            mine = {a_key: result[a_key], b_key: result[b_key]}
            mixed = aggregate([mine, {a_key: state[a_key], b_key: state[b_key]}], [1.0 - min(w, 1.0), min(w, 1.0)])
            result.update(fit(mine, mixed))
    return result


def check(config: Config) -> None:
    """What the asynchronous modes need (sflv1's ``checks``)."""
    if config.framework.aggregation == "sync":
        return
    fw = config.framework
    problems = []
    if fw.clients_per_round and fw.clients_per_round < fw.num_clients:
        problems.append(f"framework.clients_per_round: {fw.aggregation} trains every client; set it to 0")
    if fw.leave_out:
        problems.append(f"framework.leave_out: {fw.aggregation} has no rounds to leave a client out of; unset it")
    methods = {part: config.lora.part(part).method for part in ("head", "trunk", "tail")}
    if any(method != "lora" for method in methods.values()):
        problems.append(f"lora: {fw.aggregation} aggregates LoRA adapters; set lora.<part>.method=lora (got {methods})")
    if learned_rank(config) is not None:
        problems.append(f"split.bottleneck: {fw.aggregation} does not aggregate learned bottlenecks; set it to 0")
    if problems:
        raise ConfigError("; ".join(problems))


class Continuous:
    """The clients' threads, the global model and its versions, across the driver's rounds."""

    def __init__(self, fed: Federation) -> None:
        self.fed = fed
        self.config = fed.config
        self.mode = fed.config.framework.aggregation
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
        fed, local = self.fed, fed_local_steps(self.fed)
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
        fw = self.config.framework
        with self.lock:
            self.stats.handed_in += 1
            if self.mode == "semi_async":  # a client's second update in a window adds to its first
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
            weight = staleness_weight(fw, self.weights[arrival.member.client_id] / mean, staleness)
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
        window = self.config.framework.round_window_s
        with self.lock:
            reached = lambda: self.stats.handed_in >= goal or self.finished or self.error is not None  # noqa: E731
            if self.mode == "async":
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


def fed_local_steps(fed: Federation) -> int:
    return max(fed.local_steps, 1)


def async_round(fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
    """One evaluation point of an asynchronous run: the clients train on regardless (sflv1's recipe for
    ``framework.aggregation`` async and semi_async)."""
    runner = fed.aggregation
    if runner is None:
        runner = fed.aggregation = Continuous(fed)
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
