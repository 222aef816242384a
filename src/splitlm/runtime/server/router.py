"""The router and its adapter bank: where each client's requests go, and the trunk state they change.

One frozen base trunk serves every client; with LoRA, each client is routed to a named adapter of an
``AdapterBank`` (its own, its group's, or one shared by all, as the framework says), which has its own
optimizer. Each client's route records its cut: the trunk holds a contiguous range of blocks, and a client's
requests run the part of that range its own ``SplitSpec`` leaves to the server (clients may cut in different
places, ``framework.clients``; the trunk holds the union of their ranges once).

Memory (Menos): with ``max_resident_adapters``, the bank offloads the least recently served adapters (and their
optimizer states) to ``offload_dir`` and brings them back when their client is served; the adapter of a client
the request handlers name ``busy`` (it awaits a backward or holds gradients at a barrier) is pinned.

The router also takes and restores snapshots of every adapter and optimizer (a failed round rolled back), and
saves, loads and exports them; it does no ordering of its own: the worker calls it between requests.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from splitlm.errors import CheckpointError, ProtocolError
from splitlm.models.split import SplitMode, SplitSpec, Stage
from splitlm.peft import load_trainable, load_trainable_state, save_trainable, trainable_parameters, trainable_state
from splitlm.peft.bank import AdapterBank
from splitlm.peft.lora import ADAPTER
from splitlm.runtime.optim import PartyOptimizer

OptimizerFactory = Callable[[list[nn.Parameter]], PartyOptimizer]
Snapshot = dict[str, tuple[dict[str, torch.Tensor], Any]]  # adapter -> (its tensors, its optimizer's state)


@dataclass(frozen=True)
class Route:
    """Where a client's requests go: its trunk adapter and the trunk blocks its cut leaves to the server."""

    adapter: str
    blocks: tuple[int, ...]


def _no_clients() -> set[str]:
    return set()


