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

from splitlm.config import Config
from splitlm.data import DataOrder, Example, collate, label_histograms, make_partitioner, pack_examples, skew
from splitlm.errors import ConfigError
from splitlm.frameworks.loop import (
    _load_checkpoint,
    _save_checkpoint,
    _trim_metrics,
    _write_json,
    perplexity,
    prepare_output,
)
from splitlm.frameworks.setup import RunData, build_part, count_parameters, load_source, prepare_data, spec_of
from splitlm.models.split import share_tied_embeddings
from splitlm.peft import trainable_parameters
from splitlm.runtime.client import EvalStats, SplitClient
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server import SplitServer
from splitlm.transport import InProcessTransport

log = logging.getLogger(__name__)


@dataclass
class Member:
    """One client of the federation and its private data."""

    index: int
    client: SplitClient
    transport: InProcessTransport
    examples: list[Example]
    order: DataOrder
    histogram: dict[str, int]
    steps_done: int = 0
    tokens: int = 0
    last_loss: float = math.nan

    @property
    def client_id(self) -> str:
        return self.client.client_id


@dataclass
class Federation:
    config: Config
    server: SplitServer
    members: list[Member]
    data: RunData
    local_steps: int
    groups: list[list[int]] = field(default_factory=list)
    carry: dict[str, torch.Tensor] | None = None  # client-side weights passed along (sl, gsfl)
    metrics_file: Any = None
    _lock: threading.Lock = field(default_factory=threading.Lock)

    # --- the unit every recipe is made of: one client's local steps --------------------------------------

    def local_training(self, member: Member, round_index: int) -> None:
        train = self.config.train
        for _ in range(self.local_steps):
            step = member.steps_done
            micro = [
                collate(
                    [member.examples[i] for i in member.order.indices(step * train.grad_accum + m)], self.data.pad_id
                )
                for m in range(train.grad_accum)
            ]
            up0, down0 = member.transport.meter.snapshot()
            start = time.perf_counter()
            stats = member.client.train_step(step, micro)
            seconds = time.perf_counter() - start
            up1, down1 = member.transport.meter.snapshot()
            member.steps_done += 1
            member.tokens += stats.tokens
            member.last_loss = stats.loss
            self.log_step(
                {
                    "step": member.steps_done, "client": member.client_id, "round": round_index + 1,
                    "loss": stats.loss, "tokens": stats.tokens, "bytes_up": up1 - up0, "bytes_down": down1 - down0,
                    "seconds": seconds, "lr": stats.lr, "grad_norm": stats.grad_norm,
                }
            )  # fmt: skip

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
        return [float(len(m.examples)) for m in members]

    # --- the Learner-like surface the shared checkpoint helpers use --------------------------------------

    def traffic(self) -> tuple[int, int]:
        ups, downs = zip(*(m.transport.meter.snapshot() for m in self.members), strict=True)
        return sum(ups), sum(downs)

    def save(self, folder: Path, with_optimizer: bool) -> None:
        for member in self.members:
            member.client.save(folder / f"client-{member.client_id}", with_optimizer=with_optimizer)
        self.server.save(folder / "server", with_optimizer=with_optimizer)
        state = {m.client_id: {"steps_done": m.steps_done, "tokens": m.tokens} for m in self.members}
        _write_json(folder / "members.json", {"members": state, "carry": self.carry is not None})
        if self.carry is not None:
            from safetensors.torch import save_file

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
            from safetensors.torch import load_file

            self.carry = load_file(str(folder / "carry.safetensors"))

    # --- evaluation ---------------------------------------------------------------------------------------

    def evaluate(self, members: Sequence[Member]) -> tuple[EvalStats, dict[str, float]]:
        """Held-out loss through each given client's parts; the token-weighted total and per-client losses."""
        per_client: dict[str, float] = {}
        loss_sum, tokens = 0.0, 0
        for member in members:
            stats = member.client.evaluate(self.data.eval)
            per_client[member.client_id] = stats.loss
            loss_sum += stats.loss_sum
            tokens += stats.tokens
        return EvalStats(loss_sum, tokens), per_client

    def accuracy(self, member: Member) -> float | None:
        """For classification-style data: how often the true response scores best among the candidates."""
        if not self.data.choices:
            return None
        correct = 0
        for candidates, truth in self.data.choices:
            losses = member.client.sequence_losses(candidates, self.data.pad_id)
            correct += int(min(range(len(losses)), key=losses.__getitem__) == truth)
        return correct / len(self.data.choices)


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


