"""``sl``: sequential split learning. With one client, the 11-step pipeline once per micro-batch.

Recipe: build the server (trunk) and the client (head [+ tail]) as separate objects that share nothing but a
transport; then the shared loop drives ``SplitClient.train_step``, which runs steps 2-10 through messages.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from splitlm.config import Config
from splitlm.data import Batch
from splitlm.errors import ConfigError
from splitlm.frameworks.loop import train
from splitlm.frameworks.registry import register
from splitlm.frameworks.setup import (
    build_part,
    client_defenses,
    client_guard,
    count_parameters,
    load_source,
    prepare_data,
    spec_of,
)
from splitlm.models.split import share_tied_embeddings
from splitlm.peft import trainable_parameters
from splitlm.privacy.accounting import epsilon
from splitlm.privacy.tap import ServerTap, TruthRecorder
from splitlm.runtime.client import EvalStats, SplitClient, StepStats
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server import SplitServer
from splitlm.transport import InProcessTransport
from splitlm.transport.base import Handler


class SplitLearner:
    """A client and a server joined by an in-process transport; checkpoints keep their states apart."""

    def __init__(
        self,
        client: SplitClient,
        server: SplitServer,
        transport: InProcessTransport,
        tap: ServerTap | None = None,
        truth: TruthRecorder | None = None,
        delta: float = 1e-5,
    ) -> None:
        self.client = client
        self.server = server
        self.transport = transport
        self.client_id = client.client_id
        self.tap = tap
        self.truth = truth
        self.delta = delta

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        return self.client.train_step(step, micro_batches)

    def evaluate(self, batches: list[Batch]) -> EvalStats:
        return self.client.evaluate(batches)

    def traffic(self) -> tuple[int, int]:
        return self.transport.meter.snapshot()

    def save(self, folder: Path, with_optimizer: bool) -> None:
        if with_optimizer:  # a checkpoint: each party in its own folder, as on separate machines
            self.client.save(folder / f"client-{self.client_id}")
            self.server.save(folder / "server")
        else:  # final adapters: one folder, one file per part
            self.client.save(folder, with_optimizer=False)
            self.server.save(folder, with_optimizer=False)

    def load(self, folder: Path) -> None:
        self.client.load(folder / f"client-{self.client_id}")
        self.server.load(folder / "server")

    def privacy(self, out: Path, releases: int) -> dict[str, Any]:
        """Write the tap's records (and the client's audit truth); report the defenses and their epsilon."""
        if self.tap is not None:
            keys = self.tap.write(out)
            if self.truth is not None:
                self.truth.write(out, keys)
        defense = self.client.defense
        guard = self.client.guard
        return {
            "defenses": defense.names,
            "epsilon": epsilon(defense.dp_events(), releases, self.delta),
            "delta": self.delta,
            "releases": releases,
            "alarm_step": getattr(guard, "alarm_step", None),
        }

    def info(self) -> dict[str, Any]:
        client_parts = list(self.client.parts.values())
        return {
            "client_param_count": count_parameters(*client_parts),
            "server_param_count": count_parameters(self.server.trunk),
            "client_trainable_param_count": sum(p.numel() for m in client_parts for p in trainable_parameters(m)),
            "server_trainable_param_count": sum(p.numel() for p in trainable_parameters(self.server.trunk)),
            "head_layers": self.client.stages["head"].layer_indices,
            "trunk_layers": self.server.stage.layer_indices,
            "tail_layers": self.client.stages["tail"].layer_indices if "tail" in self.client.stages else [],
        }


def build_learner(config: Config, client_id: str = "0") -> SplitLearner:
    source = load_source(config)
    spec = spec_of(config)
    trunk, trunk_stage = build_part(config, source, "trunk")
    server = SplitServer(
        trunk, trunk_stage, spec.mode, lambda params: PartyOptimizer(params, config.train), config.seed,
        config.server.policy,
    )  # fmt: skip
    server.assign(client_id)
    handler: Handler = server.handle
    if config.privacy.server_attack == "fsha":
        from splitlm.privacy.hijack import Fsha

        handler = Fsha(handler, config, source, trunk_stage)
    tap = ServerTap(handler, config.privacy.tap.max_batches) if config.privacy.tap.enabled else None
    truth = TruthRecorder(2 * config.privacy.tap.max_batches) if tap is not None else None
    transport = InProcessTransport(tap or handler)
    parts, stages = {}, {}
    for role in spec.client_roles():
        parts[role], stages[role] = build_part(config, source, role)
    if "tail" in stages:
        share_tied_embeddings(stages["head"], stages["tail"])
    client_params = [p for part in parts.values() for p in trainable_parameters(part)]
    if not client_params and not server.trainable:
        raise ConfigError("nothing to train: lora.head, lora.trunk and lora.tail are all frozen")
    client = SplitClient(
        client_id, parts, stages, transport, PartyOptimizer(client_params, config.train), spec.mode,
        defense=client_defenses(config, source, stages["head"]), guard=client_guard(config, stages["head"]),
        truth=truth,
    )  # fmt: skip
    return SplitLearner(client, server, transport, tap, truth, config.privacy.delta)


@register("sl")
def run(config: Config, resume: bool = False) -> dict[str, Any]:
    if config.framework.num_clients > 1 or config.framework.rounds > 1 or config.transport.name != "inprocess":
        from splitlm.frameworks.recipes import run_multi_sl

        return run_multi_sl(config, resume)
    learner = build_learner(config)
    data = prepare_data(config, load_source(config).tokenizer())
    return train(config, learner, data, resume)