class Router:
    """Routes clients to adapters and trunk blocks, and holds the adapters (the bank) and their optimizers."""

    def __init__(
        self,
        trunk: nn.Module,
        stage: Stage,
        mode: SplitMode,
        make_optimizer: OptimizerFactory,
        seed: int = 0,
        max_resident_adapters: int = 0,
        offload_dir: Path | None = None,
    ) -> None:
        self.trunk = trunk  # the stage, possibly wrapped by peft
        self.stage = stage
        self.mode = mode
        self.hidden_size = stage.in_width  # d, or K behind a learned bottleneck (split.bottleneck)
        self.trainable = bool(trainable_parameters(trunk))
        self.seed = seed
        # clients whose adapter must stay where it is (the request handlers set it: graphs awaiting a backward,
        # gradients held at a barrier)
        self.busy: Callable[[], set[str]] = _no_clients
        self.bank: AdapterBank[PartyOptimizer] | None = None
        if isinstance(trunk, PeftModel):
            self.bank = AdapterBank(
                trunk, make_optimizer, seed,
                max_resident=max_resident_adapters, offload_dir=offload_dir, pinned=self._pinned,
            )  # fmt: skip
        self._shared = None if self.bank else make_optimizer(trainable_parameters(trunk))
        self.routes: dict[str, Route] = {}  # client id -> its adapter and trunk blocks

    @property
    def param_count(self) -> int:
        """Parameters the server holds in memory: the base trunk once, plus every resident adapter."""
        return sum(p.numel() for p in {id(p): p for p in self.trunk.parameters()}.values())

    @property
    def trainable_param_count(self) -> int:
        """Parameters of one trunk adapter (or of the trunk, trained without LoRA)."""
        if self.bank is not None:
            return self.bank.numel(ADAPTER)
        return sum(p.numel() for p in trainable_parameters(self.trunk))

    # --- tenants -----------------------------------------------------------------------------------------

    def assign(
        self, client_id: str, adapter: str = ADAPTER, spec: SplitSpec | None = None, rank: int | None = None
    ) -> None:
        """Route ``client_id`` to ``adapter`` (created on first use, initialised like every other one, with LoRA
        rank ``rank`` if given) and to the trunk blocks its cut ``spec`` leaves to the server (default: every
        block this trunk holds)."""
        if adapter != ADAPTER:
            if self.bank is None:
                if self.trainable:
                    raise ProtocolError("per-client trunk adapters need lora.trunk.method=lora")
            elif adapter not in self.bank.names:
                self.bank.add(adapter, rank)
        self.routes[client_id] = Route(adapter, self._blocks_of(client_id, spec))

    def _blocks_of(self, client_id: str, spec: SplitSpec | None) -> tuple[int, ...]:
        held = tuple(self.stage.layer_indices)
        if spec is None:
            return held
        if spec.mode != self.mode:
            raise ProtocolError(f"client {client_id} uses a {spec.mode} split; this server serves {self.mode} splits")
        blocks = tuple(spec.layers("trunk", int(self.stage.config.num_hidden_layers)))
        if not blocks or not set(blocks) <= set(held):
            raise ProtocolError(
                f"client {client_id}'s cut (head {spec.head_layers}, tail {spec.tail_layers}) needs trunk blocks "
                f"{blocks[0] if blocks else '-'}..{blocks[-1] if blocks else '-'}, but this server holds blocks "
                f"{held[0]}..{held[-1]}; cut within them"
            )
        return blocks

    def route_of(self, client_id: str) -> Route:
        route = self.routes.get(client_id)
        if route is None:
            raise ProtocolError(f"unknown client {client_id!r}: this server serves {sorted(self.routes)}")
        return route

    def adapter_of(self, client_id: str) -> str:
        return self.route_of(client_id).adapter

    def adapter_names(self) -> list[str]:
        """The bank's adapters (none without LoRA on the trunk)."""
        return list(self.bank.names) if self.bank is not None else []

    def optimizer(self, adapter: str = ADAPTER) -> PartyOptimizer:
        if self.bank is not None:
            return self.bank.optimizer(adapter)
        assert self._shared is not None
        return self._shared

    def parameters(self, adapter: str) -> list[nn.Parameter]:
        """``adapter``'s parameters where they are now (an offloaded adapter has none in the model)."""
        return self.bank.parameters(adapter) if self.bank is not None else self.optimizer(adapter).params

    def adapter_state(self, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
        if self.bank is None:
            return {}
        return self.bank.state(adapter)

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        if self.bank is not None:
            self.bank.load_state(adapter, state)

    # --- serving a request ------------------------------------------------------------------------------

    @contextlib.contextmanager
    def serving(self, client_id: str) -> Iterator[Route]:
        """The client's route, with its adapter selected (and brought back, if it was offloaded)."""
        route = self.route_of(client_id)
        if self.bank is None:
            yield route
        else:
            with self.bank.use(route.adapter):
                yield route

    def run_trunk(
        self, route: Route, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None
    ) -> torch.Tensor:
        """The trunk's blocks of ``route`` on ``hidden`` (B, T, d): (B, T, d), or the logits (B, T, V) in a vanilla
        split."""
        blocks = None if route.blocks == tuple(self.stage.layer_indices) else list(route.blocks)
        return self.trunk(hidden_states=hidden, attention_mask=mask, position_ids=positions, blocks=blocks)

    def _pinned(self) -> set[str]:
        """Adapters that must stay where they are: those of the busy clients (the bank also pins adapters with a
        ``.grad`` of their own)."""
        return {self.routes[c].adapter for c in self.busy() if c in self.routes}

    # --- rolling a failed round back ----------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every adapter's tensors and optimizer state (offloaded adapters stay where they are)."""
        if self.bank is not None:
            return {name: self.bank.snapshot(name) for name in self.bank.names}
        state = {k: v.detach().clone() for k, v in trainable_state(self.trunk).items()}
        return {ADAPTER: (state, self.optimizer().snapshot())}

    def restore(self, snapshot: Snapshot) -> None:
        """Back to ``snapshot``: adapters and optimizer states, with no gradients left on the trunk."""
        for p in self.trunk.parameters():  # nothing is pinned now: the bank may move adapters as it restores
            p.grad = None
        for name, (state, optimizer) in snapshot.items():
            if self.bank is not None:
                self.bank.restore(name, (state, optimizer))
            else:
                load_trainable_state(self.trunk, state, "trunk")
                self.optimizer().restore(optimizer)
        for p in self.trunk.parameters():
            p.grad = None

    # --- state -----------------------------------------------------------------------------------------

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """Every adapter as ``trunk[-NAME].safetensors`` (+ its optimizer in ``optimizer[-NAME]/``)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.bank is None:
            if self.trainable:
                save_trainable(self.trunk, folder / "trunk.safetensors")
            if with_optimizer:
                self.optimizer().save(folder)
            return
        for name in self.bank.names:
            suffix = "" if name == ADAPTER else f"-{name}"
            if name == ADAPTER or name in {route.adapter for route in self.routes.values()}:
                tmp = folder / f".trunk{suffix}.safetensors.tmp"
                save_file(self.bank.state(name), str(tmp), metadata={"format": "pt"})
                tmp.replace(folder / f"trunk{suffix}.safetensors")
                if with_optimizer:
                    (folder / f"optimizer{suffix}").mkdir(exist_ok=True)
                    self.bank.save_optimizer(name, folder / f"optimizer{suffix}")

    def export_adapter(self, adapter: str, path: Path) -> None:
        """Write one adapter as a part file (``trunk.safetensors``) that ``splitlm generate/export`` load."""
        if self.bank is None:
            if self.trainable:
                save_trainable(self.trunk, path)
            return
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.bank.state(adapter), str(tmp), metadata={"format": "pt"})
        tmp.replace(path)

    def load(self, folder: Path) -> None:
        if self.bank is None:
            if self.trainable:
                load_trainable(self.trunk, folder / "trunk.safetensors")
            self.optimizer().load(folder)
            return
        for name in self.bank.names:
            suffix = "" if name == ADAPTER else f"-{name}"
            path = folder / f"trunk{suffix}.safetensors"
            if not path.is_file():
                if name == ADAPTER:
                    raise CheckpointError(f"{path} not found: the checkpoint is incomplete")
                continue
            self.bank.load_state(name, load_file(str(path)))
            if (folder / f"optimizer{suffix}").is_dir():
                self.bank.optimizer(name).load(folder / f"optimizer{suffix}")
