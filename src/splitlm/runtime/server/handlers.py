"""What each request does to the trunk: steps 4 and 8 (trunk forward and backward), the loss in a vanilla split,
evaluation, and the optimizer step at a barrier.

A graph of a trunk forward is kept per (client, step, micro-batch) until the matching backward arrives. An
optimizer step on an adapter shared by a barrier of n clients (parallel SL) happens when the n-th client's
``step`` arrives; the earlier ones get their reply then. On such an adapter each client's backwards accumulate
into gradients of its own, summed in client order at the step, so the update does not depend on the order the
requests arrived in. ``abandon`` stops a round's steps (the waiting ones fail) until ``restore`` rolls it back;
``forget`` drops what a vanished client left half done.

The handlers run on the worker (one request at a time). Server-side pieces that take some requests over (merged
passes, ``merge.MergedPasses``) are ``TrunkMod``s: the handlers offer them each request first, tell them of
steps and of dropped rounds and clients, and count the trunk graphs they keep; they know nothing else of them.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
from collections.abc import Iterator, Sequence
from concurrent.futures import Future
from typing import Protocol

import torch

from splitlm.errors import ProtocolError, SplitLMError
from splitlm.models.split import Stage
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.rng import seeded
from splitlm.runtime.scheduling import Request
from splitlm.runtime.server.router import Router, Snapshot
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)

Key = tuple[str, int, int]  # (client, step, micro-batch)


def resolve(future: Future[Message], outcome: Message | BaseException) -> None:
    """Answer a request unless its asker gave up (a closed stream cancels the future); never raise."""
    if future.done():
        return
    try:
        if isinstance(outcome, BaseException):
            future.set_exception(outcome)
        else:
            future.set_result(outcome)
    except concurrent.futures.InvalidStateError:  # cancelled in between
        pass


# --- validation of what a client sent ------------------------------------------------------------------------


def tensor_of(message: Message, name: str) -> torch.Tensor:
    tensor = message.tensors.get(name)
    if tensor is None:
        raise ProtocolError(f"{message.kind} from {message.client_id}: missing tensor {name!r}")
    return tensor


def trunk_inputs(message: Message, stage: Stage) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """A forward's (or eval's) hidden (B, T, d), attention mask and position ids, checked against the trunk's
    width and moved to its device."""
    width = stage.in_width
    hidden = tensor_of(message, "hidden")
    if hidden.dim() != 3 or hidden.shape[-1] != width:
        raise ProtocolError(
            f"{message.kind} from {message.client_id}: hidden has shape {tuple(hidden.shape)}, "
            f"expected (batch, tokens, {width})"
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
    device = stage.device
    return (
        hidden.to(device=device, dtype=stage.dtype),
        None if mask is None else mask.to(device),
        None if positions is None else positions.to(device),
    )


def labels_of(message: Message, hidden: torch.Tensor) -> torch.Tensor:
    labels = tensor_of(message, "labels")
    if labels.shape != hidden.shape[:2] or labels.dtype not in (torch.int64, torch.int32):
        raise ProtocolError(
            f"{message.kind} from {message.client_id}: labels have shape {tuple(labels.shape)} and dtype "
            f"{labels.dtype}, expected integer labels of shape {tuple(hidden.shape[:2])}"
        )
    return labels.to(hidden.device)


class TrunkMod(Protocol):
    """A server-side piece on the worker that takes some training requests over (merged passes). It answers the
    requests it takes itself (their futures), now or later, through the handlers' parts (``bind``)."""

    def bind(self, handlers: Handlers) -> None:
        """The handlers whose router, barriers and passes it works with (called once, by the handlers)."""
        ...

    def take(self, request: Request) -> bool:
        """Whether it takes ``request`` (a forward, backward or eval) over; False: the handlers serve it."""
        ...

    def stepped(self, adapter: str, complete: bool) -> None:
        """A client's step of ``adapter`` arrived; ``complete``: the barrier's optimizer step runs now."""
        ...

    def graphs(self) -> list[tuple[Key, ...]]:
        """The trunk graphs it keeps waiting for backwards, each as the keys of the requests that wait on it."""
        ...

    def drop(self, adapter: str | None, reason: str, client_id: str | None = None) -> None:
        """Fail and forget what it holds of ``adapter`` (None: of every one) and of ``client_id``'s graphs."""
        ...


