"""``splitwiper``: SplitWiper's one-way-one-off isolation (Yu et al., *Split Unlearning*; survey §5.24), SISA-style,
so that ``splitlm unlearn`` retrains one shard instead of the whole run (``frameworks/unlearn.py``).

With gsfl, its groups of clients (``framework.groups``, else ``framework.grouping``'s) are the shards. Each shard
keeps its own trunk adapter (gsfl's one per group) and its own client side: inside a shard the clients train one
after another, passing the shard's client side on (sequential SL), and nothing is ever averaged across shards, so a
shard's state depends on its own clients' data only (and on the config and seed). The first ``warmup_rounds`` rounds
train the whole client side (the warm-up); from then on every head is frozen (``SplitClient.freeze_head``): it asks
for no gradient at the cut, its smashed data for a row stop changing, and what a client contributes goes one way, to
its shard's trunk adapter (and, in a U-shaped split, to the shard's tail, which trains on).

The global model combines the shards: a sequence's loss is the mean over the trained shards of its loss under each
(the mean of their log-probabilities of the true tokens: an unnormalized product of experts), so the held-out loss
and the accuracy (the candidate with the lowest mean loss) are the ensemble's. ``adapters/`` holds the first trained
shard's model (what ``generate`` and ``export`` rebuild) and ``adapters/shards/shard-G/`` each shard's, in the same
layout.

What this is not: SplitWiper's warm-up is local to the client and the frozen clients send their outputs once. Here
the warm-up is split training inside the shard (the shard is the unit of isolation either way), and a frozen head's
smashed data are computed and sent again at every step that draws the row: they are the same each time, but no
server-side cache of them exists, so "once" holds for what is sent, not for the bytes. In a U-shaped split the tail
still exchanges trunk outputs and gradients with the server at every step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from pydantic import Field
from safetensors.torch import load_file, save_file

from splitlm.files import write_json
from splitlm.frameworks.aggregation import STRATEGIES, Strategy
from splitlm.frameworks.aggregation.scales import scale_of
from splitlm.registry import ComponentSettings
from splitlm.runtime.client import EvalStats

if TYPE_CHECKING:
    from splitlm.data import Batch, Example
    from splitlm.frameworks.federation import Federation, Member

STATE = "isolation"  # the strategy's folder in a checkpoint
SHARDS = "shards"  # adapters/shards/shard-G/: each trained shard's model
KEY = "framework.aggregation=splitwiper"


@STRATEGIES.component
class SplitWiper(Strategy):
    """Shards of clients trained apart, heads frozen after a warm-up; the global model is their ensemble."""

    name = "splitwiper"

    class Settings(ComponentSettings):
        warmup_rounds: int = Field(
            1,
            ge=0,
            description="Rounds in which a shard's whole client side trains (the warm-up); from then on every head "
            "is frozen, so its smashed data stop changing and only the shard's trunk adapter (and, U-shaped, its "
            "tail) learn. 0: the heads stay as they start.",
        )

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.shards: dict[int, dict[str, torch.Tensor]] = {}  # each trained shard's client side, by group index
        self.started: dict[int, dict[str, torch.Tensor]] = {}  # the same at the round's start (a rollback's)
        self.groups: list[list[int]] = []
        self.hooked = False

    @property
    def warmup_rounds(self) -> int:
        return int(self.settings.warmup_rounds)  # type: ignore[attr-defined]

    def round(self, fed: Federation, round_index: int, members: list[Member]) -> list[Member]:
        """Each shard's chosen clients one after another on the shard's client side and trunk adapter; the shards at
        once, and apart."""
        if not self.hooked:  # a rolled-back round (a guard, a lost client) forgets what it did to the shards
            fed.rollback_hooks.append(self._rolled_back)
            self.hooked = True
        self.groups, self.started = [list(g) for g in fed.groups], dict(self.shards)
        chosen = {m.index for m in members}
        frozen = round_index >= self.warmup_rounds
        work = [(g, [fed.members[i] for i in group if i in chosen]) for g, group in enumerate(fed.groups)]
        finished: dict[int, dict[str, torch.Tensor]] = {}

        def run_shard(shard: int, clients: list[Member]) -> None:
            carry = self.shards.get(shard)
            for member in clients:
                if carry is not None:
                    member.client.load_state(carry)
                member.client.freeze_head(frozen)  # type: ignore[attr-defined]
                fed.local_training(member, round_index)
                carry = {k: v.detach().clone() for k, v in member.client.state().items()}
            if carry is not None:
                finished[shard] = carry

        fed.parallel([lambda g=g, c=c: run_shard(g, c) for g, c in work if c])
        self.shards.update(finished)
        return [self.global_member(fed)]

    def _rolled_back(self) -> None:
        self.shards = dict(self.started)

    def global_member(self, fed: Federation) -> Member:
        """The global model as a member the driver evaluates and saves: the trained shards' ensemble."""
        from splitlm.frameworks.federation import Member

        parts = [(g, fed.members[self.groups[g][0]], state) for g, state in sorted(self.shards.items())]
        first = parts[0][1]
        return Member(first.index, ShardEnsemble(fed, parts), [], None, {})

    def summary(self) -> dict[str, object]:
        return {
            "mode": self.name,
            "warmup_rounds": self.warmup_rounds,
            "shards": [[str(i) for i in group] for group in self.groups],
            "trained_shards": sorted(self.shards),
        }

    def save(self, fed: Federation, folder: Path) -> None:
        (folder / STATE).mkdir(exist_ok=True)
        for shard, state in self.shards.items():
            save_file(state, str(folder / STATE / f"shard-{shard}.safetensors"))
        write_json(folder / STATE / "shards.json", {"trained": sorted(self.shards), "groups": fed.groups})

    def load(self, fed: Federation, folder: Path) -> None:
        self.shards = load_shards(folder)
        self.groups = [list(g) for g in fed.groups]

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None:
            return []
        problems = []
        if framework.trunk_adapters != "group":
            problems.append(
                f"{KEY}: confines each client to its shard of the server, one trunk adapter per shard; "
                f"framework.name={framework.name} keeps none per group of clients: set framework.name=gsfl (its "
                "groups are the shards: framework.groups or framework.num_groups)"
            )
        if config.transport.name != "inprocess":
            problems.append(f"{KEY}: freezes the heads of clients in this process; set transport.name=inprocess")
        if framework.trunk_adapters == "group" and scale_of(config).global_lr(2) != 1.0:
            problems.append(
                f"{KEY}: averages no client sides; framework.server_lr_scale={config.framework.server_lr_scale} "
                "steps their FedAvg: unset it"
            )
        return problems

    @classmethod
    def networked_problems(cls, settings: Any) -> list[str]:
        return [f"{KEY}: freezes the heads of clients in this process; train it with `splitlm train`"]


