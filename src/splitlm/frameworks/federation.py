"""Many clients, one server: the shared machinery of the multi-client frameworks.

A ``Federation`` holds one server (one frozen base trunk, adapters in an ``AdapterBank``) and N clients,
each with its own head [+ tail], optimizer, private slice of the data and transport. A framework is a
*round recipe* (see ``recipes.py``) that orders the clients' local steps and the aggregation; ``run_rounds``
drives the rounds: sampling participants, evaluation, checkpoints at round boundaries, metrics, summary.

Files written besides those of a single-client run: ``rounds.jsonl`` (one object per round: held-out loss
and perplexity, accuracy for classification-style data, per-client results, traffic).
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from splitlm.config import Config
from splitlm.data import DataOrder, Example, collate, label_histograms, make_partitioner, pack_examples, skew
from splitlm.errors import ConfigError, ProtocolError
from splitlm.frameworks.loop import (
    load_checkpoint,
    perplexity,
    prepare_output,
    save_checkpoint,
    trim_metrics,
    write_json,
)
from splitlm.frameworks.setup import (
    RunData,
    build_part,
    client_defenses,
    client_guard,
    count_parameters,
    load_source,
    prepare_data,
    spec_of,
)
from splitlm.models import ModelSource
from splitlm.models.split import share_tied_embeddings
from splitlm.peft import trainable_parameters
from splitlm.privacy.accounting import epsilon, releases
from splitlm.privacy.tap import ServerTap, TruthRecorder
from splitlm.runtime.client import EvalStats, SplitClient
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server import SplitServer
from splitlm.transport import InProcessTransport, Transport

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One client of the federation and its private data."""

    index: int
    client: SplitClient
    transport: Transport  # anything with a byte meter: in-process, gRPC
    examples: list[Example]
    order: DataOrder
    histogram: dict[str, int]
    steps_done: int = 0
    tokens: int = 0
    last_loss: float = math.nan
    stale: bool = False  # missed a broadcast (a networked client that dropped out): resync before it trains

    @property
    def client_id(self) -> str:
        return self.client.client_id

    @property
    def num_examples(self) -> int:
        return len(self.examples)

    def client_param_count(self) -> int:
        return count_parameters(*self.client.parts.values())

    def train_round(self, fed: Federation, round_index: int) -> None:
        """This client's local steps of one round, each through the whole split pipeline."""
        train = fed.config.train
        for _ in range(fed.local_steps):
            step = self.steps_done
            micro = [
                collate([self.examples[i] for i in self.order.indices(step * train.grad_accum + m)], fed.pad_id)
                for m in range(train.grad_accum)
            ]
            up0, down0 = self.transport.meter.snapshot()
            start = time.perf_counter()
            stats = self.client.train_step(step, micro)
            seconds = time.perf_counter() - start
            up1, down1 = self.transport.meter.snapshot()
            self.steps_done += 1
            self.tokens += stats.tokens
            self.last_loss = stats.loss
            fed.log_step(
                {
                    "step": self.steps_done, "client": self.client_id, "round": round_index + 1,
                    "loss": stats.loss, "tokens": stats.tokens, "bytes_up": up1 - up0, "bytes_down": down1 - down0,
                    "seconds": seconds, "lr": stats.lr, "grad_norm": stats.grad_norm,
                }
            )  # fmt: skip

    def accuracy(self, fed: Federation) -> float | None:
        """For classification-style data: how often the true response scores best among the candidates."""
        if fed.data is None or not fed.data.choices:
            return None
        correct = 0
        for candidates, truth in fed.data.choices:
            losses = self.client.sequence_losses(candidates, fed.pad_id)
            correct += int(min(range(len(losses)), key=losses.__getitem__) == truth)
        return correct / len(fed.data.choices)


