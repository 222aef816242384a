"""``SplitServer``: the server runtime (steps 4 and 8) as one object, composed of its parts.

The server sees only messages. Its parts (Petals' server: a backend holding the weights, a task pool, handlers):

- ``router.Router``: routes and the adapter bank (residency, offload, pinning, snapshot/restore, save/export);
- ``worker.Worker``: the request queue in a scheduling policy's order and the thread that serves it,
  back-pressure, serving statistics, internal work between requests;
- ``handlers.Handlers``: what each request does (forward, backward, eval, the step at a barrier), abandoning a
  round and forgetting a client; server-side ``TrunkMod``s (``merge.MergedPasses``) take requests over there.

Callers see ``ServerSurface`` (``surface.py``) plus ``submit``/``handle`` for requests and, in process, the
parts' attributes a transport's mods or a test need (``stage``, ``trunk``, ``bank``, ``optimizer``).
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlm.models.split import SplitMode, SplitSpec, Stage
from splitlm.peft.bank import AdapterBank
from splitlm.peft.lora import ADAPTER
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.server.handlers import Handlers, TrunkMod
from splitlm.runtime.server.router import OptimizerFactory, Route, Router, Snapshot
from splitlm.runtime.server.worker import Worker
from splitlm.transport.messages import Message


class SplitServer:
    """A trunk serving clients: ``mods`` are server-side pieces the handlers offer requests to (merged passes)."""

    def __init__(
        self,
        trunk: nn.Module,
        stage: Stage,
        mode: SplitMode,
        make_optimizer: OptimizerFactory,
        seed: int = 0,
        policy: str = "fifo",
        max_resident_adapters: int = 0,
        offload_dir: Path | None = None,
        max_pending: int = 0,
        mods: Sequence[TrunkMod] = (),
    ) -> None:
        self.router = Router(trunk, stage, mode, make_optimizer, seed, max_resident_adapters, offload_dir)
        self.handlers = Handlers(self.router, max_pending, mods)
        self.worker = Worker(self.handlers, policy)

    # --- the parts' facts ---------------------------------------------------------------------------------

    @property
    def trunk(self) -> nn.Module:
        return self.router.trunk

    @property
    def stage(self) -> Stage:
        return self.router.stage

    @property
    def mode(self) -> SplitMode:
        return self.router.mode

    @property
    def hidden_size(self) -> int:
        return self.router.hidden_size

    @property
    def trainable(self) -> bool:
        return self.router.trainable

    @property
    def bank(self) -> AdapterBank[PartyOptimizer] | None:
        return self.router.bank

    @property
    def routes(self) -> dict[str, Route]:
        return self.router.routes

    @property
    def param_count(self) -> int:
        return self.router.param_count

    @property
    def trainable_param_count(self) -> int:
        return self.router.trainable_param_count

    def trunk_layers(self) -> list[int]:
        return list(self.router.stage.layer_indices)

    # --- tenants -------------------------------------------------------------------------------------------

    def assign(
        self, client_id: str, adapter: str = ADAPTER, spec: SplitSpec | None = None, rank: int | None = None
    ) -> None:
        self.router.assign(client_id, adapter, spec, rank)

    def route_of(self, client_id: str) -> Route:
        return self.router.route_of(client_id)

    def adapter_of(self, client_id: str) -> str:
        return self.router.adapter_of(client_id)

    def adapter_names(self) -> list[str]:
        return self.router.adapter_names()

    def optimizer(self, adapter: str = ADAPTER) -> PartyOptimizer:
        return self.router.optimizer(adapter)

    def adapter_state(self, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
        return self.router.adapter_state(adapter)

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        self.router.load_adapter_state(adapter, state)

    def set_barrier(self, adapter: str, count: int) -> None:
        """Step messages per optimizer step of ``adapter`` (parallel clients behind a barrier; 1: each client's)."""
        self.handlers.barriers[adapter] = count

    # --- requests ------------------------------------------------------------------------------------------

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()

    def submit(self, message: Message) -> Future[Message]:
        return self.worker.submit(message)

    def handle(self, message: Message) -> Message:
        return self.worker.handle(message)

    def serving_stats(self) -> dict[str, Any]:
        return self.worker.serving_stats()

    def forget(self, client_id: str, wait: bool = True) -> None:
        """Drop what a vanished client left half done (``Handlers.forget``), between requests."""
        if client_id in self.router.routes:
            self.worker.between_requests(lambda: self.handlers.forget(client_id), wait)

    def abandon(self) -> None:
        """Stop the round's optimizer steps (``Handlers.abandon``). Queued behind the requests already waiting,
        without blocking, so no step can slip in between and wait forever."""
        self.worker.between_requests(self.handlers.abandon, wait=False)

    # --- state ---------------------------------------------------------------------------------------------

    def snapshot(self) -> Snapshot:
        """Every adapter's tensors and optimizer state, taken between requests."""
        return self.worker.between_requests(self.router.snapshot) or {}

    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot``: adapters, optimizer states; work in progress is dropped (its askers fail)."""
        self.worker.between_requests(lambda: self.handlers.restore(snapshot))

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        self.router.save(folder, with_optimizer)

    def load(self, folder: Path) -> None:
        self.router.load(folder)

    def export_adapter(self, adapter: str, path: Path) -> None:
        self.router.export_adapter(adapter, path)
