"""Clients and one server: the members a framework's recipe orders, and the one step loop they all run.

A ``Federation`` holds one server (one frozen base trunk, adapters in an ``AdapterBank``) and N members, each
a client with its own head [+ tail], optimizer, private slice of the data and channel to the server. A
single-client run is a federation of one; the centralized baseline is a federation of one whose client
holds the unsplit model and no server. ``build_parties`` is the one place a run's parties are built, wherever
they are placed (in this process, served over gRPC, as Ray actors, or one client of a run served elsewhere);
``Member.train_round`` is the one step loop (in-process, and inside each networked or Ray client too).
"""

from __future__ import annotations

import functools
import itertools
import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Protocol

import torch
from safetensors.torch import load_file, save_file

from splitlm import progress
from splitlm.config import Config
from splitlm.data import (
    Batch,
    DataOrder,
    Example,
    collate,
    eval_batches,
    label_histograms,
    make_partitioner,
    pack_examples,
    shorten,
    skew,
)
from splitlm.errors import ClientGone, ClientsFlagged, ConfigError, Interrupted, ProtocolError
from splitlm.files import write_json
from splitlm.frameworks.aggregate import contribution, fedavg, fit
from splitlm.frameworks.base import Framework, client_steps, framework_of, networked_problems
from splitlm.frameworks.checkpoint import TMP_PREFIX
from splitlm.frameworks.grouping import GROUPINGS, SELECTIONS
from splitlm.frameworks.pipeline import (
    ClientPipeline,
    client_attacks,
    client_link,
    client_pipeline,
    recorders,
    server_mods,
)
from splitlm.frameworks.setup import (
    Choice,
    RunData,
    block_layout,
    build_part,
    choice_of,
    count_parameters,
    load_source,
    mixed_clients,
    prepare_data,
    spec_of,
)
from splitlm.frameworks.sketch import client_sketches
from splitlm.models import ModelSource
from splitlm.models.split import share_tied_embeddings
from splitlm.peft import trainable_parameters
from splitlm.privacy.client_attack import ClientAttack
from splitlm.privacy.guards import Guard, build_guards
from splitlm.privacy.tap import ServerTap, TruthRecorder
from splitlm.remedies import ClientSetup, Remedy, RoundRows, build_remedies
from splitlm.runtime.client import EvalStats, SplitClient, StepStats
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.schedule import pipelined, serial
from splitlm.runtime.server import MergedPasses, ServerSurface, SplitServer
from splitlm.transport import ByteMeter, Channel, Handler, InProcessTransport, Mod, Transport, server_chain
from splitlm.transport.link import EmulatedLink

log = logging.getLogger(__name__)


class Client(Protocol):
    """What a member's client does: the split client, the centralized baseline, or a proxy of a remote one."""

    client_id: str

    @property
    def meter(self) -> ByteMeter: ...

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats: ...

    def evaluate(self, batches: list[Batch]) -> EvalStats: ...

    def sequence_losses(self, examples: list[Example], pad_id: int) -> list[float]: ...

    def state(self) -> dict[str, torch.Tensor]: ...

    def load_state(self, state: dict[str, torch.Tensor]) -> None: ...

    def save(self, folder: Path, with_optimizer: bool = True) -> None: ...

    def load(self, folder: Path) -> None: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...