@dataclass
class Federation:
    config: Config
    server: SplitServer
    members: list[Member]
    data: RunData | None  # None on a networked server: the clients hold the data
    local_steps: int
    groups: list[list[int]] = field(default_factory=list)
    carry: dict[str, torch.Tensor] | None = None  # client-side weights passed along (sl, gsfl)
    metrics_file: Any = None
    tap: ServerTap | None = None  # in-process runs with privacy.tap.enabled: what the server received
    truth: TruthRecorder | None = None  # ... and the clients' true tokens of those batches (audit)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the unit every recipe is made of: one client's local steps --------------------------------------

    def local_training(self, member: Member, round_index: int) -> None:
        if member.stale and self.carry is not None:
            member.client.load_state(self.carry)
        member.stale = False
        member.train_round(self, round_index)

    def train_clients(self, members: Sequence[Member], round_index: int, parallel: bool) -> list[Member]:
        """Each member's local steps (at once, or one after another); a networked client that drops out or
        times out is left out of the round. Returns those that finished; fewer than
        ``framework.min_clients`` is an error."""
        finished: list[Member] = []

        def attempt(member: Member) -> None:
            if self.try_training(member, round_index):
                finished.append(member)

        if parallel:
            self.parallel([lambda m=m: attempt(m) for m in members])
        else:
            for member in members:
                attempt(member)
        self.check_quorum(finished, members, round_index)
        return sorted(finished, key=lambda m: m.index)

    def try_training(self, member: Member, round_index: int) -> bool:
        """``local_training``, but a client that drops out (a ``ProtocolError``) is logged and left out."""
        try:
            self.local_training(member, round_index)
            return True
        except ProtocolError as error:
            member.stale = True
            log.warning("round %d: client %s left out (%s)", round_index + 1, member.client_id, error)
            return False

    def check_quorum(self, finished: Sequence[Member], members: Sequence[Member], round_index: int) -> None:
        minimum = min(self.config.framework.min_clients, len(members))
        if len(finished) < minimum:
            raise ProtocolError(
                f"round {round_index + 1}: only {len(finished)} of {len(members)} clients finished, fewer than "
                f"framework.min_clients={minimum}"
            )

    def broadcast(self, state: dict[str, torch.Tensor]) -> None:
        """Give every client the global client side; one that cannot be reached is resynced later."""
        self.carry = state
        for member in self.members:
            try:
                member.client.load_state(state)
            except ProtocolError as error:
                member.stale = True
                log.warning("client %s missed the new client side (%s)", member.client_id, error)

    def log_step(self, record: dict[str, Any]) -> None:
        with self._lock:
            if self.metrics_file is not None:
                self.metrics_file.write(json.dumps(record) + "\n")
                self.metrics_file.flush()

    def parallel(self, tasks: Sequence[Callable[[], None]]) -> None:
        """Run tasks on threads (clients working at once against the one server); re-raise the first error."""
        if len(tasks) == 1:
            tasks[0]()
            return
        with ThreadPoolExecutor(max_workers=len(tasks), thread_name_prefix="splitlm-client") as pool:
            for future in [pool.submit(task) for task in tasks]:
                future.result()

    def weights(self, members: Sequence[Member]) -> list[float]:
        return [float(m.num_examples) for m in members]

    # --- the Learner-like surface the shared checkpoint helpers use --------------------------------------

    def traffic(self) -> tuple[int, int]:
        ups, downs = zip(*(m.transport.meter.snapshot() for m in self.members), strict=True)
        return sum(ups), sum(downs)

    def save(self, folder: Path, with_optimizer: bool) -> None:
        for member in self.members:
            member.client.save(folder / f"client-{member.client_id}", with_optimizer=with_optimizer)
        self.server.save(folder / "server", with_optimizer=with_optimizer)
        state = {m.client_id: {"steps_done": m.steps_done, "tokens": m.tokens} for m in self.members}
        write_json(folder / "members.json", {"members": state, "carry": self.carry is not None})
        if self.carry is not None:
            save_file(self.carry, str(folder / "carry.safetensors"))

    def load(self, folder: Path) -> None:
        for member in self.members:
            member.client.load(folder / f"client-{member.client_id}")
        self.server.load(folder / "server")
        state = json.loads((folder / "members.json").read_text())
        for member in self.members:
            member.steps_done = int(state["members"][member.client_id]["steps_done"])
            member.tokens = int(state["members"][member.client_id]["tokens"])
        if state["carry"]:
            self.carry = load_file(str(folder / "carry.safetensors"))

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, members: Sequence[Member]) -> tuple[EvalStats, dict[str, float]]:
        """Held-out loss through each given client's parts; the token-weighted total and per-client losses."""
        per_client: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0
        for member in members:
            stats = member.client.evaluate(self.data.eval if self.data is not None else [])
            per_client[member.client_id] = stats.loss
            loss_sum += stats.loss_sum
            tokens += stats.tokens
        return EvalStats(loss_sum, tokens), per_client

    def accuracy(self, member: Member) -> float | None:
        return member.accuracy(self)

    @property
    def pad_id(self) -> int:
        return self.data.pad_id if self.data is not None else 0


