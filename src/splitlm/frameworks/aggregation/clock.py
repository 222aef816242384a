"""``clock: steps``: the asynchronous strategies on a virtual clock, reproducibly (sflv1, sflv2, gsfl; in-process,
over gRPC, under Ray; resumable exactly).

The unit of asynchrony is what the framework trains as one piece: a client (sflv1, sflv2) or a group, whose
clients train one after another passing the client side on (gsfl). A unit's local round lasts ``local_steps x
speed`` on the clock, summed over its clients (``speed`` from ``framework.clients``, 1 by default), and the unit
never waits for another: when its round ends it hands its update in, takes the newest global model and starts its
next round. The updates are applied in the clock's order (ties: by unit), ``async`` at once and ``semi_async`` at
the end of each window of ``window_steps``; a unit's update is its training's delta from the global version it
took, so which version each unit trained from, how stale each update is and the order they are applied in are
fixed by the config, not by which thread happens to finish first. The units train one at a time, each when its
update is due, which gives every transport the same run, to the bit.

At the end of a driver's round (as many updates handed in as there are units; ``semi_async``: at the end of the
window that reached them) no unit is in the middle of its training, and the run is checkpointed with the clock, the
global model and its versions, the version each unit holds and the staleness bookkeeping (``save`` / ``load``), so
``--resume`` goes on exactly. The held-out loss of a round is that of the global model, through the first client;
after the last round every client side and trunk adapter takes the global model.
"""

from __future__ import annotations

import heapq
import json
import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from safetensors.torch import load_file, save_file

from splitlm.files import write_json
from splitlm.frameworks.aggregate import aggregate, block_index, contribution, fit
from splitlm.frameworks.aggregation.updates import AsyncStats, State, apply_updates, window_weights
from splitlm.frameworks.federation import Federation, Member

if TYPE_CHECKING:
    from splitlm.frameworks.aggregation.asynchronous import Asynchronous

log = logging.getLogger(__name__)


@dataclass
class Unit:
    """What the framework trains as one piece: one client, or a group passing its client side along."""

    index: int
    members: list[Member]
    duration: float  # clock time of one local round

    @property
    def name(self) -> str:
        return ",".join(m.client_id for m in self.members)


@dataclass
class _Update:
    unit: int
    delta: State
    state: State
    base: int  # the global version the unit trained from


def units_of(fed: Federation) -> list[Unit]:
    """The framework's units: its groups where it keeps one trunk adapter per group, else its clients."""
    config, steps = fed.config, max(fed.local_steps, 1)
    if fed.framework.trunk_adapters == "group":
        groups = [[fed.members[i] for i in group] for group in fed.groups]
    else:
        groups = [[m] for m in fed.members]
    return [
        Unit(index, group, float(sum(steps * config.client(m.index).speed for m in group)))
        for index, group in enumerate(groups)
    ]


def _plain(state: State) -> State:
    return {k: v.detach().contiguous().clone() for k, v in state.items()}