def load_shards(folder: Path) -> dict[int, dict[str, torch.Tensor]]:
    """The trained shards' client sides a checkpoint's ``folder`` holds ({} when none)."""
    import json

    path = folder / STATE / "shards.json"
    if not path.is_file():
        return {}
    trained = json.loads(path.read_text())["trained"]
    return {int(g): load_file(str(folder / STATE / f"shard-{g}.safetensors")) for g in trained}


class ShardEnsemble:
    """The global model of an isolated run: each trained shard's client side, run through one of the shard's
    clients (so through the shard's trunk adapter on the server), their sequence losses averaged."""

    def __init__(self, fed: Federation, parts: list[tuple[int, Member, dict[str, torch.Tensor]]]) -> None:
        self.fed = fed
        self.parts = parts
        self.client_id = parts[0][1].client_id  # the first shard's: its trunk adapter is the one exported

    @property
    def meter(self) -> Any:
        return self.parts[0][1].meter

    @contextlib.contextmanager
    def _as_shard(self, member: Member, state: dict[str, torch.Tensor]) -> Iterator[Any]:
        own = {k: v.detach().clone() for k, v in member.client.state().items()}
        member.client.load_state(state)
        try:
            yield member.client
        finally:
            member.client.load_state(own)

    def evaluate(self, batches: list[Batch], step: int = -1) -> EvalStats:
        results = []
        for _, member, state in self.parts:
            with self._as_shard(member, state) as client:
                results.append(client.evaluate(batches))
        return EvalStats(sum(r.loss_sum for r in results) / len(results), results[0].tokens)

    def sequence_losses(self, examples: list[Example], pad_id: int) -> list[float]:
        per_shard = []
        for _, member, state in self.parts:
            with self._as_shard(member, state) as client:
                per_shard.append(client.sequence_losses(examples, pad_id))
        return [sum(losses) / len(losses) for losses in zip(*per_shard, strict=True)]

    def state(self) -> dict[str, torch.Tensor]:
        return dict(self.parts[0][2])

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """The first shard's model in ``folder`` (as any run's adapters) and each shard's in ``shards/shard-G/``."""
        server = self.fed.server
        assert server is not None
        for shard, member, state in self.parts:
            where = folder / SHARDS / f"shard-{shard}"
            with self._as_shard(member, state) as client:
                client.save(where, with_optimizer=False)
                if shard == self.parts[0][0]:
                    client.save(folder, with_optimizer=False)
            server.export_adapter(server.adapter_of(member.client_id), where / "trunk.safetensors")
            write_json(where / "client.json", {"client": member.index, "shard": shard})