@dataclass
class Member:
    """One client of the federation and its private data."""

    index: int
    client: Client
    examples: list[Example]
    order: DataOrder | None
    histogram: dict[str, int]
    pipeline: ClientPipeline | None = None  # None where the client's mods run elsewhere (a remote client)
    steps_done: int = 0
    tokens: int = 0
    last_loss: float = math.nan
    stale: bool = False  # missed a broadcast (a networked client that dropped out): resync before it trains
    round_goal: int | None = None  # ``steps_done`` at which the round in progress ends (kept across a resume)
    held_out: list[Batch] = field(default_factory=list)  # data.client_eval_size: its own held-out examples
    choices: list[Choice] = field(default_factory=list)  # the same, as choices (classification-style data)
    # sequential frameworks with data.client_eval_size: (round index, position in the round's sequence, loss and
    # accuracy on ``held_out`` of the client side it passed on) right after it trained, for the round's forgetting
    fresh: tuple[int, int, float, float | None] | None = None
    # what each remedy keeps for this member (``Remedy.member_state``, e.g. a personalized client side),
    # by remedy name; snapshotted, checkpointed and restored with the member
    remedy_state: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)

    @property
    def client_id(self) -> str:
        return self.client.client_id

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    @property
    def meter(self) -> ByteMeter:
        return self.client.meter

    def info(self) -> dict[str, Any]:
        """Parameter counts and layer ranges of this client (and, where known here, the server)."""
        parts = list(getattr(self.client, "parts", {}).values())
        stages = getattr(self.client, "stages", {})
        return {
            "client_param_count": count_parameters(*parts),
            "client_trainable_param_count": sum(p.numel() for m in parts for p in trainable_parameters(m)),
            "head_layers": stages["head"].layer_indices if "head" in stages else [],
            "tail_layers": stages["tail"].layer_indices if "tail" in stages else [],
        }

    def train_round(self, fed: Federation, round_index: int) -> None:
        """This client's local steps of one round, each through the whole split pipeline (the one step loop)."""
        if self.order is None:
            raise ProtocolError(f"client {self.client_id} has no data here")
        if self.round_goal is None:
            self.round_goal = self.steps_done + fed.local_steps
        train = fed.config.train
        start = self.round_goal - fed.local_steps  # the steps before this round
        rows = RoundRows(self.client_id, fed.config.seed, self.order, start, train.grad_accum)
        while self.steps_done < self.round_goal:
            fed.check_stop()
            step = self.steps_done
            batches = [self.order.indices(step * train.grad_accum + m) for m in range(train.grad_accum)]
            for remedy in fed.remedies:  # e.g. some rows from the examples of earlier rounds
                batches = remedy.batches(rows, step, batches)
            micro = [
                collate([self.examples[i] for i in rows], fed.pad_id)
                for batch in batches
                for rows in split_rows(batch, train.pipeline.micro_batches)
            ]
            up0, down0 = self.meter.snapshot()
            comm0 = link_seconds(self.client)
            started = time.perf_counter()
            stats = self.client.train_step(step, micro)
            seconds = time.perf_counter() - started
            up1, down1 = self.meter.snapshot()
            self.steps_done += 1
            self.tokens += stats.tokens
            self.last_loss = stats.loss
            record = {
                "step": self.steps_done, "client": self.client_id, "round": round_index + 1,
                "loss": stats.loss, "tokens": stats.tokens, "bytes_up": up1 - up0, "bytes_down": down1 - down0,
                "comm_seconds": link_seconds(self.client) - comm0,
                "seconds": seconds, "lr": stats.lr, "grad_norm": stats.grad_norm,
                **getattr(stats, "metrics", {}),
                "epoch": self.order.epoch(self.steps_done * train.grad_accum),
            }  # fmt: skip
            fed.on_step(self, record)
        self.round_goal = None

    def ready(self, fed: Federation, deadline: float, rejoin: bool = True) -> bool:
        """Whether this client can work now (a client in this process always can). A networked client is waited
        for until ``deadline`` (``time.monotonic``); one that restarted rejoins first, unless ``rejoin=False``
        (then it does not count as ready)."""
        return True

    def snapshot(self) -> dict[str, Any]:
        fields = {"steps_done": self.steps_done, "tokens": self.tokens, "last_loss": self.last_loss}
        remedies = dict(self.remedy_state)  # each remedy's state is replaced, never changed in place
        return {
            "client": self.client.snapshot(), "round_goal": self.round_goal, "stale": self.stale,
            "remedies": remedies, **fields,
        }  # fmt: skip

    def restore(self, snapshot: dict[str, Any], gone: bool = False) -> None:
        """Back to ``snapshot`` (``gone``: the client was lost; a client in this process is restored all the
        same, a remote one rejoins later from its own checkpoint)."""
        self.client.restore(snapshot["client"])
        self.stale = snapshot["stale"]
        self.remedy_state = dict(snapshot.get("remedies", {}))
        self.restore_progress(snapshot)

    def restore_progress(self, snapshot: dict[str, Any]) -> None:
        """The step count, tokens, last loss and round goal of ``snapshot`` (not the client's weights)."""
        self.steps_done, self.tokens, self.last_loss = snapshot["steps_done"], snapshot["tokens"], snapshot["last_loss"]
        self.round_goal = snapshot["round_goal"]

    def accuracy(self, fed: Federation, choices: list[Choice] | None = None) -> float | None:
        """For classification-style data: how often the true response scores best among the candidates, on the
        global held-out set's ``choices`` (default) or on ``choices`` (e.g. a client's own ones)."""
        if choices is None:
            choices = fed.data.choices if fed.data is not None else []
        if not choices:
            return None
        picks = self.predictions(fed, choices)
        return sum(pick == truth for pick, (_, truth) in zip(picks, choices, strict=True)) / len(choices)

    def predictions(self, fed: Federation, choices: list[Choice]) -> list[int]:
        """For each of ``choices``, the index of the candidate this client's model scores best (lowest loss)."""
        picks: list[int] = []
        per_call = max(fed.config.train.batch_size // len(choices[0][0]), 1) if choices else 1  # scored together
        for start in range(0, len(choices), per_call):
            group = choices[start : start + per_call]
            losses = self.client.sequence_losses([e for candidates, _ in group for e in candidates], fed.pad_id)
            for candidates, _ in group:
                mine, losses = losses[: len(candidates)], losses[len(candidates) :]
                picks.append(min(range(len(mine)), key=mine.__getitem__))
        return picks

    def evaluate(self, fed: Federation) -> EvalStats:
        return self.client.evaluate(fed.data.eval if fed.data is not None else [])

    def evaluate_on(self, other: Member) -> EvalStats:
        """Held-out loss of this client's model (its parts and trunk adapter) on ``other``'s own held-out set."""
        return self.client.evaluate(other.held_out)

    def personal_scores(self, fed: Federation) -> tuple[float, float | None] | None:
        """Loss and accuracy on its own held-out set of its personalized model, where a remedy gives it one
        (``Remedy.personal``, e.g. an early exit); None otherwise, or before it trained."""
        for remedy in fed.remedies:
            personal = remedy.personal(self.client, self.remedy_state.get(remedy.name))
            if personal is not None:
                with personal:
                    return self.evaluate_on(self).loss, self.accuracy(fed, self.choices) if self.choices else None
        return None

    def held_out_scores(
        self, fed: Federation, state: dict[str, torch.Tensor] | None = None
    ) -> tuple[float, float | None]:
        """Loss and (classification-style data) accuracy on this client's own held-out set of its client side, or
        of ``state`` loaded for this evaluation only (the client keeps the state it trained)."""
        own = self.client.state() if state is not None else None
        if state is not None:
            self.client.load_state(fed.fitted(self, state))
        try:
            return self.evaluate_on(self).loss, self.accuracy(fed, self.choices) if self.choices else None
        finally:
            if own is not None:
                self.client.load_state(own)


def link_seconds(client: Client) -> float:
    """Seconds ``client``'s messages spent on its emulated link so far (``transport.link``; 0.0 without one)."""
    link = getattr(getattr(client, "channel", None), "transport", None)
    return link.seconds() if isinstance(link, EmulatedLink) else 0.0


StepHook = Callable[[Member, dict[str, Any]], None]


@dataclass
class RoundSnapshot:
    server: Any
    members: dict[str, dict[str, Any]]
    carry: dict[str, torch.Tensor] | None
    carry_from: str | None


def _no_hook(member: Member, record: dict[str, Any]) -> None:
    pass


@dataclass
class Federation:
    config: Config
    framework: Framework
    server: ServerSurface | None  # a SplitServer, a proxy of a remote one, or None (the unsplit baseline)
    members: list[Member]
    data: RunData | None  # None on a networked server: the clients hold the data
    local_steps: int
    groups: list[list[int]] = field(default_factory=list)
    carry: dict[str, torch.Tensor] | None = None  # client-side weights passed along (sl, gsfl)
    carry_from: str | None = None  # the client whose state ``carry`` is
    tap: ServerTap | None = None  # in-process runs with privacy.tap.enabled: what the server received
    truth: TruthRecorder | None = None  # ... and the clients' true tokens of those batches (audit)
    server_mods: list[Mod] = field(default_factory=list)  # around the server's handler, from the wire inwards
    handler: Handler | None = None  # the server's queue inside its mods: what a transport to this server delivers to
    templates: dict[str, dict[str, torch.Tensor]] = field(default_factory=dict)  # client -> its state's shapes (meta)
    rollback_hooks: list[Callable[[], None]] = field(default_factory=list)  # e.g. forget the answered requests' cache
    last_checkpoint: str | None = None  # the newest checkpoint's name (a client that rejoins restores it)
    on_step: StepHook = _no_hook  # called after every client step with its metrics record (the driver's)
    stop: threading.Event = field(default_factory=threading.Event)

    def check_stop(self) -> None:
        if self.stop.is_set():
            raise Interrupted("training interrupted")

    # --- the unit every recipe is made of: one client's local steps --------------------------------------

    def local_training(self, member: Member, round_index: int) -> None:
        if member.stale and self.carry is not None and self.carry_from != member.client_id:
            member.client.load_state(self.fitted(member, self.carry))
        member.stale = False
        before = self.watched_parts(member)
        start = member.steps_done
        member.train_round(self, round_index)
        if self.guards and self.server is not None:  # the guards see the change of the parts this client trained
            after = self.watched_parts(member)
            for guard in self.guards:
                shown = guard.watches()
                guard.trained(
                    round_index,
                    member.client_id,
                    {p: before[p] for p in shown},
                    {p: after[p] for p in shown},
                    member.steps_done - start,
                )
        for remedy in self.remedies:  # e.g. its own client side, before any aggregation
            state = remedy.member_state(member.client, member.remedy_state.get(remedy.name))
            if state is not None:
                member.remedy_state[remedy.name] = state

    def watched_parts(self, member: Member) -> dict[str, dict[str, torch.Tensor]]:
        """The parts of ``member`` the guards watch (``privacy.guards.base.PARTS``), as the server holds them now:
        its trunk adapter, and its client side (asked of the client: a networked one sends it) when a guard watches
        that; nothing without guards."""
        watched = {part for guard in self.guards for part in guard.watches()}
        if not watched or self.server is None:
            return {}
        parts = {}
        if "trunk" in watched:
            parts["trunk"] = self.server.adapter_state(self.server.adapter_of(member.client_id))
        if "client_side" in watched:  # a copy: an in-process client's state is its live tensors
            parts["client_side"] = {k: v.detach().clone() for k, v in member.client.state().items()}
        return parts

    def train_clients(self, members: Sequence[Member], round_index: int, parallel: bool) -> list[Member]:
        """Each member's local steps, at once or one after another. A client that is lost meanwhile stops the
        round (``ClientGone``): the driver rolls it back and does it again without that client."""
        self.hold_global(members)
        if parallel:
            self.parallel([lambda m=m: self.local_training(m, round_index) for m in members])
        else:
            for member in members:
                self.local_training(member, round_index)
        return sorted(members, key=lambda m: m.index)

    def open_round(self, round_index: int, members: Sequence[Member]) -> None:
        """An attempt at round ``round_index`` over ``members`` starts: the guards forget a rolled-back attempt."""
        for guard in self.guards:
            guard.open_round(round_index, [m.client_id for m in members])

    def check_round(self, round_index: int) -> None:
        """After the round's training: ``ClientsFlagged`` with the clients the guards flag (the driver rolls the round
        back and does it again without them)."""
        flagged: dict[str, str] = {}
        for guard in self.guards:
            for client, why in guard.check(round_index).items():
                flagged.setdefault(client, why)
        if flagged:
            raise ClientsFlagged(sorted(flagged, key=lambda c: (len(c), c)), "; ".join(dict.fromkeys(flagged.values())))

    def check_quorum(self, members: Sequence[Member], chosen: int, round_index: int) -> None:
        """Fewer than ``framework.min_clients`` of the round's ``chosen`` clients left is an error."""
        minimum = min(self.config.framework.min_clients, chosen)
        if len(members) < minimum:
            raise ProtocolError(
                f"round {round_index + 1}: only {len(members)} of {chosen} clients are left, fewer than "
                f"framework.min_clients={minimum}"
            )

    def pass_on(self, member: Member) -> None:
        """Make ``member``'s client side the one the next client starts from (sequential recipes)."""
        self.carry, self.carry_from = member.client.state(), member.client_id

    def hold_global(self, members: Sequence[Member]) -> None:
        """``framework.aggregation_lr`` other than 1 steps the global client side from the one the round started
        from, the last broadcast (``carry``). Before the first broadcast, make the client side ``members`` start
        from that global one (their FedAvg: every client starts from the same weights). Checkpoints keep it and a
        rolled-back round restores it, as any carry; with the default learning rate nothing is held."""
        if self.carry is not None or not members or self.framework.global_lr(self.config, self.groups) == 1.0:
            return
        self.carry, self.carry_from = fedavg([m.client.state() for m in members], self.weights(members)), None

    def broadcast(self, state: dict[str, torch.Tensor]) -> None:
        """Give every client the global client side; one that cannot be reached gets it before it next trains."""
        self.carry, self.carry_from = state, None
        for member in self.members:
            try:
                member.client.load_state(self.fitted(member, state))
            except ProtocolError as error:
                member.stale = True
                log.warning("client %s missed the new client side (%s)", member.client_id, error)

    def fitted(self, member: Member, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """``state`` as ``member`` can load it: with clients of different cuts or LoRA ranks, the aggregate fitted
        to the member's own tensors (``aggregate.fit``; their shapes are asked once); otherwise as it is."""
        if not self.mixed:
            return state
        like = self.templates.get(member.client_id)
        if like is None:
            like = {k: torch.empty(v.shape, dtype=v.dtype, device="meta") for k, v in member.client.state().items()}
            self.templates[member.client_id] = like
        return fit(like, state)

    def contribution(self, member: Member) -> dict[str, torch.Tensor]:
        """What ``member`` trained, for ``aggregate``: its client side, and from its trunk adapter the blocks its cut
        leaves to the server (a per-client adapter), or of those only the ones other clients run in their head or
        tail (one shared adapter: the blocks every client leaves to it need no averaging)."""
        own = self.framework.trunk_adapters == "client"
        on_server, on_clients = self.trunk_blocks
        blocks = on_server[member.index] if own else on_server[member.index] & on_clients
        trunk = self.server.adapter_state(self.server.adapter_of(member.client_id)) if blocks or own else {}
        return contribution(member.client.state(), trunk, blocks, block_layout(self.config).block_of, blockless=own)

    # The config does not change once the federation is built: what follows from it is worked out once.

    @functools.cached_property
    def remedies(self) -> list[Remedy]:
        """The config's remedies (``remedies``), whose hooks the step loop and the recipes call."""
        return build_remedies(self.config)

    @functools.cached_property
    def guards(self) -> list[Guard]:
        """The config's server-side guards (``privacy.guards``), which watch each client's change to its trunk adapter
        (``local_training``) and may flag clients at the end of a round (``check_round``)."""
        return build_guards(self.config.privacy.guards, self.config)

    @functools.cached_property
    def strategy(self) -> Any:
        """The aggregation strategy (``framework.aggregation``; ``aggregation/``), with what it holds across rounds."""
        from splitlm.frameworks.aggregation import strategy_of

        return strategy_of(self.config)

    @functools.cached_property
    def mixed(self) -> bool:
        """Whether the clients differ in cut or LoRA rank (``framework.clients``)."""
        return mixed_clients(self.config)

    @functools.cached_property
    def trunk_blocks(self) -> tuple[dict[int, set[int]], set[int]]:
        """Each member's blocks on the server (by index), and the blocks some client runs itself."""
        layout = block_layout(self.config)
        on_server = {m.index: set(layout.trunk_blocks(self.config, m.index)) for m in self.members}
        return on_server, set(range(layout.total)) - set.intersection(*on_server.values())

    def parallel(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run tasks on threads (clients working at once against the one server).

        When one task fails, the server forgets the others' half-done work, so none waits forever at a step
        barrier for a client that stopped. Clients lost meanwhile are reported together (``ClientGone``), and
        the other tasks' failures that follow from them are not errors of their own."""
        if len(tasks) == 1:
            tasks[0]()
            return
        with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="splitlm-client") as pool:
            futures = [pool.submit(task) for task in tasks]
            done, _ = wait(futures, return_when=FIRST_EXCEPTION)
            if any(f.exception() is not None for f in done):
                self.stop_barriers()
            errors = [error for f in futures if (error := f.exception()) is not None]
        if errors and self.stop.is_set():  # the others' errors follow from the stop
            raise Interrupted("training interrupted")
        gone = [error for error in errors if isinstance(error, ClientGone)]
        if gone:
            raise ClientGone(sorted({c for e in gone for c in e.client_ids}), "; ".join(e.reason for e in gone))
        if errors:
            raise errors[0]

    def stop_barriers(self) -> None:
        """Release clients waiting at a step barrier, now or later in this round (their step fails)."""
        if self.server is not None:
            self.server.abandon()

    def weights(self, members: Sequence[Member]) -> list[float]:
        return [float(m.num_examples) for m in members]

    # --- who takes part ------------------------------------------------------------------------------------

    def available(self, members: Sequence[Member], round_index: int) -> list[Member]:
        """The round's members that can work now: a networked client that is not connected is waited for up to
        ``framework.wait_for_clients_s`` (together), then left out; one that restarted rejoins first."""
        deadline = time.monotonic() + self.config.framework.wait_for_clients_s
        ready = [m for m in members if m.ready(self, deadline)]
        for member in members:
            if member not in ready:
                log.warning("round %d: client %s is not connected; it is left out", round_index + 1, member.client_id)
        return ready

    def reachable(self, holders: list[Member], members: Sequence[Member]) -> list[Member]:
        """``holders`` that still answer; when the one holder of the global client side is gone, another
        member that received it stands in."""
        alive = [m for m in holders if m.ready(self, time.monotonic(), rejoin=False)]
        if alive or len(holders) > 1:
            return alive or holders
        stand_in = [m for m in members if not m.stale and m.ready(self, time.monotonic(), rejoin=False)]
        return stand_in[:1] or holders

    # --- a round as a transaction: snapshot, and roll back when clients are lost ---------------------------

    @property
    def can_fail(self) -> bool:
        """Whether a client can be lost mid-round (clients in other processes); then rounds are snapshotted."""
        return any(getattr(m.client, "can_fail", False) for m in self.members)

    def snapshot(self, members: Sequence[Member]) -> RoundSnapshot:
        """Everything a round of ``members`` may change: the server's adapters and optimizers, each member's
        client side, optimizer and progress, and the client side being passed along."""
        server = self.server.snapshot() if self.server is not None else None
        return RoundSnapshot(server, {m.client_id: m.snapshot() for m in members}, self.carry, self.carry_from)

    def rollback(self, snapshot: RoundSnapshot, lost: Sequence[str]) -> list[str]:
        """Back to ``snapshot``. A lost remote client's process is gone or restarted: it rejoins later (from its
        checkpoint, then the current client side) instead. Returns the lost clients, with any lost meanwhile."""
        lost = list(lost)
        if self.server is not None:
            self.server.restore(snapshot.server)
        for member in self.members:
            if member.client_id not in snapshot.members:
                continue
            saved = snapshot.members[member.client_id]
            try:
                member.restore(saved, gone=member.client_id in lost)
            except ClientGone:
                lost.append(member.client_id)
                member.restore(saved, gone=True)
        self.carry, self.carry_from = snapshot.carry, snapshot.carry_from
        for hook in self.rollback_hooks:
            hook()
        return lost

    # --- traffic, state -----------------------------------------------------------------------------------

    def traffic(self) -> tuple[int, int]:
        """Training bytes (up, down) of every client so far in this process."""
        return _sum_pairs(m.meter.snapshot() for m in self.members)

    def eval_traffic(self) -> tuple[int, int]:
        return _sum_pairs(m.meter.eval_snapshot() for m in self.members)

    def control_traffic(self) -> tuple[int, int]:
        """Bytes (up, down) of the commands that drive remote clients and their answers (0 in this process)."""
        return _sum_pairs(m.meter.control_snapshot() for m in self.members)

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        for member in self.members:
            try:
                member.client.save(folder / f"client-{member.client_id}", with_optimizer=with_optimizer)
            except ClientGone as gone:  # it restores an older checkpoint of its own when it rejoins
                name = folder.name.removeprefix(TMP_PREFIX)
                log.warning("client %s misses checkpoint %s (%s)", member.client_id, name, gone.reason)
        if self.server is not None:
            self.server.save(folder / "server", with_optimizer=with_optimizer)
        state = {
            m.client_id: {"steps_done": m.steps_done, "tokens": m.tokens, "round_goal": m.round_goal}
            for m in self.members
        }
        write_json(
            folder / "members.json", {"members": state, "carry": self.carry is not None, "carry_from": self.carry_from}
        )
        if self.carry is not None:
            save_file(self.carry, str(folder / "carry.safetensors"))
        for member in self.members:
            if member.remedy_state:
                tensors = {f"{name}/{k}": v for name, state in member.remedy_state.items() for k, v in state.items()}
                (folder / "remedies").mkdir(exist_ok=True)
                save_file(tensors, str(folder / "remedies" / f"client-{member.client_id}.safetensors"))
        self.strategy.save(self, folder)
        if self.guards:
            write_json(folder / "guards.json", {guard.name: guard.state() for guard in self.guards})

    def load(self, folder: Path) -> None:
        for member in self.members:
            member.client.load(folder / f"client-{member.client_id}")
        if self.server is not None:
            self.server.load(folder / "server")
        state = json.loads((folder / "members.json").read_text())
        for member in self.members:
            saved = state["members"][member.client_id]
            member.steps_done, member.tokens = int(saved["steps_done"]), int(saved["tokens"])
            member.round_goal = None if saved.get("round_goal") is None else int(saved["round_goal"])
        self.carry_from = state.get("carry_from")
        if state["carry"]:
            self.carry = load_file(str(folder / "carry.safetensors"))
        for member in self.members:
            path = folder / "remedies" / f"client-{member.client_id}.safetensors"
            member.remedy_state = {}
            for key, tensor in (load_file(str(path)) if path.is_file() else {}).items():
                name, _, rest = key.partition("/")
                member.remedy_state.setdefault(name, {})[rest] = tensor
        self.strategy.load(self, folder)
        guards = json.loads((folder / "guards.json").read_text()) if (folder / "guards.json").is_file() else {}
        for guard in self.guards:
            guard.load_state(guards.get(guard.name, {}))

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, members: Sequence[Member]) -> tuple[EvalStats, dict[str, float]]:
        """Held-out loss through each given client's parts; the token-weighted total and per-client losses."""
        per_client: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0
        for member in members:
            stats = member.evaluate(self)
            per_client[member.client_id] = stats.loss
            loss_sum += stats.loss_sum
            tokens += stats.tokens
        return EvalStats(loss_sum, tokens), per_client

    @property
    def pad_id(self) -> int:
        return self.data.pad_id if self.data is not None else 0


def _sum_pairs(pairs: Iterable[tuple[int, int]]) -> tuple[int, int]:
    ups, downs = 0, 0
    for up, down in pairs:
        ups, downs = ups + up, downs + down
    return ups, downs


# --- building ----------------------------------------------------------------------------------------------


Sketches = Callable[[], list[list[float]]]  # computes every client's smashed-data sketch (``sketch.py``)


def assign_groups(
    config: Config, histograms: list[dict[str, int]], sketches: Sketches | None = None
) -> list[list[int]]:
    """Client groups (a framework with one trunk adapter per group): explicit ``framework.groups``, else
    ``framework.num_groups`` groups as ``framework.grouping`` forms them (``grouping.GROUPINGS``) from the clients'
    label histograms (by default CSFL's k-means, so clients of similar label mix share a trunk adapter) or, for a
    grouping that needs them (feature_hash), from the sketches ``sketches()`` computes."""
    if config.framework.groups:
        return [list(g) for g in config.framework.groups]
    grouping = GROUPINGS.get(config.framework.grouping)
    if grouping.needs == "histograms":
        return grouping(histograms, config.framework.num_groups, config.seed)
    if sketches is None:
        raise ConfigError(
            f"framework.grouping={config.framework.grouping} groups by smashed-data sketches, computed in-process "
            "only; set framework.groups or a grouping by labels (label_kmeans, balanced)"
        )
    return grouping(sketches(), config.framework.num_groups, config.seed)


def groups_of(
    config: Config, framework: Framework, histograms: list[dict[str, int]], sketches: Sketches | None = None
) -> list[list[int]]:
    return assign_groups(config, histograms, sketches) if framework.trunk_adapters == "group" else []


def partition(config: Config, framework: Framework, data: RunData) -> tuple[list[list[int]], list[dict[str, int]]]:
    """Each client's example indices and label histogram (the same on every machine for the same config).

    The unsplit baseline trains one model on everyone's data: one share holding every example."""
    labels = [e.label for e in data.train]
    if not framework.split:
        everything = [list(range(len(labels)))]
        return everything, label_histograms(everything, labels)
    options = {"alpha": config.data.alpha} if config.data.partition in ("dirichlet", "quantity") else {}
    parts = make_partitioner(config.data.partition, **options)(
        labels, config.framework.num_clients, config.seed, sources=data.sources
    )
    log.info("partition %s, skew %.3f", config.data.partition, skew(parts, labels))
    return parts, label_histograms(parts, labels)


def make_server(config: Config, framework: Framework, source: ModelSource, groups: list[list[int]]) -> SplitServer:
    """The trunk and its adapter bank; each trunk adapter's schedule spans the steps the framework gives it.

    ``framework.merge`` K: the server merges the forwards of the clients at a barrier, K at a time. A shared
    adapter with no barrier of its own (sflv2) then trains its clients K at a time behind one: one trunk step per
    step of K clients, so its schedule spans a K-th of the steps (rounded up)."""
    fw = config.framework
    steps = framework.server_steps(config, groups)
    if fw.merge > 1 and not framework.barrier and framework.trunk_adapters == "shared":
        steps = client_steps(config) * math.ceil(framework.sharing(config, groups) / fw.merge)
    server_train = config.train.model_copy(update={"steps": steps})
    scale = framework.trunk_lr_scale(config, groups)
    trunk, trunk_stage = build_part(config, source, "trunk")
    serving = config.server
    offload = Path(serving.offload_dir) if serving.offload_dir else Path(config.output_dir) / "offload"
    return SplitServer(
        trunk, trunk_stage, spec_of(config).mode,
        lambda params: PartyOptimizer(params, server_train, lr_scale=scale), config.seed, serving.policy,
        max_resident_adapters=serving.max_resident_adapters,
        offload_dir=offload if serving.max_resident_adapters or serving.offload_dir else None,
        max_pending=serving.max_pending, mods=[MergedPasses(fw.merge, fw.merge_max_tokens)] if fw.merge > 1 else [],
    )  # fmt: skip


def route(config: Config, framework: Framework, server: SplitServer, index: int, groups: list[list[int]]) -> None:
    """Give client ``index`` its trunk adapter (as the framework lays them out; one of its own has its LoRA rank)
    and its cut."""
    own = config.for_client(index)
    rank = own.lora.part("trunk").rank if framework.trunk_adapters == "client" else None
    server.assign(str(index), framework.adapter_of(index, groups), spec_of(own), rank)


def split_rows(rows: list[int], parts: int) -> list[list[int]]:
    """``rows`` cut into ``parts`` contiguous micro-batches as even as possible (the first ones one row longer);
    never an empty one."""
    parts = max(1, min(parts, len(rows)))
    size, extra = divmod(len(rows), parts)
    bounds = [0]
    for index in range(parts):
        bounds.append(bounds[-1] + size + (index < extra))
    return [rows[a:b] for a, b in itertools.pairwise(bounds)]


def build_client(
    config: Config,
    framework: Framework,
    source: ModelSource,
    index: int,
    transport: Transport | None,
    truth: TruthRecorder | None = None,
    examples: list[Example] | None = None,
    attacks: list[ClientAttack] | None = None,
) -> tuple[Client, ClientPipeline | None]:
    """Client ``index``: its head [+ tail] and optimizer behind its pipeline of mods and plugins (or, for the
    unsplit baseline, the whole model), as ``config.for_client(index)`` says (its cut, LoRA rank and link);
    ``examples``: its training examples, for the remedies' plugins that learn from them; ``attacks``: what makes it
    malicious (``pipeline.client_attacks``)."""
    config = config.for_client(index)
    optimizer_train = config.train.model_copy(update={"steps": client_steps(config)})
    if framework.make_client is not None:  # a framework with its own kind of client (the unsplit baseline)
        return framework.make_client(config, source, optimizer_train), None
    spec = spec_of(config)
    parts, stages = {}, {}
    for role in spec.client_roles():
        parts[role], stages[role] = build_part(config, source, role)
    if "tail" in stages:
        share_tied_embeddings(stages["head"], stages["tail"])
    params = [p for part in parts.values() for p in trainable_parameters(part)]
    if transport is None:
        raise ProtocolError(f"client {index} has no transport to the server")
    setup = ClientSetup(str(index), config, parts, stages, examples or [])
    pipeline = client_pipeline(config, source, stages["head"], truth, setup, attacks)
    channel = Channel(client_link(config, transport, str(index)), pipeline.mods)  # each client its own link
    pipelining = config.train.pipeline
    client = SplitClient(
        str(index),
        parts,
        stages,
        channel,
        PartyOptimizer(params, optimizer_train),
        spec.mode,
        pipeline.plugins,
        schedule=pipelined if pipelining.micro_batches > 1 and pipelining.overlap else serial,
        seed=config.seed,
    )
    return client, pipeline


def build_member(
    config: Config,
    framework: Framework,
    source: ModelSource,
    data: RunData,
    index: int,
    indices: list[int],
    histogram: dict[str, int],
    transport: Transport | None,
    truth: TruthRecorder | None = None,
) -> Member:
    """Client ``index`` with its private share of the training data (packed per client when ``data.pack``); a
    malicious client (``privacy.client_attack``) trains on its rows as its attacks rewrite them (its held-out
    examples stay as they are)."""
    examples, held_out = hold_out(config, index, [data.train[i] for i in indices])
    attacks = client_attacks(config, source, index, data.responses)
    for attack in attacks:
        examples = attack.examples(examples)
    # classification-style data: its held-out examples as choices among the responses, for its own accuracy
    seq_len = config.train.seq_len
    choices = [c for e in held_out if (c := choice_of(e, data.responses, seq_len)) is not None]
    held_out = [shorten(e, seq_len) for e in held_out]  # like the global held-out set (a response stays whole)
    if config.data.pack:
        examples = pack_examples(examples, config.train.seq_len)
    client, pipeline = build_client(config, framework, source, index, transport, truth, examples, attacks)
    order = DataOrder(len(examples), config.train.batch_size, config.seed)  # same data, same order
    log.info("client %s: %d examples, labels %s", index, len(examples), histogram)
    batches = eval_batches(held_out, config.train.batch_size, data.pad_id) if held_out else []
    return Member(index, client, examples, order, histogram, pipeline, held_out=batches, choices=choices)


def hold_out(config: Config, index: int, examples: list[Example]) -> tuple[list[Example], list[Example]]:
    """Client ``index``'s ``examples`` split into (training, held-out): ``data.client_eval_size`` of them, drawn by
    a seeded choice (the same on every machine for the same config), held out before packing so that no token of
    them is trained on; they measure the model on this client's own distribution. Held-out ones come as they
    are (with ``data.pack``, untruncated): the caller cuts them to ``train.seq_len`` like the global held-out set."""
    size = config.data.client_eval_size
    if size == 0:
        return examples, []
    if len(examples) < size + 1:
        raise ConfigError(
            f"data.client_eval_size={size}: client {index} has only {len(examples)} examples and keeps none to train "
            f"on; lower data.client_eval_size below {len(examples)}"
        )
    chosen = set(random.Random(f"client_eval/{config.seed}/{index}").sample(range(len(examples)), size))
    held = [e for i, e in enumerate(examples) if i in chosen]
    return [e for i, e in enumerate(examples) if i not in chosen], held


Placement = Literal["inprocess", "serve", "ray", "agent"]
"""Where a run's parties are: all in this process (``splitlm train``); the server here and each client in a process
of its own (``splitlm serve``); the server and each client in Ray actors, driven from here (``transport.name=ray``);
one client here and the server elsewhere (``splitlm client``, a Ray client actor)."""


def placement_problems(config: Config, framework: Framework, placement: Placement) -> list[str]:
    """What ``config`` cannot do with its parties placed so (besides the framework's own checks)."""
    problems = []
    if placement in ("serve", "ray") and not framework.split:
        instead = "use `splitlm train`" if placement == "serve" else "set transport.name=inprocess"
        problems.append(f"framework.name={framework.name} runs in one process; {instead}")
    if placement == "ray" and config.privacy.tap.enabled:
        problems.append(
            "privacy.tap records in-process and `splitlm serve` runs, not Ray's: set transport.name=inprocess"
        )
    if placement == "serve":
        problems += networked_problems(config)
    grouping = GROUPINGS.get(config.framework.grouping)
    by_sketches = framework.trunk_adapters == "group" and not config.framework.groups and grouping.needs != "histograms"
    if placement == "serve" and by_sketches:
        problems.append(
            f"framework.grouping={config.framework.grouping}: the clients' smashed-data sketches are computed "
            "in-process (`splitlm train`); for `splitlm serve` set framework.groups or a grouping by labels "
            "(label_kmeans)"
        )
    return problems


def check_placement(config: Config, placement: Placement) -> Framework:
    """The run's framework, once ``config`` passed its checks and ``placement``'s (``ConfigError`` with every
    problem found). A client of a run served elsewhere (``agent``) checks nothing: the server checked the run."""
    framework = framework_of(config)
    if placement != "agent":
        framework.check(config)
        problems = placement_problems(config, framework, placement)
        if problems:
            raise ConfigError("; ".join(problems))
    return framework


@dataclass
class Hosted:
    """The trunk's server, its mods and the handler they make around its queue (what a transport delivers to)."""

    server: SplitServer
    mods: list[Mod]
    handler: Handler


def host(
    config: Config,
    framework: Framework,
    source: ModelSource,
    groups: list[list[int]],
    clients: Sequence[int] = (),
    tap: ServerTap | None = None,
) -> Hosted:
    """The server side of a run (here, or in Ray's server actor): the trunk and its adapter bank, each of ``clients``
    routed to its trunk adapter and cut, and the server's mods around its queue (``tap`` records what it receives)."""
    server = make_server(config, framework, source, groups)
    for index in clients:
        route(config, framework, server, index, groups)
    mods = server_mods(config, source, server.stage, tap)
    return Hosted(server, mods, server_chain(mods, server.submit))


def build_parties(
    config: Config,
    placement: Placement = "inprocess",
    *,
    members: Sequence[Member] = (),
    remote_server: Callable[[list[list[int]]], Any] | None = None,
    source: ModelSource | None = None,
    client: int = 0,
    transport: Transport | None = None,
) -> Federation:
    """Every party of a run, placed as ``placement`` says, and the federation of them: the one place a run's parties
    are built (``check_placement``, groups, the server with its mods, each client routed to its trunk adapter).

    - ``inprocess``: the server and every client (each with its mods) in this process, an in-process transport
      between them, the server tap's recorders where ``privacy.tap`` asks;
    - ``serve``: the server here (``Federation.handler``: what the gRPC server delivers to); ``members``: the
      connected clients' remote members;
    - ``ray``: ``members`` are the client actors' remote members; ``remote_server(groups)`` hosts the server in its
      actor (``host``) and returns its proxy;
    - ``agent``: client ``client`` alone with its data and parts, ``transport`` its way to the server elsewhere.
    """
    progress.show(config.train.progress)
    framework = check_placement(config, placement)
    server: Any = None  # SplitServer, a proxy of Ray's server actor, or None (the unsplit baseline, a client alone)
    hosted: Hosted | None = None
    data: RunData | None = None  # None where the clients are elsewhere: they hold the data
    groups: list[list[int]] = []
    tap, truth = None, None
    if placement in ("inprocess", "agent"):
        with progress.phase(f"loading the model {config.model.name} and the data {config.data.name}"):
            source = source or load_source(config)
            data = prepare_data(config, source.tokenizer(), pack=False)  # partition rows by label first, then pack
            parts, histograms = partition(config, framework, data)
    with progress.phase("building the parts"):
        if placement == "agent":
            # A networked client with the tap on keeps the truth of its latest micro-batches (``finish`` writes them)
            # for ``splitlm audit SERVER_RUN --client-dir CLIENT_RUN`` to score the server tap's records against.
            truth = recorders(config, 1)[1]
            member = build_member(
                config, framework, source, data, client, parts[client], histograms[client], transport, truth
            )
            members = [member]
        elif placement == "inprocess":
            groups = groups_of(config, framework, histograms, lambda: client_sketches(config, source, data, parts))
            tap, truth = recorders(config, len(parts))
            hosted = host(config, framework, source, groups, tap=tap) if framework.split else None
            transport = InProcessTransport(hosted.handler) if hosted is not None else None
            members = []
            for index, indices in enumerate(parts):
                members.append(
                    build_member(config, framework, source, data, index, indices, histograms[index], transport, truth)
                )
                if hosted is not None:
                    route(config, framework, hosted.server, index, groups)
            if (
                hosted is not None
                and not hosted.server.trainable
                and not any(m.client.optimizer.params for m in members)
            ):
                raise ConfigError("nothing to train: lora.head, lora.trunk and lora.tail are all frozen")
        else:  # the clients are elsewhere: ``members`` were built from their hellos
            groups = groups_of(config, framework, [m.histogram for m in members])
            if remote_server is not None:
                server = remote_server(groups)
            else:  # ``splitlm serve``: the tap records what the server receives, as in-process
                tap = recorders(config, len(members))[0]
                hosted = host(config, framework, source or load_source(config), groups, range(len(members)), tap=tap)
    if hosted is not None:
        server = hosted.server
    steps = config.framework.steps_per_round(config.train.steps)
    return Federation(
        config, framework, server, list(members), data, steps, groups, tap=tap, truth=truth,
        server_mods=hosted.mods if hosted is not None else [], handler=hosted.handler if hosted is not None else None,
    )  # fmt: skip


def build_federation(config: Config) -> Federation:
    """Every party of an in-process run (``build_parties(config, "inprocess")``)."""
    return build_parties(config, "inprocess")


def participants(config: Config, members: list[Member], round_index: int) -> list[Member]:
    """The round's clients: all, or ``framework.clients_per_round`` of them as ``framework.selection`` picks them
    (``grouping.SELECTIONS``: random, or PairingFL's most diverse label mix), minus ``framework.leave_out``'s."""
    per_round = config.framework.clients_per_round or len(members)
    chosen = list(members)
    if per_round < len(members):
        select = SELECTIONS.get(config.framework.selection)
        picked = select([m.histogram for m in members], per_round, round_index, config.seed)
        chosen = sorted((members[i] for i in picked), key=lambda m: m.index)
    left_out = set((config.framework.leave_out or {}).get(round_index + 1, []))
    return [m for m in chosen if m.client_id not in left_out]
