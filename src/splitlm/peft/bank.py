"""``AdapterBank``: one frozen base trunk in memory, many named LoRA adapters, one optimizer state each.

The server serves every client (or group) from the same base weights; only the adapters and their optimizer
states are per tenant, so memory grows by those alone. ``bank.use(name)`` selects an adapter for a request;
an unknown name is an error, never a silent default.

peft's ``set_adapter`` freezes the adapters it deactivates. A U-shaped client's backward can arrive after
another client's forward switched adapters, and a leaf whose ``requires_grad`` was turned off in between
gets no gradient, so the bank keeps every adapter's parameters trainable and only switches which one the
layers apply. Gradients then reach exactly the adapter a forward used.

An adapter also holds its copy of peft's ``modules_to_save`` (the trunk's learned bottleneck at the cut,
``split.bottleneck``): created with the adapter from the same initial weights, switched, trained, saved and loaded
with its LoRA tensors.

Adapters of clients not being served leave the compute device (Menos). With ``max_resident`` > 0, when more
adapters would be resident, the least recently served one that is not pinned is offloaded: its tensors
(safetensors) and optimizer state (``save``: safetensors + JSON, never pickle) go to ``offload_dir/<name>/``,
and it is deleted from the peft model (its LoRA and ``modules_to_save`` copies) and its optimizer dropped, so
their memory is freed. Serving it again adds it back with its own ``LoraConfig`` (its rank may differ from the
first adapter's), loads its tensors and rebuilds its optimizer from the saved state: bit for bit what it was.
Every other operation (``names``, ``state``, ``load_state``, ``snapshot``, ``restore``, saving) works on an
offloaded adapter without bringing it back, except ``optimizer`` (it brings the adapter back).

An adapter is pinned while it must stay where it is: the server's ``pinned`` callable names those whose
client awaits a backward (a trunk graph holds their weights) or holds gradients at a barrier, and an adapter
with a ``.grad`` (between backward and optimizer step) is pinned too. Pinned adapters are never moved, so
when every resident adapter is pinned the bank holds more than ``max_resident`` until they are released
(``server.max_pending`` bounds how many graphs can pin adapters). An adapter added by ``add`` counts from its
first use on: the bound is restored at the next ``use``.

With the trunk on a GPU and ``max_resident`` 0, adapters not being served (and not pinned) wait in CPU memory
instead, moved in place: the optimizer keeps its parameters, and AdamW's step counters stay on the CPU.
"""

from __future__ import annotations

import contextlib
import dataclasses
import shutil
import tempfile
import threading
import weakref
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any, Generic, Protocol, TypeVar

import torch
from peft import LoraConfig, PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from safetensors.torch import load_file, save_file
from torch import nn

from splitlm.errors import CheckpointError, ProtocolError
from splitlm.peft.lora import ADAPTER, PEFT_PREFIX, canonical_name, seeded_init

TENSORS = "adapter.safetensors"  # an offloaded adapter's tensors, beside its optimizer's files


class Stateful(Protocol):
    """What the bank needs of an optimizer to offload it (the runtime's ``PartyOptimizer``)."""

    def save(self, folder: Path) -> None: ...

    def load(self, folder: Path) -> None: ...

    def snapshot(self) -> Any: ...

    def restore(self, snapshot: Any) -> None: ...


Opt = TypeVar("Opt", bound=Stateful)  # the optimizer kept beside each adapter


class OnDisk:
    """A snapshot of an offloaded adapter's optimizer, taken without bringing it back: a copy of its files on
    disk (in memory they would cost what offloading saved), deleted with this object."""

    def __init__(self, source: Path, root: Path) -> None:
        root.mkdir(parents=True, exist_ok=True)
        self.folder = Path(tempfile.mkdtemp(dir=root))
        _copy_optimizer_files(source, self.folder)
        weakref.finalize(self, shutil.rmtree, self.folder, ignore_errors=True)


def _copy_optimizer_files(source: Path, target: Path) -> None:
    """Copy an adapter folder's optimizer files (all but its tensors and unfinished writes)."""
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name != TENSORS and not file.name.startswith("."):
            shutil.copyfile(file, target / file.name)


