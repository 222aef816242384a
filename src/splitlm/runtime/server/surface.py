"""``ServerSurface``: every call a framework's recipe, the driver, the federation or a remote proxy makes on a
server, whichever process the server is in.

The in-process ``SplitServer`` (also the one ``splitlm serve`` holds: its networked clients' requests reach it
through the gRPC server, its driver calls it directly) and Ray's ``RayServerProxy`` (calls on the server actor)
implement it; ``tests/runtime/test_server_surface.py`` checks each against it. Requests themselves (forward,
backward, step, eval) do not go through it: they reach a server's ``submit`` through a transport and its mods.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import torch


@runtime_checkable
class ServerSurface(Protocol):
    @property
    def param_count(self) -> int:
        """Parameters the server holds in memory: the base trunk once, plus every resident adapter."""
        ...

    @property
    def trainable_param_count(self) -> int:
        """Parameters of one trunk adapter (or of the trunk, trained without LoRA)."""
        ...

    def trunk_layers(self) -> list[int]:
        """The model's blocks the trunk holds."""
        ...

    def adapter_names(self) -> list[str]:
        """The trunk adapters the server holds (none without LoRA on the trunk)."""
        ...

    def adapter_of(self, client_id: str) -> str:
        """The trunk adapter a client is routed to."""
        ...

    def adapter_state(self, adapter: str) -> dict[str, torch.Tensor]:
        """An adapter's tensors (for aggregation)."""
        ...

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None: ...

    def set_barrier(self, adapter: str, count: int) -> None:
        """From now on ``adapter`` takes one optimizer step per ``count`` clients' steps (1: each client's)."""
        ...

    def start(self) -> None:
        """Serve requests from the queue on a worker (several clients at once)."""
        ...

    def stop(self) -> None: ...

    def forget(self, client_id: str, wait: bool = True) -> None:
        """Drop what a vanished client left half done (its graphs, gradients; its barrier's waiting steps fail)."""
        ...

    def abandon(self) -> None:
        """Stop the round's optimizer steps (the waiting ones fail) until ``restore``."""
        ...

    def snapshot(self) -> Any:
        """Every adapter's tensors and optimizer state, for ``restore`` (opaque to the caller)."""
        ...

    def restore(self, snapshot: Any) -> None:
        """Back to ``snapshot``; work in progress is dropped (its askers fail)."""
        ...

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """Every adapter (and its optimizer) under ``folder``, as a checkpoint's ``server/``."""
        ...

    def load(self, folder: Path) -> None: ...

    def export_adapter(self, adapter: str, path: Path) -> None:
        """One adapter as a part file (``trunk.safetensors``) that ``splitlm generate/export`` load."""
        ...

    def serving_stats(self) -> dict[str, Any] | None:
        """The worker's idle fraction and each client's time queued (``summary.json``'s ``server``)."""
        ...


def surface_members() -> list[str]:
    """The names of ``ServerSurface``'s methods and properties."""
    return sorted(name for name in vars(ServerSurface) if not name.startswith("_"))