def build_federation(config: Config) -> Federation:
    fw = config.framework
    source = load_source(config)
    spec = spec_of(config)
    data = prepare_data(config, source.tokenizer(), pack=False)  # partition rows by label first, then pack
    local_steps = fw.steps_per_round(config.train.steps)
    client_steps = fw.rounds * local_steps
    per_round = fw.clients_per_round or fw.num_clients

    labels = [e.label for e in data.train]
    options = {"alpha": config.data.alpha} if config.data.partition in ("dirichlet", "quantity") else {}
    partitioner = make_partitioner(config.data.partition, **options)
    parts = partitioner(labels, fw.num_clients, config.seed, sources=data.sources)
    histograms = label_histograms(parts, labels)
    log.info("partition %s, skew %.3f", config.data.partition, skew(parts, labels))

    # Server steps per adapter over the run decide the length of its learning-rate schedule.
    shared_by = {"sl": per_round, "sflv2": per_round, "psl": 1, "sflv1": 1}
    groups = assign_groups(config, histograms) if fw.name == "gsfl" else []
    sharing = max((len(g) for g in groups), default=1) if fw.name == "gsfl" else shared_by[fw.name]
    clients_on_adapter = {"sl": per_round, "sflv2": per_round, "psl": per_round, "sflv1": 1}.get(
        fw.name, max((len(g) for g in groups), default=1)
    )
    scale = {"none": 1.0, "linear": float(clients_on_adapter), "sqrt": math.sqrt(clients_on_adapter)}[
        fw.server_lr_scale
    ]
    server_train = config.train.model_copy(update={"steps": client_steps * sharing})
    trunk, trunk_stage = build_part(config, source, "trunk")
    server = SplitServer(
        trunk, trunk_stage, spec.mode, lambda params: PartyOptimizer(params, server_train, lr_scale=scale),
        config.seed, config.server.policy,
    )  # fmt: skip
    client_train = config.train.model_copy(update={"steps": client_steps})
    members = []
    for index, indices in enumerate(parts):
        client_id = str(index)
        transport = InProcessTransport(server.submit)
        client_parts, stages = {}, {}
        for role in spec.client_roles():
            client_parts[role], stages[role] = build_part(config, source, role)
        if "tail" in stages:
            share_tied_embeddings(stages["head"], stages["tail"])
        params = [p for part in client_parts.values() for p in trainable_parameters(part)]
        client = SplitClient(
            client_id, client_parts, stages, transport, PartyOptimizer(params, client_train), spec.mode
        )
        examples = [data.train[i] for i in indices]
        if config.data.pack:
            examples = pack_examples(examples, config.train.seq_len)
        order = DataOrder(len(examples), config.train.batch_size, config.seed)  # same data, same order
        members.append(Member(index, client, transport, examples, order, histograms[index]))
        adapter = {"sflv1": f"client-{index}", "gsfl": None}.get(fw.name, "default")
        if fw.name == "gsfl":
            adapter = next(f"group-{g}" for g, group in enumerate(groups) if index in group)
        server.assign(client_id, adapter)
        log.info("client %s: %d examples, labels %s", client_id, len(examples), histograms[index])
    return Federation(config, server, members, data, local_steps, groups)


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
    out = prepare_output(config, resume)
    fed = build_federation(config)
    metrics_path, rounds_path = out / "metrics.jsonl", out / "rounds.jsonl"
    progress: dict[str, Any] = {"step": 0, "wall_seconds": 0.0, "bytes_up": 0, "bytes_down": 0}
    if resume:
        progress = _load_checkpoint(out, fed)
        _trim_metrics(metrics_path, progress["step"], key="round")
        _trim_metrics(rounds_path, progress["step"], key="round")
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
                _save_checkpoint(out, fed, round_index + 1, progress)
    finally:
        fed.server.stop()
        fed.metrics_file = None
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
        "client_param_count": count_parameters(*fed.members[0].client.parts.values()),
        "server_param_count": count_parameters(fed.server.trunk),
        "server_adapters": fed.server.bank.names if fed.server.bank else [],
        "groups": fed.groups or None,
        "clients": [
            {
                "client": m.client_id,
                "examples": len(m.examples),
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
    }
    _write_json(out / "summary.json", summary)
    return summary


def check_supported(config: Config) -> None:
    if config.framework.name in ("sflv1", "gsfl") and config.lora.part("trunk").method != "lora":
        raise ConfigError(
            f"framework.name={config.framework.name} keeps one trunk adapter per tenant: set lora.trunk.method=lora"
        )
