"""One party's optimizer: AdamW, a warmup schedule, and its share of global gradient-norm clipping.

Clipping the *global* norm (over client and server parameters together) keeps a split run identical to the
centralized one; each party sends only the sum of squares of its own gradients, one float.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from transformers import get_scheduler

from splitlm.config.schema import TrainConfig
from splitlm.errors import CheckpointError


class PartyOptimizer:
    def __init__(self, params: list[nn.Parameter], train: TrainConfig, lr_scale: float = 1.0) -> None:
        self.params = params
        self.max_grad_norm = train.max_grad_norm
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler: torch.optim.lr_scheduler.LRScheduler | None = None
        if params:
            self.optimizer = torch.optim.AdamW(params, lr=train.lr * lr_scale, weight_decay=train.weight_decay)
            self.scheduler = get_scheduler(
                train.schedule if train.schedule != "constant" else "constant_with_warmup",
                self.optimizer,
                num_warmup_steps=train.warmup_steps,
                num_training_steps=train.steps,
            )

    def grad_sq_norm(self) -> float:
        """Sum of squared gradient entries over this party's parameters (0 where there are none)."""
        grads = [p.grad for p in self.params if p.grad is not None]
        if not grads:
            return 0.0
        return float(sum(torch.linalg.vector_norm(g.detach().float()) ** 2 for g in grads))

    def clip_coefficient(self, total_sq_norm: float) -> float:
        """The factor ``torch.nn.utils.clip_grad_norm_`` would apply for this global norm."""
        if not self.max_grad_norm:
            return 1.0
        return min(1.0, self.max_grad_norm / (math.sqrt(total_sq_norm) + 1e-6))

    def step(self, coefficient: float) -> None:
        if self.optimizer is None or self.scheduler is None:
            return
        if coefficient != 1.0:
            for p in self.params:
                if p.grad is not None:
                    p.grad.mul_(coefficient)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)

    def fast_forward(self, steps: int) -> None:
        """Put the learning-rate schedule where it would be after ``steps`` optimizer steps."""
        if self.optimizer is None or self.scheduler is None:
            return
        self.scheduler.last_epoch = steps
        for group, base, factor in zip(
            self.optimizer.param_groups, self.scheduler.base_lrs, self.scheduler.lr_lambdas, strict=True
        ):
            group["lr"] = base * factor(steps)
        self.scheduler._last_lr = [group["lr"] for group in self.optimizer.param_groups]  # type: ignore[attr-defined]

    def lr(self) -> float:
        return float(self.optimizer.param_groups[0]["lr"]) if self.optimizer else 0.0

    # --- in memory, to roll a failed round back ---------------------------------------------------------

    def snapshot(self) -> dict[str, Any] | None:
        if self.optimizer is None or self.scheduler is None:
            return None
        return {"optimizer": copy.deepcopy(self.optimizer.state_dict()), "scheduler": self.scheduler.state_dict()}

    def restore(self, snapshot: dict[str, Any] | None) -> None:
        if self.optimizer is None or self.scheduler is None or snapshot is None:
            return
        self.optimizer.load_state_dict(copy.deepcopy(snapshot["optimizer"]))
        self.scheduler.load_state_dict(snapshot["scheduler"])
        self.optimizer.zero_grad(set_to_none=True)

    # --- checkpoints: tensors as safetensors, the rest as JSON; never pickle -------------------------

    def save(self, folder: Path) -> None:
        if self.optimizer is None or self.scheduler is None:
            return
        state = self.optimizer.state_dict()
        tensors: dict[str, torch.Tensor] = {}
        scalars: dict[str, dict[str, float]] = {}
        for index, entry in state["state"].items():
            for key, value in entry.items():
                if torch.is_tensor(value):
                    tensors[f"{index}.{key}"] = value.detach().cpu().contiguous()
                else:
                    scalars.setdefault(str(index), {})[key] = value
        save_file(tensors, str(folder / "optimizer.safetensors"))
        meta = {
            "param_groups": state["param_groups"],
            "scalars": scalars,
            "scheduler_last_epoch": self.scheduler.last_epoch,
        }
        (folder / "optimizer.json").write_text(json.dumps(meta))

    def load(self, folder: Path) -> None:
        if self.optimizer is None or self.scheduler is None:
            return
        try:
            tensors = load_file(str(folder / "optimizer.safetensors"))
            meta = json.loads((folder / "optimizer.json").read_text())
        except (OSError, ValueError) as error:
            raise CheckpointError(
                f"{folder}: optimizer state unreadable ({error}); resume from another checkpoint"
            ) from None
        per_param: dict[int, dict[str, object]] = {}
        for key, value in tensors.items():
            index, name = key.split(".", 1)
            per_param.setdefault(int(index), {})[name] = value
        for index, entries in meta["scalars"].items():
            per_param.setdefault(int(index), {}).update(entries)
        if len(meta["param_groups"]) != len(self.optimizer.param_groups):
            raise CheckpointError(f"{folder}: optimizer has a different number of parameter groups")
        self.optimizer.load_state_dict({"state": per_param, "param_groups": meta["param_groups"]})
        # The schedule's position is restored, its shape is this run's: a resume that changed the run's length
        # goes on with the new schedule at the same step (the same learning rate where the length is the same).
        self.fast_forward(int(meta["scheduler_last_epoch"]))