def assign_groups(config: Config, histograms: list[dict[str, int]]) -> list[list[int]]:
    """gsfl groups: explicit ``framework.groups``, else clients clustered by label distribution."""
    if config.framework.groups:
        return [list(g) for g in config.framework.groups]
    count = min(config.framework.num_groups, len(histograms))
    labels = sorted({label for h in histograms for label in h})
    vectors = []
    for h in histograms:
        total = sum(h.values()) or 1
        vectors.append([h.get(label, 0) / total for label in labels])
    # Sort clients by their share of the first label and cut the order into `count` contiguous groups, so
    # that clients with similar label mixes train together (deterministic; exact for two-label data).
    ordered = sorted(range(len(vectors)), key=lambda i: (vectors[i][0] if vectors[i] else 0.0, i))
    return [sorted(ordered[g * len(ordered) // count : (g + 1) * len(ordered) // count]) for g in range(count)]


def partition(config: Config, data: RunData) -> tuple[list[list[int]], list[dict[str, int]]]:
    """Each client's example indices and label histogram (the same on every machine for the same config)."""
    labels = [e.label for e in data.train]
    options = {"alpha": config.data.alpha} if config.data.partition in ("dirichlet", "quantity") else {}
    parts = make_partitioner(config.data.partition, **options)(
        labels, config.framework.num_clients, config.seed, sources=data.sources
    )
    log.info("partition %s, skew %.3f", config.data.partition, skew(parts, labels))
    return parts, label_histograms(parts, labels)


def client_steps(config: Config) -> int:
    """Optimizer steps of one client over the run (its learning-rate schedule's length)."""
    return config.framework.rounds * config.framework.steps_per_round(config.train.steps)


def make_server(config: Config, source: ModelSource, groups: list[list[int]]) -> SplitServer:
    fw = config.framework
    per_round = fw.clients_per_round or fw.num_clients
    # How many clients feed one trunk adapter, and how many optimizer steps it takes per client step: psl
    # updates once per synchronised step and sflv1 gives each client its own adapter; in sl, sflv2 and gsfl
    # every client step is a step of the shared (group) adapter. That fixes the server schedule's length.
    sharing = {"sflv1": 1, "gsfl": max((len(g) for g in groups), default=1)}.get(fw.name, per_round)
    server_steps = client_steps(config) * (1 if fw.name in ("psl", "sflv1") else sharing)
    scale = {"none": 1.0, "linear": float(sharing), "sqrt": math.sqrt(sharing)}[fw.server_lr_scale]
    server_train = config.train.model_copy(update={"steps": server_steps})
    trunk, trunk_stage = build_part(config, source, "trunk")
    return SplitServer(
        trunk, trunk_stage, spec_of(config).mode,
        lambda params: PartyOptimizer(params, server_train, lr_scale=scale), config.seed, config.server.policy,
    )  # fmt: skip


def route(config: Config, server: SplitServer, index: int, groups: list[list[int]]) -> None:
    """Give client ``index`` its trunk adapter: its own (sflv1), its group's (gsfl) or the shared one."""
    if config.framework.name == "sflv1":
        adapter = f"client-{index}"
    elif config.framework.name == "gsfl":
        adapter = next(f"group-{g}" for g, group in enumerate(groups) if index in group)
    else:
        adapter = "default"
    server.assign(str(index), adapter)


def make_member(
    config: Config,
    source: ModelSource,
    data: RunData,
    index: int,
    indices: list[int],
    histogram: dict[str, int],
    transport: Transport,
) -> Member:
    """Client ``index`` with its head [+ tail], optimizer and private share of the training data."""
    spec = spec_of(config)
    client_parts, stages = {}, {}
    for role in spec.client_roles():
        client_parts[role], stages[role] = build_part(config, source, role)
    if "tail" in stages:
        share_tied_embeddings(stages["head"], stages["tail"])
    params = [p for part in client_parts.values() for p in trainable_parameters(part)]
    optimizer = PartyOptimizer(params, config.train.model_copy(update={"steps": client_steps(config)}))
    client = SplitClient(
        str(index), client_parts, stages, transport, optimizer, spec.mode,
        defense=client_defenses(config, source, stages["head"]), guard=client_guard(config, stages["head"]),
    )  # fmt: skip
    examples = [data.train[i] for i in indices]
    if config.data.pack:
        examples = pack_examples(examples, config.train.seq_len)
    order = DataOrder(len(examples), config.train.batch_size, config.seed)  # same data, same order
    log.info("client %s: %d examples, labels %s", index, len(examples), histogram)
    return Member(index, client, transport, examples, order, histogram)


def build_federation(config: Config) -> Federation:
    source = load_source(config)
    data = prepare_data(config, source.tokenizer(), pack=False)  # partition rows by label first, then pack
    parts, histograms = partition(config, data)
    groups = assign_groups(config, histograms) if config.framework.name == "gsfl" else []
    server = make_server(config, source, groups)
    tap = ServerTap(server.submit, config.privacy.tap.max_batches) if config.privacy.tap.enabled else None
    truth = TruthRecorder(2 * config.privacy.tap.max_batches * len(parts)) if tap is not None else None
    members = []
    for index, indices in enumerate(parts):
        transport = InProcessTransport(tap or server.submit)
        member = make_member(config, source, data, index, indices, histograms[index], transport)
        member.client.truth = truth
        members.append(member)
        route(config, server, index, groups)
    steps = config.framework.steps_per_round(config.train.steps)
    return Federation(config, server, members, data, steps, groups, tap=tap, truth=truth)


def participants(config: Config, members: list[Member], round_index: int) -> list[Member]:
    per_round = config.framework.clients_per_round or len(members)
    if per_round >= len(members):
        return list(members)
    rng = random.Random(config.seed * 7919 + round_index)
    return sorted(rng.sample(members, per_round), key=lambda m: m.index)


RoundRecipe = Callable[[Federation, int, list[Member]], list[Member]]


def run_rounds(config: Config, recipe: RoundRecipe, resume: bool = False) -> dict[str, Any]:
    """Drive ``recipe`` for ``framework.rounds`` rounds; the recipe returns the members holding the global
    client-side model after its aggregation (one member), or every member that keeps its own (psl)."""
    if config.transport.name == "ray":
        from splitlm.runtime.ray_sim import run_ray

        return run_ray(config, recipe, resume)
    out = prepare_output(config, resume)
    return drive_rounds(config, build_federation(config), recipe, out, resume)


def drive_rounds(config: Config, fed: Federation, recipe: RoundRecipe, out: Path, resume: bool) -> dict[str, Any]:
    metrics_path, rounds_path = out / "metrics.jsonl", out / "rounds.jsonl"
    progress: dict[str, Any] = {"step": 0, "wall_seconds": 0.0, "bytes_up": 0, "bytes_down": 0}
    if resume:
        progress = load_checkpoint(out, fed)
        trim_metrics(metrics_path, progress["step"], key="round")
        trim_metrics(rounds_path, progress["step"], key="round")
    else:
        torch.manual_seed(config.seed)
        before, _ = fed.evaluate(fed.members[:1])
        progress.update(eval_loss_before=before.loss, accuracy_before=fed.accuracy(fed.members[0]))
    start_round = int(progress["step"])
    up_before, down_before = int(progress["bytes_up"]), int(progress["bytes_down"])
    wall_before, started = float(progress["wall_seconds"]), time.perf_counter()
    fed.server.start()
    holders: list[Member] = fed.members[:1]
    try:
        with metrics_path.open("a") as metrics, rounds_path.open("a") as rounds_file:
            fed.metrics_file = metrics
            for round_index in range(start_round, config.framework.rounds):
                chosen = participants(config, fed.members, round_index)
                holders = recipe(fed, round_index, chosen)
                result, per_client = fed.evaluate(holders)
                up, down = fed.traffic()
                progress.update(
                    bytes_up=up_before + up, bytes_down=down_before + down,
                    wall_seconds=wall_before + time.perf_counter() - started,
                )  # fmt: skip
                record = {
                    "round": round_index + 1, "participants": [m.client_id for m in chosen],
                    "eval_loss": result.loss, "eval_ppl": perplexity(result.loss),
                    "accuracy": fed.accuracy(holders[0]) if len(holders) == 1 else None,
                    "per_client_eval_loss": per_client if len(holders) > 1 else None,
                    "bytes_up": progress["bytes_up"], "bytes_down": progress["bytes_down"],
                    "wall_seconds": progress["wall_seconds"],
                }  # fmt: skip
                rounds_file.write(json.dumps(record) + "\n")
                rounds_file.flush()
                progress["eval_loss_after"] = result.loss
                progress["accuracy_after"] = record["accuracy"]
                progress["per_client_eval_loss"] = per_client
                save_checkpoint(out, fed, round_index + 1, progress)
    finally:
        fed.server.stop()
        fed.metrics_file = None
    if fed.tap is not None:
        keys = fed.tap.write(out)
        if fed.truth is not None:
            fed.truth.write(out, keys)
    adapters = out / "adapters"
    adapters.mkdir(exist_ok=True)
    # The model `generate` / `export` rebuild: the global client side (psl: the first client's) and the trunk
    # adapter it was trained with.
    holders[0].client.save(adapters, with_optimizer=False)
    fed.server.export_adapter(fed.server.adapter_of(holders[0].client_id), adapters / "trunk.safetensors")
    summary = {
        "framework": config.framework.name,
        "split_mode": config.split.mode,
        "model": config.model.name,
        "num_clients": config.framework.num_clients,
        "rounds": config.framework.rounds,
        "local_steps": fed.local_steps,
        "partition": config.data.partition,
        "steps": sum(m.steps_done for m in fed.members),
        "tokens": sum(m.tokens for m in fed.members),
        "eval_loss_before": progress["eval_loss_before"],
        "eval_loss_after": progress["eval_loss_after"],
        "eval_ppl_before": perplexity(progress["eval_loss_before"]),
        "eval_ppl_after": perplexity(progress["eval_loss_after"]),
        "accuracy_before": progress.get("accuracy_before"),
        "accuracy_after": progress.get("accuracy_after"),
        "bytes_up": progress["bytes_up"],
        "bytes_down": progress["bytes_down"],
        "wall_seconds": progress["wall_seconds"],
        "client_param_count": fed.members[0].client_param_count(),
        "server_param_count": fed.server.param_count,
        "server_adapters": fed.server.bank.names if fed.server.bank else [],
        "groups": fed.groups or None,
        "clients": [
            {
                "client": m.client_id,
                "examples": m.num_examples,
                "label_histogram": m.histogram,
                "steps": m.steps_done,
                "tokens": m.tokens,
                "last_loss": m.last_loss,
                "bytes_up": m.transport.meter.up,
                "bytes_down": m.transport.meter.down,
                "eval_loss": (progress.get("per_client_eval_loss") or {}).get(m.client_id),
            }
            for m in fed.members
        ],
        "privacy": federation_privacy(config, fed.members),
    }
    write_json(out / "summary.json", summary)
    return summary


def federation_privacy(config: Config, members: Sequence[Member]) -> dict[str, Any]:
    """The defenses every client ran and the largest epsilon among the clients (each sends its own data).

    A networked or Ray server holds proxies of clients whose defenses run elsewhere: its epsilon is null.
    """
    values = []
    for m in members:
        chain = getattr(m.client, "defense", None)
        count = releases(m.steps_done, config.train.batch_size, config.train.grad_accum, max(m.num_examples, 1))
        values.append(None if chain is None else epsilon(chain.dp_events(), count, config.privacy.delta))
    known = [v for v in values if v is not None]
    return {
        "defenses": list(config.privacy.defenses),
        "epsilon": max(known) if known and len(known) == len(values) else None,
        "delta": config.privacy.delta,
        "alarm_step": None,
    }


def check_supported(config: Config) -> None:
    if config.privacy.server_attack != "none":
        raise ConfigError(
            f"privacy.server_attack={config.privacy.server_attack} is simulated for one in-process sl client: set "
            "framework.name=sl, framework.num_clients=1, framework.rounds=1 and transport.name=inprocess"
        )
    if config.privacy.tap.enabled and config.transport.name != "inprocess":
        raise ConfigError("privacy.tap records in-process runs only: set transport.name=inprocess")
    if config.framework.name in ("sflv1", "gsfl") and config.lora.part("trunk").method != "lora":
        raise ConfigError(
            f"framework.name={config.framework.name} keeps one trunk adapter per tenant: set lora.trunk.method=lora"
        )
