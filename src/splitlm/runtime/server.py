"""The server runtime: steps 4 and 8 (trunk forward and backward), and the loss in a vanilla split.

The server sees only messages. It keeps, per (client, step, micro-batch), the graph of a trunk forward
until the matching backward arrives; everything else it needs travels in the message.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch
from torch import nn

from splitlm.errors import ProtocolError
from splitlm.models.split import SplitMode, Stage
from splitlm.peft import load_trainable, save_trainable, trainable_parameters
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.optim import PartyOptimizer
from splitlm.transport.messages import Message


class SplitServer:
    def __init__(self, trunk: nn.Module, stage: Stage, optimizer: PartyOptimizer, mode: SplitMode) -> None:
        self.trunk = trunk  # the stage, possibly wrapped by peft
        self.stage = stage
        self.optimizer = optimizer
        self.mode = mode
        self.hidden_size = int(stage.config.hidden_size)
        self.trainable = bool(trainable_parameters(trunk))
        self._pending: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}

    def handle(self, message: Message) -> Message:
        handlers = {
            "forward": self._forward,
            "backward": self._backward,
            "step": self._step,
            "eval": self._eval,
        }
        handler = handlers.get(message.kind)
        if handler is None:
            raise ProtocolError(f"unknown request kind {message.kind!r}; expected one of {sorted(handlers)}")
        return handler(message)

    # --- validation of what a client sent --------------------------------------------------------------

    def _tensor(self, message: Message, name: str) -> torch.Tensor:
        tensor = message.tensors.get(name)
        if tensor is None:
            raise ProtocolError(f"{message.kind} from {message.client_id}: missing tensor {name!r}")
        return tensor

    def _inputs(self, message: Message) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        hidden = self._tensor(message, "hidden")
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ProtocolError(
                f"{message.kind} from {message.client_id}: hidden has shape {tuple(hidden.shape)}, "
                f"expected (batch, tokens, {self.hidden_size})"
            )
        if not torch.isfinite(hidden).all():
            raise ProtocolError(f"{message.kind} from {message.client_id}: hidden contains NaN or Inf")
        mask = message.tensors.get("attention_mask")
        positions = message.tensors.get("position_ids")
        for name, value in (("attention_mask", mask), ("position_ids", positions)):
            if value is not None and value.shape != hidden.shape[:2] and value.shape != (1, hidden.shape[1]):
                raise ProtocolError(
                    f"{message.kind} from {message.client_id}: {name} has shape {tuple(value.shape)}, "
                    f"expected {tuple(hidden.shape[:2])}"
                )
        device = self.stage.device
        return (
            hidden.to(device=device, dtype=self.stage.dtype),
            None if mask is None else mask.to(device),
            None if positions is None else positions.to(device),
        )

    def _labels(self, message: Message, hidden: torch.Tensor) -> torch.Tensor:
        labels = self._tensor(message, "labels")
        if labels.shape != hidden.shape[:2] or labels.dtype not in (torch.int64, torch.int32):
            raise ProtocolError(
                f"{message.kind} from {message.client_id}: labels have shape {tuple(labels.shape)} and dtype "
                f"{labels.dtype}, expected integer labels of shape {tuple(hidden.shape[:2])}"
            )
        return labels.to(hidden.device)

    # --- handlers --------------------------------------------------------------------------------------

    def _run_trunk(self, message: Message, hidden: torch.Tensor, mask, positions) -> torch.Tensor:
        return self.trunk(hidden_states=hidden, attention_mask=mask, position_ids=positions)

    def _forward(self, message: Message) -> Message:
        hidden, mask, positions = self._inputs(message)
        labels = self._labels(message, hidden) if self.mode == "vanilla" else None
        want_grad = bool(message.meta.get("want_grad", True))
        hidden = hidden.detach().requires_grad_(want_grad)  # a fresh leaf: the graph starts here
        self.trunk.train()
        out = self._run_trunk(message, hidden, mask, positions)  # (B, T, d) or logits (B, T, V)
        key = (message.client_id, message.step, message.micro)
        if self.mode == "ushape":
            self._pending[key] = (hidden, out)
            return Message(
                "activations",
                message.client_id,
                message.step,
                message.micro,
                {"hidden": out},
                {"needs_grad": out.requires_grad},
            )
        total, count = causal_lm_loss(out, labels)
        if out.requires_grad and count:
            (total / count * float(message.meta.get("scale", 1.0))).backward()
        tensors = {"grad": hidden.grad} if want_grad and hidden.grad is not None else {}
        return Message(
            "loss",
            message.client_id,
            message.step,
            message.micro,
            tensors,
            {"loss_sum": total.item(), "tokens": count},
        )

    def _backward(self, message: Message) -> Message:
        key = (message.client_id, message.step, message.micro)
        pending = self._pending.get(key)
        if pending is None:
            raise ProtocolError(
                f"backward from {message.client_id} for step {message.step} micro-batch {message.micro} "
                "has no matching forward; send forward first"
            )
        hidden, out = pending
        grad = self._tensor(message, "grad")
        if grad.shape != out.shape:
            raise ProtocolError(f"backward: grad has shape {tuple(grad.shape)}, expected {tuple(out.shape)}")
        if not torch.isfinite(grad).all():
            raise ProtocolError(f"backward from {message.client_id}: grad contains NaN or Inf")
        del self._pending[key]  # only a valid gradient consumes the forward; a rejected one may be retried
        out.backward(grad.to(device=out.device, dtype=out.dtype))
        tensors = {"grad": hidden.grad} if hidden.grad is not None else {}
        return Message("gradients", message.client_id, message.step, message.micro, tensors)

    def _step(self, message: Message) -> Message:
        total = float(message.meta.get("grad_sq_norm", 0.0)) + self.optimizer.grad_sq_norm()
        coefficient = self.optimizer.clip_coefficient(total)
        self.optimizer.step(coefficient)
        return Message(
            "stepped",
            message.client_id,
            message.step,
            0,
            {},
            {"grad_norm": math.sqrt(total), "clip": coefficient, "lr": self.optimizer.lr()},
        )

    @torch.no_grad()
    def _eval(self, message: Message) -> Message:
        hidden, mask, positions = self._inputs(message)
        self.trunk.eval()
        out = self._run_trunk(message, hidden, mask, positions)
        self.trunk.train()
        if self.mode == "ushape":
            return Message("activations", message.client_id, message.step, message.micro, {"hidden": out})
        total, count = causal_lm_loss(out, self._labels(message, hidden))
        return Message(
            "loss",
            message.client_id,
            message.step,
            message.micro,
            {},
            {"loss_sum": float(total), "tokens": count},
        )

    # --- state -----------------------------------------------------------------------------------------

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        if self.trainable:
            save_trainable(self.trunk, folder / "trunk.safetensors")
        if with_optimizer:
            self.optimizer.save(folder)

    def load(self, folder: Path) -> None:
        if self.trainable:
            load_trainable(self.trunk, folder / "trunk.safetensors")
        self.optimizer.load(folder)
