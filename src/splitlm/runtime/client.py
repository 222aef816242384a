"""The client runtime: steps 2, 6 and 10 (head forward, tail forward + loss + backward, head backward).

The client owns its data, its head (and in U-shape its tail, labels and loss) and talks to the server
only through a ``Transport``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import torch
from torch import nn

from splitlm.data import Batch, Example, collate
from splitlm.models.split import SplitMode, Stage
from splitlm.peft import load_trainable, load_trainable_state, save_trainable, trainable_parameters, trainable_state
from splitlm.privacy.defenses.base import DefenseChain
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.optim import PartyOptimizer
from splitlm.transport import Message, Transport


@dataclass
class StepStats:
    loss: float  # mean over micro-batches of the per-token loss
    tokens: int  # non-padding input tokens processed
    grad_norm: float
    lr: float


@dataclass
class EvalStats:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


class Guard(Protocol):
    """A client-side detector of a malicious server (``splitlm.privacy.detect``)."""

    def is_probe(self, step: int) -> bool: ...

    def fake_labels(self, labels: torch.Tensor) -> torch.Tensor: ...

    def observe(self, step: int, grad: torch.Tensor, attention_mask: torch.Tensor, probe: bool) -> None: ...

    def check(self, step: int) -> None: ...  # raises HijackAlarm when it concludes and is told to stop


TruthHook = Callable[[tuple[str, int, int], torch.Tensor, torch.Tensor], None]


class SplitClient:
    def __init__(
        self,
        client_id: str,
        parts: dict[str, nn.Module],
        stages: dict[str, Stage],
        transport: Transport,
        optimizer: PartyOptimizer,
        mode: SplitMode,
        defense: DefenseChain | None = None,
        guard: Guard | None = None,
        truth: TruthHook | None = None,
    ) -> None:
        self.client_id = client_id
        self.parts = parts  # "head" and, in U-shape, "tail"; possibly peft-wrapped stages
        self.stages = stages
        self.transport = transport
        self.optimizer = optimizer
        self.mode = mode
        self.head_trainable = bool(trainable_parameters(parts["head"]))
        self.defense = defense or DefenseChain([])
        self.guard = guard
        self.truth = truth  # audit only: records the true tokens of the batches a server tap keeps

    def _send(self, kind: str, step: int, micro: int, tensors: dict[str, torch.Tensor], **meta) -> Message:
        return self.transport.request(Message(kind, self.client_id, step, micro, tensors, meta))

    def _head_message(self, batch: Batch, hidden: torch.Tensor, labels: torch.Tensor) -> dict[str, torch.Tensor]:
        tensors = {"hidden": hidden, "attention_mask": batch.attention_mask}
        if self.mode == "vanilla":
            tensors["labels"] = self.defense.labels(labels)  # vanilla SL: labels travel to the server
        return tensors

    def _head(self, batch: Batch) -> tuple[torch.Tensor, torch.Tensor]:
        """Steps 2-3 on the client: (head output, what is sent after the defenses), both (B, T, d)."""
        input_ids = self.defense.tokens(batch.input_ids, batch.attention_mask)
        hidden = self.parts["head"](input_ids=input_ids, attention_mask=batch.attention_mask)
        return hidden, self.defense.smashed(hidden, batch.attention_mask)

    def _tail(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        stage = self.stages["tail"]
        return self.parts["tail"](
            hidden_states=hidden.to(device=stage.device, dtype=stage.dtype),
            attention_mask=batch.attention_mask,
        )

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        for part in self.parts.values():
            part.train()
        for p in self.optimizer.params:  # a step interrupted earlier (a lost server) may have left gradients
            p.grad = None
        scale = 1.0 / len(micro_batches)
        losses: list[float] = []
        tokens = 0
        probe = self.guard is not None and self.guard.is_probe(step)
        for micro, batch in enumerate(micro_batches):
            batch = batch.to(self.stages["head"].device)
            tokens += int(batch.attention_mask.sum())
            if self.truth is not None:
                self.truth((self.client_id, step, micro), batch.input_ids, batch.attention_mask)
            labels = self.guard.fake_labels(batch.labels) if probe and self.guard is not None else batch.labels
            hidden, sent = self._head(batch)  # (B,T,d)
            reply = self._send(
                "forward",
                step,
                micro,
                self._head_message(batch, sent, labels),
                scale=scale,
                want_grad=self.head_trainable,
            )
            if self.mode == "vanilla":
                losses.append(float(reply.meta["loss_sum"]) / max(int(reply.meta["tokens"]), 1))
            else:
                trunk_out = reply.tensors["hidden"].to(self.stages["tail"].dtype)
                needs_grad = bool(reply.meta.get("needs_grad", True))
                trunk_out.requires_grad_(needs_grad)  # a fresh leaf on this side of the cut
                total, count = causal_lm_loss(self._tail(trunk_out, batch), labels)
                losses.append(total.item() / max(count, 1))
                if count and total.requires_grad:
                    (total / count * scale).backward()
                if needs_grad:
                    grad = trunk_out.grad if trunk_out.grad is not None else torch.zeros_like(trunk_out)
                    grad = self.defense.grad_up(grad, batch.attention_mask)  # step 7 defenses
                    reply = self._send("backward", step, micro, {"grad": grad})
            self._head_backward(step, batch, hidden, sent, reply.tensors.get("grad"), scale, probe)
        if probe:  # a probe's fake labels must not train the client's own parts
            for p in self.optimizer.params:
                p.grad = None
        reply = self._send("step", step, 0, {}, grad_sq_norm=self.optimizer.grad_sq_norm())
        self.optimizer.step(float(reply.meta["clip"]))
        if self.guard is not None:
            self.guard.check(step)
        return StepStats(
            loss=sum(losses) / len(losses),
            tokens=tokens,
            grad_norm=float(reply.meta["grad_norm"]),
            lr=float(reply.meta["lr"]) if self.optimizer.optimizer is None else self.optimizer.lr(),
        )

    def _head_backward(
        self,
        step: int,
        batch: Batch,
        hidden: torch.Tensor,
        sent: torch.Tensor,
        grad: torch.Tensor | None,
        scale: float,
        probe: bool,
    ) -> None:
        """Step 10: the head's backward from the gradient the server returned (+ any defense's own loss)."""
        if grad is not None:
            grad = grad.to(device=sent.device, dtype=sent.dtype)
            if self.guard is not None:  # the detector judges what the server sent, before the client's own noise
                self.guard.observe(step, grad, batch.attention_mask, probe)
            grad = self.defense.grad_down(grad, batch.attention_mask)
        if not hidden.requires_grad:
            return
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if grad is not None and sent.requires_grad:
            outputs.append(sent)
            grads.append(grad)
        if self.defense.wants_embeddings:
            embeddings = self.stages["head"].embed_tokens(batch.input_ids).detach()  # (B, T, d)
            extra = self.defense.extra_loss(embeddings, hidden, batch.attention_mask)
            if extra is not None and extra.requires_grad:
                outputs.append(extra * scale)
                grads.append(None)
        if outputs:
            torch.autograd.backward(outputs, grads)

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], step: int = -1) -> EvalStats:
        for part in self.parts.values():
            part.eval()
        loss_sum, count = 0.0, 0
        for micro, batch in enumerate(batches):
            batch = batch.to(self.stages["head"].device)
            _, sent = self._head(batch)
            reply = self._send("eval", step, micro, self._head_message(batch, sent, batch.labels))
            if self.mode == "vanilla":
                loss_sum += float(reply.meta["loss_sum"])
                count += int(reply.meta["tokens"])
            else:
                total, tokens = causal_lm_loss(self._tail(reply.tensors["hidden"], batch), batch.labels)
                loss_sum += float(total)
                count += tokens
        for part in self.parts.values():
            part.train()
        return EvalStats(loss_sum, count)

    @torch.no_grad()
    def sequence_losses(self, examples: list[Example], pad_id: int) -> list[float]:
        """Summed loss of each example's loss tokens (scores candidate responses for accuracy)."""
        for part in self.parts.values():
            part.eval()
        batch = collate(examples, pad_id).to(self.stages["head"].device)
        _, sent = self._head(batch)
        reply = self._send("eval", -1, 0, self._head_message(batch, sent, batch.labels), per_row=True)
        if self.mode == "vanilla":
            losses = reply.tensors["row_loss"]
        else:
            losses = row_losses(self._tail(reply.tensors["hidden"], batch), batch.labels)
        for part in self.parts.values():
            part.train()
        return [float(x) for x in losses]

    # --- state -----------------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The client-side trainable tensors (head and tail adapters), under unsplit-model names."""
        return {k: v for part in self.parts.values() for k, v in trainable_state(part).items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self.parts.items():
            own = trainable_state(part)
            if own:
                load_trainable_state(part, {k: state[k] for k in own if k in state}, f"client {self.client_id} {name}")

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in self.parts.items():
            if trainable_parameters(part):
                save_trainable(part, folder / f"{name}.safetensors")
        if with_optimizer:
            self.optimizer.save(folder)

    def load(self, folder: Path) -> None:
        for name, part in self.parts.items():
            if trainable_parameters(part):
                load_trainable(part, folder / f"{name}.safetensors")
        self.optimizer.load(folder)
