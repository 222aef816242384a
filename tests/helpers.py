"""Test harnesses shared across test modules: a run stopped by Ctrl-C (or a hard stop) at a chosen step, and the
gradients an optimizer steps on."""

from __future__ import annotations

import os
import signal

import pytest
import torch

from splitlm.config import Config
from splitlm.errors import Interrupted
from splitlm.frameworks import run_framework
from splitlm.runtime.client import SplitClient
from splitlm.runtime.optim import PartyOptimizer


def interrupt_run(
    config: Config,
    step: int,
    client_id: str | None = None,
    hard: bool = False,
    match: str | None = None,
    client_class: type = SplitClient,
) -> None:
    """Run ``config`` and stop it when client ``client_id`` (any client, if None) starts its 0-based ``step``:
    Ctrl-C (SIGINT: the run finishes that step, checkpoints and raises ``Interrupted``, whose message must match
    ``match``), or ``hard`` (``KeyboardInterrupt`` mid-step: a resume goes back to the last checkpoint)."""
    real_step = client_class.train_step

    def interrupted(self, at: int, micro_batches):
        if at == step and (client_id is None or self.client_id == client_id):
            if hard:
                raise KeyboardInterrupt
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self, at, micro_batches)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(client_class, "train_step", interrupted)
        with pytest.raises(KeyboardInterrupt if hard else Interrupted, match=match):
            run_framework(config)


def capture_grads(optimizer: PartyOptimizer, into: list[torch.Tensor | None]) -> None:
    """Record into ``into`` the gradients ``optimizer`` steps on (before clipping), every step."""
    original = optimizer.step

    def step(coefficient: float) -> None:
        into.extend(None if p.grad is None else p.grad.clone() for p in optimizer.params)
        original(coefficient)

    optimizer.step = step  # type: ignore[method-assign]
