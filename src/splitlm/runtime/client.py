"""The client runtime: steps 2, 6 and 10 (head forward, tail forward + loss + backward, head backward).

The client owns its data, its head (and in U-shape its tail, labels and loss) and talks to the server only
through a ``Channel`` (its mods around a transport). One optimizer step is a schedule of operations
(``runtime/schedule.py``) that ``train_step`` executes; requests are submitted and awaited as separate
operations, so a schedule decides what overlaps. Plugins (``runtime/plugins.py``) hook into the client's own
computation: its input tokens, rows, labels, logits, loss terms, how its head learns, its evaluation and its
optimizer step. The non-IID remedies (``splitlm/remedies/``) act only through them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from splitlm import progress
from splitlm.data import Batch, Example, collate
from splitlm.models.split import SplitMode, Stage
from splitlm.peft import load_trainable, load_trainable_state, save_trainable, trainable_parameters, trainable_state
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.plugins import ClientPlugin, Micro, Plugins
from splitlm.runtime.rng import seeded
from splitlm.runtime.schedule import Op, OpKind, serial
from splitlm.transport import ByteMeter, Channel, Message

Schedule = Callable[[int, bool, bool], list[Op]]  # (micro-batches, ushape, waits for step 9) -> ops
# The client's own computation (what a plugin's ``on_compute`` sees, e.g. a simulated slower device); sending
# and awaiting are the link's and the server's time. STEP is left out: it waits for the server's reply (at a
# barrier, for other clients too), and the client's own optimizer step on its adapters is small.
COMPUTE_OPS = frozenset({OpKind.HEAD_FORWARD, OpKind.TAIL, OpKind.HEAD_BACKWARD})


@dataclass
class StepStats:
    loss: float  # mean over micro-batches of the per-token loss
    tokens: int  # non-padding input tokens processed
    grad_norm: float
    lr: float
    metrics: dict[str, float] = field(default_factory=dict)  # the plugins' own figures (``step_metrics``)


@dataclass
class EvalStats:
    loss_sum: float
    tokens: int

    @property
    def loss(self) -> float:
        return self.loss_sum / max(self.tokens, 1)


@dataclass
class _Step:
    step: int
    micros: list[Micro]
    waits: bool = True  # asks for the server's gradient at the cut (step 9) and waits for it
    trains: bool = True  # the head learns this step (from the server's gradient or a local loss)
    losses: dict[int, float] = field(default_factory=dict)


class SplitClient:
    def __init__(
        self,
        client_id: str,
        parts: dict[str, nn.Module],
        stages: dict[str, Stage],
        channel: Channel,
        optimizer: PartyOptimizer,
        mode: SplitMode,
        plugins: Sequence[ClientPlugin] = (),
        schedule: Schedule = serial,
        seed: int = 0,
    ) -> None:
        self.client_id = client_id
        self.seed = seed  # with (client, step, micro-batch, part), fixes every random draw of a forward pass
        self.parts = parts  # "head" and, in U-shape, "tail"; possibly peft-wrapped stages
        self.stages = stages
        self.channel = channel
        self.optimizer = optimizer
        self.mode = mode
        self.plugins = Plugins(plugins)
        self.schedule = schedule
        self.head_trainable = bool(trainable_parameters(parts["head"]))

    @property
    def meter(self) -> ByteMeter:
        return self.channel.meter

    def freeze_head(self, frozen: bool) -> None:
        """Stop (or resume) training the head: a frozen head keeps no graph, asks for no gradient at the cut (step 9
        is skipped) and its adapter stays as it is; the tail, if any, trains on (e.g. SplitWiper after warm-up)."""
        self.head_trainable = not frozen and bool(trainable_parameters(self.parts["head"]))

    # --- one optimizer step: a schedule of operations ---------------------------------------------------

    def train_step(self, step: int, micro_batches: list[Batch]) -> StepStats:
        for part in self.parts.values():
            part.train()
        for p in self.optimizer.params:  # a step interrupted earlier (a lost server) may have left gradients
            p.grad = None
        device, scale = self.stages["head"].device, 1.0 / len(micro_batches)
        micros = [
            Micro((self.client_id, step, i), b.to(device), scale, train_logits=self.plugins.train_logits)
            for i, b in enumerate(micro_batches)
        ]
        state = _Step(
            step,
            micros,
            waits=self.head_trainable and self.plugins.waits(step),
            trains=self.head_trainable and self.plugins.trains_head(step),
        )
        handlers = {
            OpKind.HEAD_FORWARD: self._head_forward,
            OpKind.SEND_FORWARD: self._send_forward,
            OpKind.AWAIT_FORWARD: self._await_forward,
            OpKind.TAIL: self._tail_step,
            OpKind.SEND_BACKWARD: self._send_backward,
            OpKind.AWAIT_BACKWARD: self._await_backward,
            OpKind.HEAD_BACKWARD: self._head_backward,
        }
        stats: StepStats | None = None
        for op in self.schedule(len(micro_batches), self.mode == "ushape", state.waits):
            started = time.perf_counter()
            if op.kind is OpKind.STEP:
                stats = self._step(state)
            else:
                handlers[op.kind](state, state.micros[op.micro], op.micro)
            if op.kind in COMPUTE_OPS:
                self.plugins.on_compute(time.perf_counter() - started)
        assert stats is not None, "a schedule ends with STEP"
        return stats

    def _head_forward(self, state: _Step, m: Micro, micro: int) -> None:
        """Step 2: the head's output for micro-batch ``micro`` and the message that carries it (step 3)."""
        with torch.set_grad_enabled(state.trains):  # a head that does not learn this step keeps no graph
            m.hidden = self._head(m.batch, m.key, training=True)
        m.labels = self.plugins.labels(state.step, m.batch.labels)  # after on_forward has reseeded the plugins
        keep = self.plugins.rows(m)  # e.g. only the most informative rows cross the wire
        if keep is not None:
            keep = keep.to(m.hidden.device)
            m.batch = Batch(m.batch.input_ids[keep], m.batch.attention_mask[keep], m.batch.labels[keep])
            m.hidden, m.labels = m.hidden[keep], m.labels[keep]
        self.plugins.on_batch(m.key, m.batch)
        m.message = self._head_message(
            "forward", state.step, micro, m.hidden, m.batch, m.labels, scale=m.scale, want_grad=state.waits
        )

    def _send_forward(self, state: _Step, m: Micro, micro: int) -> None:
        assert m.message is not None
        m.pending = self.channel.submit(m.message)

    def _await_forward(self, state: _Step, m: Micro, micro: int) -> None:
        assert m.pending is not None
        exchange = m.pending.result()
        reply = m.reply = exchange.reply
        m.sent = exchange.sent.get("hidden")
        m.pending = None
        if self.mode == "vanilla":
            state.losses[micro] = float(reply.meta["loss_sum"]) / max(int(reply.meta["tokens"]), 1)
            m.grad = reply.tensors.get("grad")
        else:
            m.trunk_out = reply.tensors["hidden"].to(self.stages["tail"].dtype)
            m.trunk_out.requires_grad_(bool(reply.meta.get("needs_grad", True)))  # a fresh leaf on this side

    def _tail_step(self, state: _Step, m: Micro, micro: int) -> None:
        """Step 6: tail forward, loss (on the plugins' training logits) and backward down to the trunk output; the
        step's reported loss is the one the client trains on."""
        assert m.trunk_out is not None and m.labels is not None
        stage = self.stages["tail"]
        with seeded(self.seed, self.client_id, state.step, micro, "tail", devices=(stage.device,)):
            logits = self.plugins.train_logits(self._tail(m.trunk_out, m.batch))
        total, count = causal_lm_loss(logits, m.labels)
        state.losses[micro] = total.item() / max(count, 1)
        if count and total.requires_grad:  # a plugin may weigh the split path's loss, and so step 7
            (total / count * self.plugins.global_scale(m.scale)).backward()
        if m.trunk_out.requires_grad:
            m.grad_up = m.trunk_out.grad if m.trunk_out.grad is not None else torch.zeros_like(m.trunk_out)

    def _send_backward(self, state: _Step, m: Micro, micro: int) -> None:
        """Step 7: the gradient of the trunk output goes back (unless the server said it needs none)."""
        if m.grad_up is not None:
            m.pending = self.channel.submit(Message("backward", self.client_id, state.step, micro, {"grad": m.grad_up}))

    def _await_backward(self, state: _Step, m: Micro, micro: int) -> None:
        if m.pending is not None:
            m.grad = m.pending.result().reply.tensors.get("grad")
            m.pending = None

    def _head_backward(self, state: _Step, m: Micro, micro: int) -> None:
        """Step 10: one backward of the head's own loss, the gradient the server returned, any plugin's extra
        loss and the plugins' terms of this micro-batch (which may train the tail even when the head does not)."""
        assert m.hidden is not None and m.labels is not None
        outputs: list[torch.Tensor] = []
        grads: list[torch.Tensor | None] = []
        if m.hidden.requires_grad:
            local = self.plugins.own_loss(m.hidden, m.labels, m.scale)
            if local is not None:
                outputs.append(local)
                grads.append(None)
            if m.grad is not None and m.sent is not None:
                if self.plugins.follows_server(state.step):
                    outputs.append(m.sent)
                    grads.append(m.grad.to(device=m.sent.device, dtype=m.sent.dtype))
                else:  # e.g. align a local loss's auxiliary part to the server's gradient
                    self.plugins.observe(m.hidden, m.labels, m.grad, m.scale)
            if self.plugins.wants_embeddings:
                embeddings = self.stages["head"].embed_tokens(m.batch.input_ids).detach()  # (B, T, d)
                extra = self.plugins.extra_loss(embeddings, m.hidden, m.batch.attention_mask)
                if extra is not None and extra.requires_grad:
                    outputs.append(extra * m.scale)
                    grads.append(None)
        for term in self.plugins.head_losses(m):
            outputs.append(term)
            grads.append(None)
        if outputs:
            torch.autograd.backward(outputs, grads)

    def _step(self, state: _Step) -> StepStats:
        """Clip by the global gradient norm (the server adds its own share) and step together with the server."""
        for m in state.micros:  # acknowledgements of gradients sent without waiting for step 9 (long since here)
            if m.pending is not None:
                m.pending.result()
                m.pending = None
        if not self.plugins.keeps_gradients(state.step):  # e.g. a probe's fake labels must not train the client
            for p in self.optimizer.params:
                p.grad = None
        exchange = self.channel.request(
            Message("step", self.client_id, state.step, 0, {}, {"grad_sq_norm": self.optimizer.grad_sq_norm()})
        )
        meta = exchange.reply.meta
        self.optimizer.step(float(meta["clip"]))
        self.plugins.after_step(state.step)
        losses = [state.losses[m] for m in sorted(state.losses)]
        return StepStats(
            loss=sum(losses) / len(losses),
            tokens=sum(int(m.batch.attention_mask.sum()) for m in state.micros),
            grad_norm=float(meta["grad_norm"]),
            lr=float(meta["lr"]) if self.optimizer.optimizer is None else self.optimizer.lr(),
            metrics=self.plugins.step_metrics(state.step),
        )

    # --- the parts ---------------------------------------------------------------------------------------

    def _head(self, batch: Batch, key: tuple[str, int, int], training: bool = False) -> torch.Tensor:
        """Step 2: the head's output (B, T, d) on the input ids the plugins let through; ``key`` (client, step,
        micro-batch; step -1 when evaluating) fixes the random draws of the plugins and, training, the head's."""
        self.plugins.on_forward(key, training)
        input_ids = self.plugins.tokens(batch.input_ids, batch.attention_mask)
        if not training:
            return self._head_on(input_ids, batch.attention_mask)
        with seeded(self.seed, *key, "head", devices=(self.stages["head"].device,)):
            return self._head_on(input_ids, batch.attention_mask)

    def _head_on(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """The head on ``input_ids``, or on their token vectors as the plugins rewrite them (``embeddings``)."""
        if not self.plugins.rewrites_embeddings:
            return self.parts["head"](input_ids=input_ids, attention_mask=attention_mask)
        vectors = self.stages["head"].embed_tokens(input_ids)  # (B, T, d)
        vectors = self.plugins.embeddings(vectors, input_ids, attention_mask)
        return self.parts["head"](inputs_embeds=vectors, attention_mask=attention_mask)

    def _head_message(
        self,
        kind: str,
        step: int,
        micro: int,
        hidden: torch.Tensor,
        batch: Batch,
        labels: torch.Tensor,
        **meta: float | bool,
    ) -> Message:
        tensors = {"hidden": hidden, "attention_mask": batch.attention_mask}
        if self.mode == "vanilla":
            tensors["labels"] = labels  # vanilla SL: labels travel to the server
        return Message(kind, self.client_id, step, micro, tensors, dict(meta))

    def _tail(self, hidden: torch.Tensor, batch: Batch) -> torch.Tensor:
        stage = self.stages["tail"]
        return self.parts["tail"](
            hidden_states=hidden.to(device=stage.device, dtype=stage.dtype),
            attention_mask=batch.attention_mask,
        )

    # --- evaluation --------------------------------------------------------------------------------------

    @torch.no_grad()
    def evaluate(self, batches: list[Batch], step: int = -1) -> EvalStats:
        for part in self.parts.values():
            part.eval()
        loss_sum, count = 0.0, 0
        for micro, batch in enumerate(progress.bar(batches, desc=f"client {self.client_id} evaluating", unit="batch")):
            batch = batch.to(self.stages["head"].device)
            hidden = self._head(batch, (self.client_id, step, micro))
            logits = self.plugins.local_logits(hidden, batch)  # e.g. a personal model's early exit: nothing is sent
            if logits is None:
                message = self._head_message("eval", step, micro, hidden, batch, batch.labels)
                reply = self.channel.request(message).reply
                if self.mode == "vanilla":
                    loss_sum += float(reply.meta["loss_sum"])
                    count += int(reply.meta["tokens"])
                    continue
                logits = self._tail(reply.tensors["hidden"], batch)
            total, tokens = causal_lm_loss(logits, batch.labels)
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
        hidden = self._head(batch, (self.client_id, -1, 0))
        logits = self.plugins.local_logits(hidden, batch)
        if logits is not None:
            losses = row_losses(logits, batch.labels)
        else:
            message = self._head_message("eval", -1, 0, hidden, batch, batch.labels, per_row=True)
            reply = self.channel.request(message).reply
            if self.mode == "vanilla":
                losses = reply.tensors["row_loss"]
            else:
                losses = row_losses(self._tail(reply.tensors["hidden"], batch), batch.labels)
        for part in self.parts.values():
            part.train()
        return [float(x) for x in losses]

    # --- state -------------------------------------------------------------------------------------------

    def state(self) -> dict[str, torch.Tensor]:
        """The client-side trainable tensors (head and tail adapters), under unsplit-model names."""
        return {k: v for part in self.parts.values() for k, v in trainable_state(part).items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        for name, part in self.parts.items():
            own = trainable_state(part)
            if own:
                load_trainable_state(part, {k: state[k] for k in own if k in state}, f"client {self.client_id} {name}")

    def snapshot(self) -> dict[str, Any]:
        """The client-side tensors and optimizer state, in memory (to roll a failed round back)."""
        return {"state": {k: v.clone() for k, v in self.state().items()}, "optimizer": self.optimizer.snapshot()}

    def restore(self, snapshot: dict[str, Any]) -> None:
        self.load_state(snapshot["state"])
        self.optimizer.restore(snapshot["optimizer"])

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        folder.mkdir(parents=True, exist_ok=True)
        for name, part in self.parts.items():
            if trainable_parameters(part):
                save_trainable(part, folder / f"{name}.safetensors")
        self.plugins.save(folder)  # e.g. a defense's trained noise scales
        if with_optimizer:
            self.optimizer.save(folder)

    def load(self, folder: Path) -> None:
        for name, part in self.parts.items():
            if trainable_parameters(part):
                load_trainable(part, folder / f"{name}.safetensors")
        self.plugins.load(folder)
        self.optimizer.load(folder)