class Clocked:
    """The units, the global model and its versions, and the clock, across the driver's rounds."""

    def __init__(self, fed: Federation, strategy: Asynchronous, restored: Path | None = None) -> None:
        self.fed = fed
        self.strategy = strategy
        self.units = units_of(fed)
        self.weights = [float(sum(m.num_examples for m in u.members)) for u in self.units]
        self.window_length = strategy.window_steps(fed)
        self.stats = AsyncStats(strategy.name)
        self.pending: list[_Update] = []  # semi_async: the updates of the window now open
        self.last_window: dict[int, int] = {}  # semi_async: the window each unit last took part in
        self.window = 0  # semi_async: windows closed so far
        self.over = False
        if restored is not None:
            self._load(restored)
            return
        own = [self._contribution(u) for u in self.units]
        ranks = [max(fed.config.for_client(m.index).lora.rank for m in u.members) for u in self.units]
        template: State = {}  # each tensor at the largest rank among its holders (a LoRA pair from one holder)
        for position in sorted(range(len(own)), key=lambda i: -ranks[i]):
            for key, value in own[position].items():
                template.setdefault(key, value)
        self.global_state: State = fit(template, aggregate(own, self.weights))
        self.held: dict[int, tuple[int, State]] = {u.index: (0, self.global_state) for u in self.units}
        self.done: dict[int, int] = {u.index: 0 for u in self.units}  # local rounds handed in
        self.queue: list[tuple[float, int]] = [(u.duration, u.index) for u in self.units]
        heapq.heapify(self.queue)

    # --- a unit's state ------------------------------------------------------------------------------------

    def _contribution(self, unit: Unit) -> State:
        """What ``unit`` trained: its (last) client side and the blocks of its trunk adapter that are averaged."""
        fed, last = self.fed, unit.members[-1]
        if fed.framework.trunk_adapters != "group":
            return fed.contribution(last)
        trunk = fed.server.adapter_state(fed.server.adapter_of(last.client_id))
        blocks = {block_index(k) for k in trunk}
        return contribution(last.client.state(), trunk, blocks)

    def _give(self, members: list[Member], state: State) -> None:
        """``members``' client sides and their trunk adapters take ``state`` (the tensors of it they hold)."""
        server = self.fed.server
        for member in members:
            member.client.load_state(fit(member.client.state(), state))
        for adapter in dict.fromkeys(server.adapter_of(m.client_id) for m in members):
            current = server.adapter_state(adapter)
            shared = {k: v for k, v in current.items() if k in state}
            if shared:
                server.load_adapter_state(adapter, {**current, **fit(shared, state)})

    def _train(self, unit: Unit) -> _Update:
        """``unit``'s next local round from the global version it holds; its update."""
        version, state = self.held[unit.index]
        self._give(unit.members, state)
        base = self._contribution(unit)
        carry = None
        for member in unit.members:  # a group: one after another, passing the client side on
            if carry is not None:
                member.client.load_state(carry)
            member.train_round(self.fed, self.done[unit.index])
            carry = member.client.state()
        now = self._contribution(unit)
        return _Update(unit.index, {k: v - base[k] for k, v in now.items()}, now, version)

    # --- the clock -----------------------------------------------------------------------------------------

    def _window_end(self) -> float:
        return (self.window + 1) * self.window_length

    def _step(self) -> bool:
        """Process the clock's next event (an update due, or a window's end); False when none is left."""
        windowed = self.strategy.windowed
        if windowed and (self.pending or self.queue) and (not self.queue or self.queue[0][0] > self._window_end()):
            self._close_window()
            return True
        if not self.queue:
            return False
        when, index = heapq.heappop(self.queue)
        unit = self.units[index]
        update = self._train(unit)
        self.stats.handed_in += 1
        if windowed:
            earlier = next((u for u in self.pending if u.unit == index), None)
            if earlier is not None:  # a unit's second update in a window adds to its first
                earlier.delta = {k: v + update.delta[k] for k, v in earlier.delta.items()}
                earlier.state = update.state
                self.stats.superseded += 1
            else:
                self.pending.append(update)
        else:
            staleness = self.stats.versions - update.base
            self.stats.staleness.append(staleness)
            mean = sum(self.weights) / len(self.weights)
            weight = self.strategy.weigh(self.weights[index] / mean, staleness)
            if weight is None:
                self.stats.dropped += 1
                log.info("unit %s: update %d versions stale dropped", unit.name, staleness)
            else:
                self._apply([update], [weight])
        self.held[index] = (self.stats.versions, self.global_state)  # it takes the newest global model
        self.done[index] += 1
        if self.done[index] < self.fed.config.framework.rounds:
            heapq.heappush(self.queue, (when + unit.duration, index))
        return True

    def _apply(self, updates: list[_Update], weights: list[float]) -> None:
        self.global_state = apply_updates(self.global_state, [(u.delta, u.state) for u in updates], weights)
        self.stats.versions += 1
        self.stats.applied += len(updates)

    def _close_window(self) -> None:
        """semi_async: apply what arrived in the window that ends now."""
        self.window += 1
        updates, self.pending = self.pending, []
        if not updates:
            return
        total = sum(self.weights)
        shares, missed = [], []
        for update in updates:
            shares.append(self.weights[update.unit] / total)
            missed.append(self.window - self.last_window.get(update.unit, 0))
            self.last_window[update.unit] = self.window
            self.stats.staleness.append(self.stats.versions - update.base)
        self._apply(updates, window_weights(shares, missed))

    # --- the driver's rounds -------------------------------------------------------------------------------

    def run_round(self, round_index: int) -> list[Member]:
        """Until the round's evaluation point; the member that holds the global model for it. A round that fails
        (a networked client lost: the driver rolls the round back) leaves the clock where the round started."""
        saved = self._snapshot()
        try:
            return self._run_round(round_index)
        except BaseException:
            self._restore(saved)
            raise

    def _snapshot(self) -> dict[str, Any]:
        stats = replace(self.stats, staleness=list(self.stats.staleness))
        return {
            "global_state": self.global_state, "held": dict(self.held), "done": dict(self.done),
            "queue": list(self.queue), "pending": [replace(u) for u in self.pending], "window": self.window,
            "last_window": dict(self.last_window), "stats": stats,
        }  # fmt: skip

    def _restore(self, saved: dict[str, Any]) -> None:
        for name, value in saved.items():
            setattr(self, name, value)

    def _run_round(self, round_index: int) -> list[Member]:
        goal = (round_index + 1) * len(self.units)
        last = round_index + 1 >= self.fed.config.framework.rounds
        while True:
            closed = self.window
            if not self._step():
                break
            reached = self.stats.handed_in >= goal
            if reached and not last and (not self.strategy.windowed or self.window > closed):
                break
        if last:
            if self.pending:
                self._close_window()
            self._give(self.fed.members, self.global_state)
            self.over = True
        else:
            self._give(self.fed.members[:1], self.global_state)
        return [self.fed.members[0]]

    # --- checkpoints ---------------------------------------------------------------------------------------

    def save(self, folder: Path) -> None:
        """The clock, the global model, the version each unit holds and the bookkeeping (at a round's end: no
        update is pending)."""
        folder.mkdir(parents=True, exist_ok=True)
        save_file(_plain(self.global_state), str(folder / "global.safetensors"))
        versions = {}
        for version, state in self.held.values():
            versions.setdefault(version, state)
        for version, state in versions.items():
            save_file(_plain(state), str(folder / f"version-{version}.safetensors"))
        stats = self.stats
        write_json(folder / "state.json", {
            "strategy": self.strategy.name, "queue": sorted(self.queue), "done": self.done,
            "held": {str(k): v for k, (v, _) in self.held.items()}, "window": self.window,
            "last_window": self.last_window, "pending": len(self.pending),
            "stats": {"versions": stats.versions, "handed_in": stats.handed_in, "applied": stats.applied,
                      "dropped": stats.dropped, "superseded": stats.superseded, "staleness": stats.staleness},
        })  # fmt: skip

    def _load(self, folder: Path) -> None:
        saved: dict[str, Any] = json.loads((folder / "state.json").read_text())
        self.global_state = load_file(str(folder / "global.safetensors"))
        states: dict[int, State] = {}
        self.held = {}
        for key, version in saved["held"].items():
            if version not in states:
                states[version] = load_file(str(folder / f"version-{version}.safetensors"))
            self.held[int(key)] = (version, states[version])
        self.done = {int(k): int(v) for k, v in saved["done"].items()}
        self.queue = [(float(t), int(i)) for t, i in saved["queue"]]
        heapq.heapify(self.queue)
        self.window = int(saved["window"])
        self.last_window = {int(k): int(v) for k, v in saved["last_window"].items()}
        for name, value in saved["stats"].items():
            setattr(self.stats, name, value)


def clock_round(fed: Federation, strategy: Asynchronous, round_index: int) -> list[Member]:
    """One evaluation point of a ``clock: steps`` run."""
    runner = strategy.runner
    if runner is None:
        runner = strategy.runner = Clocked(fed, strategy, strategy.restored)
    assert isinstance(runner, Clocked)
    return runner.run_round(round_index)