class Handlers:
    """The request handlers, their trunk graphs awaiting backwards, and the step barriers."""

    def __init__(self, router: Router, max_pending: int = 0, mods: Sequence[TrunkMod] = ()) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending is {max_pending}; expected 0 (no bound) or a positive count")
        self.router = router
        self.max_pending = max_pending  # trunk graphs waiting for their backward at most (0: no bound)
        self.barriers: dict[str, int] = {}  # adapter -> step messages per optimizer step
        self.pending: dict[Key, tuple[torch.Tensor, torch.Tensor]] = {}  # a forward's (hidden leaf, output)
        # adapter -> the step requests waiting at its barrier (each client's next step: clients left out of
        # a round may be at other step numbers than the rest)
        self.arrivals: dict[str, list[tuple[Request, float]]] = {}
        self.abandoned = False  # a stopped round: steps fail until it is rolled back
        self.gradients: dict[str, list[torch.Tensor | None]] = {}  # client -> its gradients at a barrier
        self.mods = list(mods)
        for mod in self.mods:
            mod.bind(self)
        router.busy = self.busy_clients

    def serve(self, request: Request) -> None:
        """Answer a client's request (its future): at once, or later for a step waiting at its barrier."""
        message = request.message
        handlers = {"forward": self._forward, "backward": self._backward, "eval": self.eval}
        try:
            if message.kind == "step":
                self._step(request)
                return
            if any(mod.take(request) for mod in self.mods):
                return
            handler = handlers.get(message.kind)
            if handler is None:
                raise ProtocolError(
                    f"unknown request kind {message.kind!r}; expected one of {sorted([*handlers, 'step'])}"
                )
            resolve(request.future, handler(message))
        except SplitLMError as error:
            resolve(request.future, error)
        except Exception as error:  # a bug must reach the client, not hang it
            log.exception("request %s from %s failed", message.kind, message.client_id)
            resolve(request.future, error)

    # --- what the worker and the mods ask ---------------------------------------------------------------

    def slot_free(self, message: Message) -> bool:
        """Back-pressure: whether a training forward may run now without more than ``max_pending`` trunk graphs
        waiting for their backward (a retried forward whose graph waits takes no new slot)."""
        if not self.max_pending or self.router.mode != "ushape" or message.key in self.pending:
            return True
        graphs = [graph for mod in self.mods for graph in mod.graphs()]
        if any(message.key in graph for graph in graphs):
            return True
        return len(self.pending) + len(graphs) < self.max_pending

    def busy_clients(self) -> set[str]:
        """Clients whose adapter must stay where it is: a trunk graph awaits their backward, or they hold
        gradients at a barrier."""
        graphs = [key for mod in self.mods for graph in mod.graphs() for key in graph]
        return {key[0] for key in [*self.pending, *graphs]} | set(list(self.gradients))

    def barrier(self, adapter: str) -> int:
        """Step messages per optimizer step of ``adapter``."""
        return self.barriers.get(adapter, 1)

    def stepping(self, adapter: str) -> set[str]:
        """The clients whose step of ``adapter`` waits at its barrier."""
        return {waiting.message.client_id for waiting, _ in self.arrivals.get(adapter, [])}

    @contextlib.contextmanager
    def own_gradients(self, client_id: str) -> Iterator[None]:
        """On an adapter shared at a barrier, a client's backward passes accumulate into gradients of its own,
        summed in client order at the step: the result does not depend on the order requests arrived in."""
        adapter = self.router.adapter_of(client_id)
        if self.barrier(adapter) <= 1:
            yield
            return
        params = self.router.optimizer(adapter).params
        own = self.gradients.get(client_id) or [None] * len(params)
        for p, grad in zip(params, own, strict=True):
            p.grad = grad
        try:
            yield
        finally:
            self.gradients[client_id] = [p.grad for p in params]
            for p in params:
                p.grad = None

    # --- handlers --------------------------------------------------------------------------------------

    def _forward(self, message: Message) -> Message:
        if not self.slot_free(message):  # only without a worker: the worker holds such forwards back
            raise ProtocolError(
                f"forward from {message.client_id}: {len(self.pending)} trunk graphs already wait for their "
                f"backward (max_pending={self.max_pending}); send those backwards first"
            )
        return self.trunk_forward(message)

    def trunk_forward(self, message: Message) -> Message:
        """One client's training forward through the trunk (vanilla: and its loss and backward)."""
        router = self.router
        hidden, mask, positions = trunk_inputs(message, router.stage)
        labels = labels_of(message, hidden) if router.mode == "vanilla" else None
        want_grad = bool(message.meta.get("want_grad", True))
        hidden = hidden.detach().requires_grad_(want_grad)  # a fresh leaf: the graph starts here
        with router.serving(message.client_id) as route:
            router.trunk.train()
            # the trunk's random draws (dropout) are fixed by (client, step, micro-batch), not by arrival order
            with seeded(router.seed, *message.key, "trunk", devices=(router.stage.device,)):
                out = router.run_trunk(route, hidden, mask, positions)  # (B,T,d|V)
            if router.mode == "ushape":
                if out.requires_grad:  # else the client sends no backward (``needs_grad``): nothing to keep
                    self.pending[message.client_id, message.step, message.micro] = (hidden, out)
                return Message(
                    "activations", message.client_id, message.step, message.micro, {"hidden": out},
                    {"needs_grad": out.requires_grad},
                )  # fmt: skip
            assert labels is not None
            total, count = causal_lm_loss(out, labels)
            if out.requires_grad and count:
                with self.own_gradients(message.client_id):
                    (total / count * float(message.meta.get("scale", 1.0))).backward()
        tensors = {"grad": hidden.grad} if want_grad and hidden.grad is not None else {}
        return Message(
            "loss", message.client_id, message.step, message.micro, tensors,
            {"loss_sum": total.item(), "tokens": count},
        )  # fmt: skip

    def _backward(self, message: Message) -> Message:
        key = (message.client_id, message.step, message.micro)
        pending = self.pending.get(key)
        if pending is None:
            raise ProtocolError(
                f"backward from {message.client_id} for step {message.step} micro-batch {message.micro} "
                "has no matching forward; send forward first"
            )
        hidden, out = pending
        grad = tensor_of(message, "grad")
        if grad.shape != out.shape:
            raise ProtocolError(f"backward: grad has shape {tuple(grad.shape)}, expected {tuple(out.shape)}")
        if not torch.isfinite(grad).all():
            raise ProtocolError(f"backward from {message.client_id}: grad contains NaN or Inf")
        del self.pending[key]  # only a valid gradient consumes the forward; a rejected one may be retried
        with self.router.serving(message.client_id), self.own_gradients(message.client_id):
            out.backward(grad.to(device=out.device, dtype=out.dtype))
        tensors = {"grad": hidden.grad} if hidden.grad is not None else {}
        return Message("gradients", message.client_id, message.step, message.micro, tensors)

    @torch.no_grad()
    def eval(self, message: Message) -> Message:
        router = self.router
        hidden, mask, positions = trunk_inputs(message, router.stage)
        labels = labels_of(message, hidden) if router.mode == "vanilla" else None
        with router.serving(message.client_id) as route:
            router.trunk.eval()
            out = router.run_trunk(route, hidden, mask, positions)
            router.trunk.train()
        if labels is None:
            return Message("activations", message.client_id, message.step, message.micro, {"hidden": out})
        total, count = causal_lm_loss(out, labels)
        tensors = {"row_loss": row_losses(out, labels)} if message.meta.get("per_row") else {}
        return Message(
            "loss", message.client_id, message.step, message.micro, tensors, {"loss_sum": total.item(), "tokens": count}
        )

    def _step(self, request: Request) -> None:
        message = request.message
        adapter = self.router.adapter_of(message.client_id)
        if self.abandoned:
            raise ProtocolError(f"step {message.step} from {message.client_id} abandoned: the round stopped")
        arrived = self.arrivals.setdefault(adapter, [])
        if any(waiting.message.client_id == message.client_id for waiting, _ in arrived):
            raise ProtocolError(
                f"step {message.step} from {message.client_id}: its previous step still waits for the other "
                "clients; wait for its reply before stepping again"
            )
        arrived.append((request, float(message.meta.get("grad_sq_norm", 0.0))))
        expected = self.barrier(adapter)
        if len(arrived) < expected:
            for mod in self.mods:  # this client sends no more forwards this step
                mod.stepped(adapter, complete=False)
            return  # the reply waits for the other clients of this step
        del self.arrivals[adapter]
        for mod in self.mods:
            mod.stepped(adapter, complete=True)
        optimizer = self.router.optimizer(adapter)
        if expected > 1:  # the trunk's gradient is the mean over the clients that fed it, summed in client order
            clients = sorted(waiting.message.client_id for waiting, _ in arrived)
            owns = [self.gradients.pop(c, None) or [None] * len(optimizer.params) for c in clients]
            for i, p in enumerate(optimizer.params):
                grads = [own[i] for own in owns if own[i] is not None]
                p.grad = None
                for grad in grads:
                    p.grad = grad if p.grad is None else p.grad.add_(grad)
                if p.grad is not None:
                    p.grad.div_(expected)
        total = sum(sq for _, sq in arrived) + optimizer.grad_sq_norm()
        coefficient = optimizer.clip_coefficient(total)
        optimizer.step(coefficient)
        meta = {"grad_norm": math.sqrt(total), "clip": coefficient, "lr": optimizer.lr()}
        for waiting, _ in arrived:
            m = waiting.message
            resolve(waiting.future, Message("stepped", m.client_id, m.step, 0, {}, dict(meta)))

    # --- stopping: run between requests (the worker's ``between_requests``) -----------------------------

    def abandon(self) -> None:
        """Stop the round's optimizer steps: the clients waiting at a step barrier are released (their step
        fails), and so is every step that arrives later, until ``restore`` rolls the round back."""
        self.abandoned = True
        self.gradients.clear()
        for mod in self.mods:
            mod.drop(None, "abandoned: the round stopped")
        for adapter in list(self.arrivals):
            for waiting, _ in self.arrivals.pop(adapter):
                step = waiting.message.step
                resolve(waiting.future, ProtocolError(f"step {step} abandoned: the round stopped"))

    def forget(self, client_id: str) -> None:
        """Drop what a vanished client left half done: its pending graphs and the gradients they put on its
        adapter (they would otherwise leak into the next optimizer step), and release the clients waiting for
        it at a step barrier (their step fails)."""
        self.gradients.pop(client_id, None)
        for key in [k for k in self.pending if k[0] == client_id]:
            del self.pending[key]
        adapter = self.router.adapter_of(client_id)
        for mod in self.mods:
            mod.drop(adapter, f"abandoned: client {client_id} left", client_id)
        for waiting, _ in self.arrivals.pop(adapter, []):
            step = waiting.message.step
            resolve(waiting.future, ProtocolError(f"client {client_id} left; step {step} abandoned"))
        for p in self.router.parameters(adapter):  # an offloaded adapter has none, and no gradients either
            p.grad = None

    def restore(self, snapshot: Snapshot) -> None:
        """Go back to ``snapshot``: adapters, optimizer states; work in progress is dropped (its askers fail)."""
        self.pending.clear()
        self.abandon()
        self.abandoned = False
        self.router.restore(snapshot)