class AdapterBank(Generic[Opt]):
    def __init__(
        self,
        model: PeftModel,
        make_optimizer: Callable[[list[nn.Parameter]], Opt],
        seed: int,
        *,
        max_resident: int = 0,
        offload_dir: Path | None = None,
        pinned: Callable[[], Collection[str]] | None = None,
    ) -> None:
        if max_resident < 0:
            raise ValueError(f"max_resident is {max_resident}; expected 0 (no bound) or a positive count")
        if max_resident and offload_dir is None:
            raise ValueError(f"max_resident={max_resident} needs an offload_dir to put the other adapters in")
        self.model = model
        self.make_optimizer = make_optimizer
        self.seed = seed
        self.template = model.peft_config[ADAPTER]
        self.optimizers: dict[str, Opt] = {}  # the resident adapters
        self.lock = threading.RLock()  # one request at a time runs on the shared base
        self.max_resident = max_resident
        self.offload_dir = offload_dir
        self.pinned = pinned or (lambda: ())
        self.device = next((p.device for p in model.parameters()), torch.device("cpu"))
        self._park = not max_resident and self.device.type != "cpu"  # idle adapters wait in CPU memory
        self._offloaded: dict[str, LoraConfig] = {}  # adapter -> its config, while it waits in offload_dir
        self._parked: set[str] = set()  # adapters waiting in CPU memory
        self._recency: dict[str, None] = {}  # adapters served, least recently first
        self._active: str | None = None
        self._lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._saved = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self.optimizers[ADAPTER] = make_optimizer(self.parameters(ADAPTER))

    @property
    def names(self) -> list[str]:
        """Every adapter, resident or offloaded."""
        return [*self.optimizers, *self._offloaded]

    @property
    def resident(self) -> list[str]:
        """The adapters in the peft model now (on the compute device, or parked in CPU memory)."""
        return list(self.optimizers)

    def add(self, name: str, rank: int | None = None) -> None:
        """A new adapter, initialised exactly like the first one (same seed): every tenant starts equal. ``rank``:
        its own LoRA rank (a client with ``framework.clients[i].lora.rank``); default: the first one's."""
        if name in self.optimizers:
            raise ValueError(f"adapter {name!r} exists already")
        same = rank is None or rank == self.template.r
        settings = self.template if same else dataclasses.replace(self.template, r=rank)
        with self.lock:
            self.model.add_adapter(name, settings)
            seeded_init(self.model, self.seed, name)
            self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
            self._saved = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
            for p in self.parameters(name):
                p.requires_grad_(True)
            self.optimizers[name] = self.make_optimizer(self.parameters(name))
            self._activate(self._active or ADAPTER)

    def parameters(self, name: str) -> list[nn.Parameter]:
        params = []
        for layer in self._lora_layers:
            for container in (layer.lora_A, layer.lora_B):
                if name in container:
                    params.extend(container[name].parameters())
        for wrapper in self._saved:
            if name in wrapper.modules_to_save:
                params.extend(wrapper.modules_to_save[name].parameters())
        return params

    def _activate(self, name: str) -> None:
        for layer in [*self._lora_layers, *self._saved]:
            layer.set_adapter(name)  # also sets requires_grad: restored below
        for adapter in self.optimizers:
            for p in self.parameters(adapter):
                p.requires_grad_(True)
        self._active = name

    def _check(self, name: str) -> None:
        if name not in self.optimizers and name not in self._offloaded:
            raise ProtocolError(f"unknown adapter {name!r}: this server holds {sorted(self.names)}")

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the base with adapter ``name`` (brought back first if it was offloaded); requests are serialised
        on the shared base."""
        self._check(name)
        with self.lock:
            self._bring(name)
            yield

    def optimizer(self, name: str) -> Opt:
        """Adapter ``name``'s optimizer over its live parameters: an offloaded adapter is brought back."""
        self._check(name)
        with self.lock:
            self._bring(name)
            return self.optimizers[name]

    def numel(self, name: str) -> int:
        """Entries of adapter ``name``'s tensors, resident or not."""
        self._check(name)
        if name in self._offloaded:
            return sum(t.numel() for t in self.state(name).values())
        return sum(p.numel() for p in self.parameters(name))

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under unsplit-model names (the adapter name is not in the keys)."""
        self._check(name)
        with self.lock:
            if name in self._offloaded:
                return load_file(str(self._folder(name) / TENSORS))
            state = get_peft_model_state_dict(self.model, adapter_name=name)
        return {canonical_name(k): v.detach().cpu().clone() for k, v in state.items()}

    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        expected = self.state(name)
        wrong = sorted(set(expected) ^ set(state)) or [k for k in state if state[k].shape != expected[k].shape]
        if wrong:
            raise CheckpointError(f"adapter {name!r}: tensors do not match this trunk (e.g. {wrong[:3]})")
        with self.lock:
            if name in self._offloaded:  # written where it waits; it is loaded from there when served
                tensors = {k: v.detach().to("cpu", expected[k].dtype).contiguous() for k, v in state.items()}
                self._write_tensors(name, tensors)
                return
            set_peft_model_state_dict(self.model, {PEFT_PREFIX + k: v for k, v in state.items()}, adapter_name=name)

    # --- rolling back and checkpoints, without bringing offloaded adapters back -------------------------

    def snapshot(self, name: str) -> tuple[dict[str, torch.Tensor], Any]:
        """Adapter ``name``'s tensors and optimizer state (``OnDisk`` files for an offloaded one)."""
        self._check(name)
        with self.lock:
            if name in self._offloaded:
                assert self.offload_dir is not None
                return self.state(name), OnDisk(self._folder(name), self.offload_dir / ".snapshots")
            return self.state(name), self.optimizers[name].snapshot()

    def restore(self, name: str, snapshot: tuple[dict[str, torch.Tensor], Any]) -> None:
        """Back to ``snapshot(name)``, wherever the adapter is now."""
        state, optimizer = snapshot
        with self.lock:
            self.load_state(name, state)
            if not isinstance(optimizer, OnDisk):
                self.optimizer(name).restore(optimizer)
                return
            folder = self._folder(name)
            _copy_optimizer_files(optimizer.folder, folder)
            if name in self.optimizers:  # resident now: its optimizer loads the files
                self.optimizers[name].load(folder)

    def save_optimizer(self, name: str, folder: Path) -> None:
        """Write adapter ``name``'s optimizer into ``folder`` (an offloaded one's files are copied)."""
        self._check(name)
        with self.lock:
            if name not in self._offloaded:
                self.optimizers[name].save(folder)
                return
            _copy_optimizer_files(self._folder(name), folder)

    # --- residency: offload to disk, park in CPU memory, bring back ----------------------------------

    def _folder(self, name: str) -> Path:
        if self.offload_dir is None or not name or name.startswith(".") or "/" in name or "\\" in name:
            raise ValueError(f"adapter {name!r} cannot be offloaded (offload_dir {self.offload_dir})")
        folder = self.offload_dir / name
        folder.mkdir(parents=True, exist_ok=True)
        return folder

    def _write_tensors(self, name: str, tensors: dict[str, torch.Tensor]) -> None:
        folder = self._folder(name)
        save_file(tensors, str(folder / f".{TENSORS}.tmp"), metadata={"format": "pt"})
        (folder / f".{TENSORS}.tmp").replace(folder / TENSORS)

    def _is_pinned(self, name: str, pinned: Collection[str]) -> bool:
        return name == self._active or name in pinned or any(p.grad is not None for p in self.parameters(name))

    def _bring(self, name: str) -> None:
        """Make ``name`` resident, on the compute device and active; then send the others away as the bound
        says. The one brought back is loaded before another leaves, so for that moment one more is resident."""
        if name in self._offloaded:
            self._reload(name)
        elif name in self._parked:
            self._move(name, self.device)
            self._parked.discard(name)
        if self._active != name:
            self._activate(name)
        self._recency.pop(name, None)
        self._recency[name] = None
        if self._park:
            pinned = self.pinned()
            for other in [n for n in self.optimizers if n not in self._parked]:
                if not self._is_pinned(other, pinned):
                    self._move(other, torch.device("cpu"))
                    self._parked.add(other)
        elif self.max_resident and len(self.optimizers) > self.max_resident:
            pinned = self.pinned()
            never_served = [n for n in self.optimizers if n not in self._recency]
            for other in [*never_served, *self._recency]:  # least recently served first
                if len(self.optimizers) <= self.max_resident:
                    break
                if not self._is_pinned(other, pinned):
                    self._offload(other)

    def _offload(self, name: str) -> None:
        """Write adapter ``name`` and its optimizer to ``offload_dir/<name>/`` and delete it from the model."""
        self._write_tensors(name, self.state(name))
        self.optimizers[name].save(self._folder(name))
        config = self.model.peft_config[name]
        self.model.delete_adapter(name)  # its LoRA weights and its modules_to_save copies
        del self.optimizers[name]
        self._recency.pop(name, None)
        self._offloaded[name] = config

    def _reload(self, name: str) -> None:
        """Add an offloaded adapter back with its own config and load its tensors and optimizer state."""
        config, folder = self._offloaded[name], self._folder(name)
        state = load_file(str(folder / TENSORS), device=str(self.device))
        with torch.random.fork_rng(devices=[]):  # peft draws initial weights, overwritten below
            self.model.add_adapter(name, config)
        self._lora_layers = [m for m in self.model.modules() if isinstance(m, LoraLayer)]
        self._saved = [m for m in self.model.modules() if isinstance(m, ModulesToSaveWrapper)]
        try:
            set_peft_model_state_dict(self.model, {PEFT_PREFIX + k: v for k, v in state.items()}, adapter_name=name)
            params = self.parameters(name)
            for p in params:
                p.requires_grad_(True)
            optimizer = self.make_optimizer(params)
            optimizer.load(folder)
        except Exception:  # it stays offloaded, as it was
            self.model.delete_adapter(name)
            if self._active is not None:
                self._activate(self._active)
            raise
        del self._offloaded[name]
        self.optimizers[name] = optimizer

    def _move(self, name: str, device: torch.device) -> None:
        """Move a resident adapter's weights and optimizer state in place (AdamW's ``step`` stays put)."""
        for p in self.parameters(name):
            p.data = p.data.to(device)
        state = getattr(getattr(self.optimizers[name], "optimizer", None), "state", {})
        for entry in state.values():
            for key, value in entry.items():
                if torch.is_tensor(value) and key != "step":
                    entry[key] = value.to(device)
