"""``AdapterBank``: one frozen base trunk in memory, many named LoRA adapters, one optimizer state each.

The server serves every client (or group) from the same base weights; only the adapters and their optimizer
states are per tenant, so memory grows by those alone. ``bank.use(name)`` selects an adapter for a request;
an unknown name is an error, never a silent default.

peft's ``set_adapter`` freezes the adapters it deactivates. A U-shaped client's backward can arrive after
another client's forward switched adapters, and a leaf whose ``requires_grad`` was turned off in between
gets no gradient, so the bank keeps every adapter's parameters trainable and only switches which one the
layers apply. Gradients then reach exactly the adapter a forward used.

An adapter also holds its copy of peft's ``modules_to_save`` (the trunk's learned bottleneck at the cut,
``lowrank:K``): created with the adapter from the same initial weights, switched, trained, saved and loaded
with its LoRA tensors.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

import torch
from peft import PeftModel, get_peft_model_state_dict, set_peft_model_state_dict
from peft.tuners.lora import LoraLayer
from peft.utils import ModulesToSaveWrapper
from torch import nn

from splitlm.errors import CheckpointError, ProtocolError
from splitlm.peft.lora import ADAPTER, PEFT_PREFIX, canonical_name, seeded_init

Opt = TypeVar("Opt")  # the optimizer kept beside each adapter (the runtime's PartyOptimizer)


class AdapterBank(Generic[Opt]):
    def __init__(self, model: PeftModel, make_optimizer: Callable[[list[nn.Parameter]], Opt], seed: int) -> None:
        self.model = model
        self.make_optimizer = make_optimizer
        self.seed = seed
        self.template = model.peft_config[ADAPTER]
        self.optimizers: dict[str, Opt] = {}
        self.lock = threading.RLock()  # one request at a time runs on the shared base
        self._active: str | None = None
        self._lora_layers = [m for m in model.modules() if isinstance(m, LoraLayer)]
        self._saved = [m for m in model.modules() if isinstance(m, ModulesToSaveWrapper)]
        self.optimizers[ADAPTER] = make_optimizer(self.parameters(ADAPTER))

    @property
    def names(self) -> list[str]:
        return list(self.optimizers)

    def add(self, name: str) -> None:
        """A new adapter, initialised exactly like the first one (same seed): every tenant starts equal."""
        if name in self.optimizers:
            raise ValueError(f"adapter {name!r} exists already")
        with self.lock:
            self.model.add_adapter(name, self.template)
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

    @contextlib.contextmanager
    def use(self, name: str) -> Iterator[None]:
        """Run the base with adapter ``name``; requests are serialised on the shared base."""
        if name not in self.optimizers:
            raise ProtocolError(f"unknown adapter {name!r}: this server holds {sorted(self.optimizers)}")
        with self.lock:
            if self._active != name:
                self._activate(name)
            yield

    def optimizer(self, name: str) -> Opt:
        if name not in self.optimizers:
            raise ProtocolError(f"unknown adapter {name!r}: this server holds {sorted(self.optimizers)}")
        return self.optimizers[name]

    def state(self, name: str) -> dict[str, torch.Tensor]:
        """Adapter ``name``'s tensors under unsplit-model names (the adapter name is not in the keys)."""
        state = get_peft_model_state_dict(self.model, adapter_name=name)
        return {canonical_name(k): v.detach().cpu().clone() for k, v in state.items()}

    def load_state(self, name: str, state: dict[str, torch.Tensor]) -> None:
        expected = self.state(name)
        wrong = sorted(set(expected) ^ set(state)) or [k for k in state if state[k].shape != expected[k].shape]
        if wrong:
            raise CheckpointError(f"adapter {name!r}: tensors do not match this trunk (e.g. {wrong[:3]})")
        with self.lock:
            set_peft_model_state_dict(self.model, {PEFT_PREFIX + k: v for k, v in state.items()}, adapter_name=name)
