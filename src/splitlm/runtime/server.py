"""The server runtime: steps 4 and 8 (trunk forward and backward), and the loss in a vanilla split.

The server sees only messages. One frozen base trunk serves every client; with LoRA, each client is routed
to a named adapter of an ``AdapterBank`` (its own, its group's, or one shared by all, as the framework
says), which has its own optimizer. A graph of a trunk forward is kept per (client, step, micro-batch)
until the matching backward arrives.

Requests go through a queue and a worker thread (``start``), in the order a scheduling policy picks, so
concurrent clients are served one request at a time. Without a worker, ``handle`` runs a request at once.
An optimizer step on an adapter shared by a barrier of n clients (parallel SL) happens when the n-th
client's ``step`` arrives; the earlier ones get their reply then.

Each client's route records its cut: the trunk holds a contiguous range of blocks, and a client's requests
run the part of that range its own ``SplitSpec`` leaves to the server: clients may cut in different places
(``framework.clients``), and the trunk holds the union of their ranges once.

Memory (Menos): with ``max_resident_adapters``, the bank offloads the least recently served adapters (and
their optimizer states) to ``offload_dir`` and brings them back when their client is served; an adapter whose
client awaits a backward or holds gradients is pinned (``_pinned``). With ``max_pending``, at most that many
trunk graphs wait for their backward (U-shape): the worker leaves further training forwards in the queue until
a backward frees a slot, and serves every other request meanwhile (back-pressure, never a refusal).
``serving_stats`` reports the worker's idle fraction and each client's time queued.

Merging (MiniBatch-SFL / SCALA, survey §3.1.2; ``merge`` K > 1): on an adapter shared at a barrier, the training
forwards of one micro-batch from the barrier's clients are held (``_held``; the worker serves everything else
meanwhile) until K of them, or every barrier client that may still send one this step, have arrived. Their
``hidden`` (B_i, T_i, d) are concatenated in client order, right-padded to the longest T (attention mask zero and
positions continued on the padding), the trunk runs once on the (sum B_i, T_max, d) batch, and each client gets
its own rows back, trimmed to its T_i. In a U-shaped split the pass's graph (``_Pass``) waits for every one of its
clients' backwards, which run as one backward of the zero-padded gradients; in a vanilla split the clients'
losses (each its mean, times its scale) are summed and run backward at once. Either way the trunk's gradient is
the sum of the per-client gradients and goes to one client's own gradients (the pass's first client, the others
get none), so the barrier's step, which sums them and divides by the barrier's count, takes the same update as
without merging. ``merge_max_tokens`` caps a pass at that many tokens (rows x T_max): a larger set runs as
several passes of whole requests (clients of different cuts never share a pass either). A held forward of a
client that leaves (``forget``) or of a stopped round (``abandon``, ``restore``) fails, as a waiting step does.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import Future
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import torch
from peft import PeftModel
from safetensors.torch import load_file, save_file
from torch import nn

from splitlm.errors import CheckpointError, ProtocolError, SplitLMError
from splitlm.models.split import SplitMode, SplitSpec, Stage
from splitlm.peft import load_trainable, load_trainable_state, save_trainable, trainable_parameters, trainable_state
from splitlm.peft.bank import AdapterBank
from splitlm.peft.lora import ADAPTER
from splitlm.runtime.loss import causal_lm_loss, row_losses
from splitlm.runtime.optim import PartyOptimizer
from splitlm.runtime.rng import seeded
from splitlm.runtime.scheduling import Request, make_policy, request_tokens
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)

OptimizerFactory = Callable[[list[nn.Parameter]], PartyOptimizer]
T = TypeVar("T")


@dataclass(frozen=True)
class Route:
    """Where a client's requests go: its trunk adapter and the trunk blocks its cut leaves to the server."""

    adapter: str
    blocks: tuple[int, ...]


def _resolve(future: Future[Message], outcome: Message | BaseException) -> None:
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


@dataclass(eq=False)
class _Held:
    """A training forward held for a merged pass, with its inputs validated and on the trunk's device."""

    request: Request
    hidden: torch.Tensor  # (B, T, d)
    mask: torch.Tensor | None  # (B, T) or (1, T)
    positions: torch.Tensor | None  # (B, T) or (1, T)
    labels: torch.Tensor | None  # (B, T), vanilla only

    @property
    def client_id(self) -> str:
        return self.request.message.client_id


@dataclass(eq=False)
class _Pass:
    """One merged trunk pass of a U-shaped split, waiting for all its clients' backwards."""

    keys: list[tuple[str, int, int]]  # (client, step, micro) of each client, in row order
    leaves: list[torch.Tensor]  # each client's hidden, a leaf (B_i, T_i, d)
    out: torch.Tensor  # the trunk's output (sum B_i, T_max, d)
    owner: str  # the client whose own gradients (at the barrier) take the pass's trunk gradient
    grads: dict[tuple[str, int, int], tuple[Request, torch.Tensor]] = field(default_factory=dict)  # arrived ones

    def rows(self, index: int) -> slice:
        start = sum(leaf.shape[0] for leaf in self.leaves[:index])
        return slice(start, start + self.leaves[index].shape[0])


class SplitServer:
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
        merge: int = 1,
        merge_max_tokens: int = 0,
    ) -> None:
        if max_pending < 0:
            raise ValueError(f"max_pending is {max_pending}; expected 0 (no bound) or a positive count")
        if merge < 1 or merge_max_tokens < 0:
            raise ValueError(
                f"merge={merge}, merge_max_tokens={merge_max_tokens}; expected merge >= 1 (1: off) and "
                "merge_max_tokens >= 0 (0: no cap)"
            )
        self.trunk = trunk  # the stage, possibly wrapped by peft
        self.stage = stage
        self.mode = mode
        self.hidden_size = stage.in_width  # d, or K behind a learned bottleneck (split.bottleneck)
        self.trainable = bool(trainable_parameters(trunk))
        self.seed = seed
        self.max_pending = max_pending  # trunk graphs waiting for their backward at most (0: no bound)
        self.merge = merge  # K: training forwards of a barrier's clients merged into one trunk pass (1: off)
        self.merge_max_tokens = merge_max_tokens  # tokens (rows x T) of one merged pass at most (0: no cap)
        self.bank: AdapterBank[PartyOptimizer] | None = None
        if isinstance(trunk, PeftModel):
            self.bank = AdapterBank(
                trunk, make_optimizer, seed,
                max_resident=max_resident_adapters, offload_dir=offload_dir, pinned=self._pinned,
            )  # fmt: skip
        self._shared = None if self.bank else make_optimizer(trainable_parameters(trunk))
        self.routes: dict[str, Route] = {}  # client id -> its adapter and trunk blocks
        self.barriers: dict[str, int] = {}  # adapter -> step messages per optimizer step
        self._pending: dict[tuple[str, int, int], tuple[torch.Tensor, torch.Tensor]] = {}
        # adapter -> the step requests waiting at its barrier (each client's next step: clients left out of
        # a round may be at other step numbers than the rest)
        self._arrivals: dict[str, list[tuple[Request, float]]] = {}
        self._abandoned = False  # a stopped round: steps fail until it is rolled back
        self._gradients: dict[str, list[torch.Tensor | None]] = {}  # client -> its gradients at a barrier
        # merging: (adapter, micro-batch) -> training forwards held for a merged pass, and the clients whose
        # forward of that micro-batch ran since the adapter's last step; (client, step, micro) -> a merged pass
        # (U-shape) waiting for its clients' backwards
        self._held: dict[tuple[str, int], list[_Held]] = {}
        self._fed: dict[tuple[str, int], set[str]] = {}
        self._merged: dict[tuple[str, int, int], _Pass] = {}
        self._policy = make_policy(policy, cost=self._backward_cost)
        self._wakeup = threading.Condition()
        self._worker: threading.Thread | None = None
        self._running = False
        # serving statistics (``serving_stats``), updated under ``_wakeup``
        self._started_at: float | None = None
        self._stopped_at: float | None = None
        self._idle_seconds = 0.0
        self._idle_since: float | None = None  # the worker waits for work since then
        self._busy_seconds = 0.0
        self._waits: dict[str, tuple[int, float]] = {}  # client -> (requests served, seconds they were queued)

    @property
    def param_count(self) -> int:
        """Parameters the server holds in memory: the base trunk once, plus every resident adapter."""
        return sum(p.numel() for p in {id(p): p for p in self.trunk.parameters()}.values())

    @property
    def trainable_param_count(self) -> int:
        """Parameters of one trunk adapter (or of the trunk, trained without LoRA)."""
        if self.bank is not None:
            return self.bank.numel(ADAPTER)
        return sum(p.numel() for p in trainable_parameters(self.trunk))

    # --- tenants -----------------------------------------------------------------------------------------

    def assign(
        self, client_id: str, adapter: str = ADAPTER, spec: SplitSpec | None = None, rank: int | None = None
    ) -> None:
        """Route ``client_id`` to ``adapter`` (created on first use, initialised like every other one, with LoRA
        rank ``rank`` if given) and to the trunk blocks its cut ``spec`` leaves to the server (default: every
        block this trunk holds)."""
        if adapter != ADAPTER:
            if self.bank is None:
                if self.trainable:
                    raise ProtocolError("per-client trunk adapters need lora.trunk.method=lora")
            elif adapter not in self.bank.names:
                self.bank.add(adapter, rank)
        self.routes[client_id] = Route(adapter, self._blocks_of(client_id, spec))

    def _blocks_of(self, client_id: str, spec: SplitSpec | None) -> tuple[int, ...]:
        held = tuple(self.stage.layer_indices)
        if spec is None:
            return held
        if spec.mode != self.mode:
            raise ProtocolError(f"client {client_id} uses a {spec.mode} split; this server serves {self.mode} splits")
        blocks = tuple(spec.layers("trunk", int(self.stage.config.num_hidden_layers)))
        if not blocks or not set(blocks) <= set(held):
            raise ProtocolError(
                f"client {client_id}'s cut (head {spec.head_layers}, tail {spec.tail_layers}) needs trunk blocks "
                f"{blocks[0] if blocks else '-'}..{blocks[-1] if blocks else '-'}, but this server holds blocks "
                f"{held[0]}..{held[-1]}; cut within them"
            )
        return blocks

    def route_of(self, client_id: str) -> Route:
        route = self.routes.get(client_id)
        if route is None:
            raise ProtocolError(f"unknown client {client_id!r}: this server serves {sorted(self.routes)}")
        return route

    def adapter_of(self, client_id: str) -> str:
        return self.route_of(client_id).adapter

    def optimizer(self, adapter: str = ADAPTER) -> PartyOptimizer:
        if self.bank is not None:
            return self.bank.optimizer(adapter)
        assert self._shared is not None
        return self._shared

    def adapter_state(self, adapter: str = ADAPTER) -> dict[str, torch.Tensor]:
        if self.bank is None:
            return {}
        return self.bank.state(adapter)

    def load_adapter_state(self, adapter: str, state: dict[str, torch.Tensor]) -> None:
        if self.bank is not None:
            self.bank.load_state(adapter, state)

    @contextlib.contextmanager
    def _own_gradients(self, client_id: str) -> Iterator[None]:
        """On an adapter shared at a barrier, a client's backward passes accumulate into gradients of its own,
        summed in client order at the step: the result does not depend on the order requests arrived in."""
        adapter = self.adapter_of(client_id)
        if self.barriers.get(adapter, 1) <= 1:
            yield
            return
        params = self.optimizer(adapter).params
        own = self._gradients.get(client_id) or [None] * len(params)
        for p, grad in zip(params, own, strict=True):
            p.grad = grad
        try:
            yield
        finally:
            self._gradients[client_id] = [p.grad for p in params]
            for p in params:
                p.grad = None

    @contextlib.contextmanager
    def _serving(self, client_id: str) -> Iterator[Route]:
        route = self.route_of(client_id)
        if self.bank is None:
            yield route
        else:
            with self.bank.use(route.adapter):
                yield route

    def _pinned(self) -> set[str]:
        """Adapters that must stay where they are: a client's trunk graph awaits its backward, or the client
        holds gradients at a barrier (the bank also pins adapters with a ``.grad`` of their own)."""
        clients = {key[0] for key in [*self._pending, *self._merged]} | set(list(self._gradients))
        return {self.routes[c].adapter for c in clients if c in self.routes}

    def _run_trunk(self, route: Route, hidden: torch.Tensor, mask: torch.Tensor | None, positions: torch.Tensor | None):
        blocks = None if route.blocks == tuple(self.stage.layer_indices) else list(route.blocks)
        return self.trunk(hidden_states=hidden, attention_mask=mask, position_ids=positions, blocks=blocks)

    # --- requests: queue, worker, dispatch --------------------------------------------------------------

    def start(self) -> None:
        """Serve queued requests on a worker thread, in the order the scheduling policy picks."""
        if self._worker is None:
            self._running = True
            self._started_at = self._started_at or time.monotonic()
            self._stopped_at = None
            self._worker = threading.Thread(target=self._serve, name="splitlm-server", daemon=True)
            self._worker.start()

    def stop(self) -> None:
        if self._worker is not None:
            with self._wakeup:
                self._running = False
                self._wakeup.notify_all()
            self._worker.join()
            self._worker = None
            self._stopped_at = time.monotonic()

    def submit(self, message: Message) -> Future[Message]:
        request = Request(message)
        if self._worker is None:
            self._record_wait(request)
            self._timed_dispatch(request)
        else:
            with self._wakeup:
                self._policy.push(request)
                self._wakeup.notify()
        return request.future

    def handle(self, message: Message) -> Message:
        future = self.submit(message)
        if self._worker is None and not future.done():
            raise ProtocolError("this step waits for other clients: start() the server worker for parallel clients")
        return future.result()

    def _serve(self) -> None:
        while True:
            with self._wakeup:
                while True:
                    if not self._running:
                        return
                    request = self._policy.pop(self._admissible) if len(self._policy) else None
                    if request is not None:
                        break
                    self._idle_since = time.monotonic()  # nothing (admissible) to serve
                    self._wakeup.wait()
                    self._idle_seconds += time.monotonic() - self._idle_since
                    self._idle_since = None
                self._record_wait(request)
            self._timed_dispatch(request)

    def _admissible(self, request: Request) -> bool:
        """Back-pressure: a U-shaped training forward needs a free graph slot; everything else can run now.
        Only the worker changes ``_pending``, so a slot freed by a backward is seen on its next look."""
        message = request.message
        if request.action is not None or message.kind != "forward":
            return True
        return self._slot_free(message)

    def _slot_free(self, message: Message) -> bool:
        if not self.max_pending or self.mode != "ushape" or message.key in self._pending or message.key in self._merged:
            return True
        return len(self._pending) + len({id(p) for p in self._merged.values()}) < self.max_pending

    def _backward_cost(self, request: Request) -> float:
        """Expected time of a backward (longest_backward_first): trunk blocks of the client's route x tokens."""
        route = self.routes.get(request.message.client_id)
        return (len(route.blocks) if route is not None else 1) * request_tokens(request)

    def _record_wait(self, request: Request) -> None:
        if request.action is None:
            client = request.message.client_id
            count, seconds = self._waits.get(client, (0, 0.0))
            self._waits[client] = (count + 1, seconds + max(0.0, time.monotonic() - request.queued_at))

    def _timed_dispatch(self, request: Request) -> None:
        began = time.monotonic()
        try:
            self._dispatch(request)
        finally:
            with self._wakeup:
                self._busy_seconds += time.monotonic() - began

    def serving_stats(self) -> dict[str, Any]:
        """How the worker spent its time since ``start`` (idle: waiting with nothing admissible to serve) and
        how long each client's requests waited in the queue before being served."""
        with self._wakeup:
            now = time.monotonic()
            idle = self._idle_seconds + (now - self._idle_since if self._idle_since is not None else 0.0)
            elapsed = (self._stopped_at or now) - self._started_at if self._started_at is not None else 0.0
            clients = {
                client: {"requests": count, "wait_seconds": seconds, "mean_wait_s": seconds / count}
                for client, (count, seconds) in self._waits.items()
            }
            return {
                "idle_fraction": min(1.0, idle / elapsed) if elapsed > 0 else 0.0,
                "busy_seconds": self._busy_seconds,
                "idle_seconds": idle,
                "clients": clients,
            }

    def _dispatch(self, request: Request) -> None:
        if request.action is not None:  # internal work queued behind the requests already waiting
            try:
                request.action()
            except Exception:  # a bug must not stop the worker
                log.exception("internal server action failed")
            return
        message = request.message
        handlers = {"forward": self._forward, "backward": self._backward, "eval": self._eval}
        try:
            if message.kind == "step":
                self._step(request)
                return
            if message.kind == "forward" and self._merges(message):
                self._hold(request)
                return
            if message.kind == "backward" and message.key in self._merged:
                self._merged_backward(request)
                return
            handler = handlers.get(message.kind)
            if handler is None:
                raise ProtocolError(
                    f"unknown request kind {message.kind!r}; expected one of {sorted([*handlers, 'step'])}"
                )
            _resolve(request.future, handler(message))
        except SplitLMError as error:
            _resolve(request.future, error)
        except Exception as error:  # a bug must reach the client, not hang it
            log.exception("request %s from %s failed", message.kind, message.client_id)
            _resolve(request.future, error)

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

    def _forward(self, message: Message) -> Message:
        if not self._slot_free(message):  # only without a worker: the worker holds such forwards back
            raise ProtocolError(
                f"forward from {message.client_id}: {len(self._pending)} trunk graphs already wait for their "
                f"backward (max_pending={self.max_pending}); send those backwards first"
            )
        return self._trunk_forward(message)

    def _trunk_forward(self, message: Message) -> Message:
        hidden, mask, positions = self._inputs(message)
        labels = self._labels(message, hidden) if self.mode == "vanilla" else None
        want_grad = bool(message.meta.get("want_grad", True))
        hidden = hidden.detach().requires_grad_(want_grad)  # a fresh leaf: the graph starts here
        with self._serving(message.client_id) as route:
            self.trunk.train()
            # the trunk's random draws (dropout) are fixed by (client, step, micro-batch), not by arrival order
            with seeded(self.seed, *message.key, "trunk", devices=(self.stage.device,)):
                out = self._run_trunk(route, hidden, mask, positions)  # (B,T,d|V)
            if self.mode == "ushape":
                if out.requires_grad:  # else the client sends no backward (``needs_grad``): nothing to keep
                    self._pending[message.client_id, message.step, message.micro] = (hidden, out)
                return Message(
                    "activations", message.client_id, message.step, message.micro, {"hidden": out},
                    {"needs_grad": out.requires_grad},
                )  # fmt: skip
            assert labels is not None
            total, count = causal_lm_loss(out, labels)
            if out.requires_grad and count:
                with self._own_gradients(message.client_id):
                    (total / count * float(message.meta.get("scale", 1.0))).backward()
        tensors = {"grad": hidden.grad} if want_grad and hidden.grad is not None else {}
        return Message(
            "loss", message.client_id, message.step, message.micro, tensors,
            {"loss_sum": total.item(), "tokens": count},
        )  # fmt: skip

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
        with self._serving(message.client_id), self._own_gradients(message.client_id):
            out.backward(grad.to(device=out.device, dtype=out.dtype))
        tensors = {"grad": hidden.grad} if hidden.grad is not None else {}
        return Message("gradients", message.client_id, message.step, message.micro, tensors)

    def _step(self, request: Request) -> None:
        message = request.message
        adapter = self.adapter_of(message.client_id)
        if self._abandoned:
            raise ProtocolError(f"step {message.step} from {message.client_id} abandoned: the round stopped")
        arrived = self._arrivals.setdefault(adapter, [])
        if any(waiting.message.client_id == message.client_id for waiting, _ in arrived):
            raise ProtocolError(
                f"step {message.step} from {message.client_id}: its previous step still waits for the other "
                "clients; wait for its reply before stepping again"
            )
        arrived.append((request, float(message.meta.get("grad_sq_norm", 0.0))))
        expected = self.barriers.get(adapter, 1)
        if len(arrived) < expected:
            if self._held:  # this client sends no more forwards this step: merges waiting for it may go now
                self._release(adapter)
            return  # the reply waits for the other clients of this step
        del self._arrivals[adapter]
        for key in [k for k in self._fed if k[0] == adapter]:  # the next step's forwards merge afresh
            del self._fed[key]
        optimizer = self.optimizer(adapter)
        if expected > 1:  # the trunk's gradient is the mean over the clients that fed it, summed in client order
            clients = sorted(waiting.message.client_id for waiting, _ in arrived)
            owns = [self._gradients.pop(c, None) or [None] * len(optimizer.params) for c in clients]
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
            _resolve(waiting.future, Message("stepped", m.client_id, m.step, 0, {}, dict(meta)))

    # --- merging the barrier's clients into one trunk pass (framework.merge) --------------------------------

    def _merges(self, message: Message) -> bool:
        """Whether a forward waits to be merged: merging is on, the client's adapter has a barrier, the round
        goes on, and the pass keeps a graph (the client wants its gradient or the trunk trains)."""
        if self.merge <= 1 or self._abandoned:
            return False
        route = self.routes.get(message.client_id)
        if route is None or self.barriers.get(route.adapter, 1) <= 1:
            return False
        return bool(message.meta.get("want_grad", True)) or self.trainable

    def _hold(self, request: Request) -> None:
        """Validate a training forward and hold it for a merged pass; run the pass once enough have arrived."""
        message = request.message
        hidden, mask, positions = self._inputs(message)
        labels = self._labels(message, hidden) if self.mode == "vanilla" else None
        adapter = self.adapter_of(message.client_id)
        group = self._held.setdefault((adapter, message.micro), [])
        if any(held.client_id == message.client_id for held in group) or message.key in self._merged:
            raise ProtocolError(
                f"forward from {message.client_id} for step {message.step} micro-batch {message.micro}: its previous "
                "forward of this micro-batch still waits for the other clients; wait for its reply first"
            )
        group.append(_Held(request, hidden, mask, positions, labels))
        self._release(adapter)

    def _wanted(self, adapter: str, micro: int, group: list[_Held]) -> int:
        """How many held forwards of (adapter, micro) make a merge: K, or every barrier client that may still
        send one this step (not yet served for this micro-batch, and not already at its step without it)."""
        served = self._fed.get((adapter, micro), set())
        held = {h.client_id for h in group}
        stepped = {waiting.message.client_id for waiting, _ in self._arrivals.get(adapter, [])}
        remaining = self.barriers.get(adapter, 1) - len(served) - len(stepped - served - held)
        return max(1, min(self.merge, remaining))

    def _release(self, adapter: str) -> None:
        """Run every merge of ``adapter`` whose forwards have all arrived."""
        for micro in [micro for held_by, micro in self._held if held_by == adapter]:
            group = self._held[adapter, micro]
            if len(group) < self._wanted(adapter, micro, group):
                continue
            del self._held[adapter, micro]
            self._fed.setdefault((adapter, micro), set()).update(h.client_id for h in group)
            for part in self._passes(sorted(group, key=lambda h: h.client_id)):  # rows in client order
                if len(part) == 1:  # alone: exactly the unmerged forward
                    self._answer([part[0].request], lambda m=part[0].request.message: [self._trunk_forward(m)])
                else:
                    self._answer([h.request for h in part], lambda part=part: self._merged_forward(part))

    def _passes(self, group: list[_Held]) -> list[list[_Held]]:
        """A merge's trunk passes: one per cut (clients whose routes run other blocks cannot share a pass), each
        cut into runs of whole requests of at most ``merge_max_tokens`` tokens (rows x the longest T) each."""
        by_blocks: dict[tuple[int, ...], list[_Held]] = {}
        for held in group:
            by_blocks.setdefault(self.route_of(held.client_id).blocks, []).append(held)
        passes: list[list[_Held]] = []
        for members in by_blocks.values():
            current: list[_Held] = []
            rows = longest = 0
            for held in members:
                b, t = held.hidden.shape[:2]
                if current and self.merge_max_tokens and (rows + b) * max(longest, t) > self.merge_max_tokens:
                    passes.append(current)
                    current, rows, longest = [], 0, 0
                current.append(held)
                rows, longest = rows + b, max(longest, t)
            passes.append(current)
        return passes

    def _answer(self, requests: list[Request], work: Callable[[], list[Message]]) -> None:
        """Resolve ``requests`` with ``work``'s replies (in order), or all of them with its error."""
        try:
            replies: list[Message | BaseException] = list(work())
        except SplitLMError as error:
            replies = [error] * len(requests)
        except Exception as error:  # a bug must reach the clients, not hang them
            log.exception("merged %s of %s failed", requests[0].message.kind, [r.message.client_id for r in requests])
            replies = [error] * len(requests)
        for request, reply in zip(requests, replies, strict=True):
            _resolve(request.future, reply)

    def _merged_inputs(
        self, part: list[_Held]
    ) -> tuple[list[torch.Tensor], torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Each client's hidden as a leaf (B_i, T_i, d), and the merged batch: hidden (sum B_i, T_max, d) right-padded
        with zeros, its attention mask (zero on the padding; None when no client sent one and none is padded) and
        position ids (continued on the padding; None when no client sent any: the trunk's default 0..T_max-1)."""
        longest = max(h.hidden.shape[1] for h in part)
        leaves = [h.hidden.detach().requires_grad_(bool(h.request.message.meta.get("want_grad", True))) for h in part]
        hidden = torch.cat([nn.functional.pad(leaf, (0, 0, 0, longest - leaf.shape[1])) for leaf in leaves])
        device = hidden.device
        mask = None
        if any(h.mask is not None for h in part) or any(h.hidden.shape[1] != longest for h in part):
            dtype = next((h.mask.dtype for h in part if h.mask is not None), torch.long)
            masks = []
            for h in part:
                b, t = h.hidden.shape[:2]
                own = h.mask.expand(b, t) if h.mask is not None else torch.ones(b, t, device=device)
                masks.append(nn.functional.pad(own.to(dtype), (0, longest - t)))  # (B_i, T_max)
            mask = torch.cat(masks)
        positions = None
        if any(h.positions is not None for h in part):
            rows = []
            for h in part:
                b, t = h.hidden.shape[:2]
                own = h.positions if h.positions is not None else torch.arange(t, device=device).unsqueeze(0)
                padding = torch.arange(t, longest, device=device).unsqueeze(0)
                rows.append(torch.cat([own.expand(b, t), padding.to(own.dtype).expand(b, -1)], dim=1))
            positions = torch.cat(rows)
        return leaves, hidden, mask, positions

    def _merged_forward(self, part: list[_Held]) -> list[Message]:
        """One trunk pass over ``part``'s forwards (client order); each client's reply holds its own rows and
        tokens. U-shape: the pass waits for its backwards; vanilla: the summed losses run backward at once."""
        messages = [h.request.message for h in part]
        first = messages[0]
        leaves, hidden, mask, positions = self._merged_inputs(part)
        with self._serving(first.client_id) as route:
            self.trunk.train()
            # the pass's random draws (dropout) are fixed by its first client's (client, step, micro-batch)
            with seeded(self.seed, *first.key, "trunk", devices=(self.stage.device,)):
                out = self._run_trunk(route, hidden, mask, positions)  # (sum B_i, T_max, d|V)
            merged = _Pass([m.key for m in messages], leaves, out, first.client_id)
            pieces = [out[merged.rows(i), : leaf.shape[1]] for i, leaf in enumerate(leaves)]  # (B_i, T_i, d|V)
            if self.mode == "ushape":
                if out.requires_grad:  # else the clients send no backward: nothing to keep
                    self._merged.update(dict.fromkeys(merged.keys, merged))
                meta = {"needs_grad": out.requires_grad}
                tensors = [{"hidden": piece.contiguous()} for piece in pieces]
                return [
                    Message("activations", m.client_id, m.step, m.micro, own, dict(meta))
                    for m, own in zip(messages, tensors, strict=True)
                ]
            losses = [causal_lm_loss(piece, h.labels) for piece, h in zip(pieces, part, strict=True)]
            scaled = [
                total / count * float(m.meta.get("scale", 1.0))
                for (total, count), m in zip(losses, messages, strict=True)
                if out.requires_grad and count
            ]
            if scaled:  # the trunk's gradient is the sum of the clients' ones, all on the first client's account
                with self._own_gradients(first.client_id):
                    torch.stack(scaled).sum().backward()
        replies = []
        for m, leaf, (total, count) in zip(messages, leaves, losses, strict=True):
            tensors = {"grad": leaf.grad} if leaf.requires_grad and leaf.grad is not None else {}
            replies.append(
                Message("loss", m.client_id, m.step, m.micro, tensors, {"loss_sum": total.item(), "tokens": count})
            )
        return replies

    def _merged_backward(self, request: Request) -> None:
        """Hold a backward of a merged pass until all its clients' have arrived, then run one backward of their
        gradients (zero on the padding) and give each client the gradient of its own hidden."""
        message = request.message
        merged = self._merged[message.key]
        index = merged.keys.index(message.key)
        leaf = merged.leaves[index]
        grad = self._tensor(message, "grad")
        expected = (leaf.shape[0], leaf.shape[1], merged.out.shape[-1])
        if tuple(grad.shape) != expected:
            raise ProtocolError(f"backward: grad has shape {tuple(grad.shape)}, expected {expected}")
        if not torch.isfinite(grad).all():
            raise ProtocolError(f"backward from {message.client_id}: grad contains NaN or Inf")
        if message.key in merged.grads:
            raise ProtocolError(
                f"backward from {message.client_id} for step {message.step} micro-batch {message.micro}: its "
                "previous backward still waits for the other clients of its merged trunk pass"
            )
        merged.grads[message.key] = (request, grad)
        if len(merged.grads) < len(merged.keys):
            return
        for key in merged.keys:  # only valid gradients reach this point: the pass is consumed
            del self._merged[key]
        requests = [merged.grads[key][0] for key in merged.keys]
        self._answer(requests, lambda: self._run_merged_backward(merged))

    def _run_merged_backward(self, merged: _Pass) -> list[Message]:
        out = merged.out
        full = torch.zeros_like(out)  # (sum B_i, T_max, d)
        for index, key in enumerate(merged.keys):
            grad = merged.grads[key][1]
            full[merged.rows(index), : grad.shape[1]] = grad.to(device=out.device, dtype=out.dtype)
        with self._serving(merged.owner), self._own_gradients(merged.owner):
            out.backward(full)
        replies = []
        for (client, step, micro), leaf in zip(merged.keys, merged.leaves, strict=True):
            tensors = {"grad": leaf.grad} if leaf.grad is not None else {}
            replies.append(Message("gradients", client, step, micro, tensors))
        return replies

    def _drop_merges(self, adapter: str | None, reason: str, client_id: str | None = None) -> None:
        """Fail the forwards held for a merge (of ``adapter``, or every one) and the backwards waiting in merged
        passes (of ``client_id``'s passes, or every one), and drop those passes: the clients they wait for may
        never come."""
        for key in [k for k in self._held if adapter is None or k[0] == adapter]:
            for held in self._held.pop(key):
                m = held.request.message
                _resolve(held.request.future, ProtocolError(f"forward {m.step}/{m.micro} of {m.client_id} {reason}"))
        for key in [k for k in self._fed if adapter is None or k[0] == adapter]:
            del self._fed[key]
        for merged in {id(p): p for p in self._merged.values()}.values():
            if client_id is not None and all(key[0] != client_id for key in merged.keys):
                continue
            for key in merged.keys:
                self._merged.pop(key, None)
            for waiting, _ in merged.grads.values():
                m = waiting.message
                _resolve(waiting.future, ProtocolError(f"backward {m.step}/{m.micro} of {m.client_id} {reason}"))

    def _between_requests(self, work: Callable[[], T], wait: bool = True) -> T | None:
        """Run ``work`` on the worker, in the queue's order (at once without a worker); ``wait=False`` only
        queues it (for callers that must not block, like the network's event loop)."""
        if self._worker is None:
            return work()
        done: Future[T] = Future()

        def run() -> None:
            try:
                done.set_result(work())
            except BaseException as error:  # reaches the caller
                done.set_exception(error)

        with self._wakeup:
            self._policy.push(Request(Message("internal", "-", -1), action=run))
            self._wakeup.notify()
        return done.result() if wait else None

    def forget(self, client_id: str, wait: bool = True) -> None:
        """Drop what a vanished client left half done: its pending graphs and the gradients they put on its
        adapter (they would otherwise leak into the next optimizer step), and release the clients waiting for
        it at a step barrier (their step fails). Runs between requests."""
        if client_id in self.routes:
            self._between_requests(lambda: self._forget(client_id), wait)

    def abandon(self) -> None:
        """Stop the round's optimizer steps: the clients waiting at a step barrier are released (their step
        fails), and so is every step that arrives later, until ``restore`` rolls the round back. Queued behind
        the requests already waiting, without blocking, so no step can slip in between and wait forever."""
        self._between_requests(self._abandon, wait=False)

    def _abandon(self) -> None:
        self._abandoned = True
        self._gradients.clear()
        self._drop_merges(None, "abandoned: the round stopped")
        for adapter in list(self._arrivals):
            for waiting, _ in self._arrivals.pop(adapter):
                step = waiting.message.step
                _resolve(waiting.future, ProtocolError(f"step {step} abandoned: the round stopped"))

    def _forget(self, client_id: str) -> None:
        self._gradients.pop(client_id, None)
        for key in [k for k in self._pending if k[0] == client_id]:
            del self._pending[key]
        adapter = self.adapter_of(client_id)
        self._drop_merges(adapter, f"abandoned: client {client_id} left", client_id)
        for waiting, _ in self._arrivals.pop(adapter, []):
            step = waiting.message.step
            _resolve(waiting.future, ProtocolError(f"client {client_id} left; step {step} abandoned"))
        params = self.bank.parameters(adapter) if self.bank is not None else self.optimizer(adapter).params
        for p in params:  # an offloaded adapter has none, and no gradients either
            p.grad = None

    # --- rolling a failed round back ------------------------------------------------------------------

    def snapshot(self) -> dict[str, tuple[dict[str, torch.Tensor], Any]]:
        """Every adapter's tensors and optimizer state, taken between requests."""
        return self._between_requests(self._snapshot) or {}

    def _snapshot(self) -> dict[str, tuple[dict[str, torch.Tensor], Any]]:
        if self.bank is not None:  # offloaded adapters stay where they are
            return {name: self.bank.snapshot(name) for name in self.bank.names}
        state = {k: v.detach().clone() for k, v in trainable_state(self.trunk).items()}
        return {ADAPTER: (state, self.optimizer().snapshot())}

    def restore(self, snapshot: dict[str, tuple[dict[str, torch.Tensor], Any]]) -> None:
        """Go back to ``snapshot``: adapters, optimizer states; work in progress is dropped (its askers fail)."""
        self._between_requests(lambda: self._restore(snapshot))

    def _restore(self, snapshot: dict[str, tuple[dict[str, torch.Tensor], Any]]) -> None:
        self._pending.clear()
        self._abandon()
        self._abandoned = False
        for p in self.trunk.parameters():  # nothing is pinned now: the bank may move adapters as it restores
            p.grad = None
        for name, (state, optimizer) in snapshot.items():
            if self.bank is not None:
                self.bank.restore(name, (state, optimizer))
            else:
                load_trainable_state(self.trunk, state, "trunk")
                self.optimizer().restore(optimizer)
        for p in self.trunk.parameters():
            p.grad = None

    @torch.no_grad()
    def _eval(self, message: Message) -> Message:
        hidden, mask, positions = self._inputs(message)
        labels = self._labels(message, hidden) if self.mode == "vanilla" else None
        with self._serving(message.client_id) as route:
            self.trunk.eval()
            out = self._run_trunk(route, hidden, mask, positions)
            self.trunk.train()
        if labels is None:
            return Message("activations", message.client_id, message.step, message.micro, {"hidden": out})
        total, count = causal_lm_loss(out, labels)
        tensors = {"row_loss": row_losses(out, labels)} if message.meta.get("per_row") else {}
        return Message(
            "loss", message.client_id, message.step, message.micro, tensors, {"loss_sum": total.item(), "tokens": count}
        )

    # --- state -----------------------------------------------------------------------------------------

    def save(self, folder: Path, with_optimizer: bool = True) -> None:
        """Every adapter as ``trunk[-NAME].safetensors`` (+ its optimizer in ``optimizer[-NAME]/``)."""
        folder.mkdir(parents=True, exist_ok=True)
        if self.bank is None:
            if self.trainable:
                save_trainable(self.trunk, folder / "trunk.safetensors")
            if with_optimizer:
                self.optimizer().save(folder)
            return
        for name in self.bank.names:
            suffix = "" if name == ADAPTER else f"-{name}"
            if name == ADAPTER or name in {route.adapter for route in self.routes.values()}:
                tmp = folder / f".trunk{suffix}.safetensors.tmp"
                save_file(self.bank.state(name), str(tmp), metadata={"format": "pt"})
                tmp.replace(folder / f"trunk{suffix}.safetensors")
                if with_optimizer:
                    (folder / f"optimizer{suffix}").mkdir(exist_ok=True)
                    self.bank.save_optimizer(name, folder / f"optimizer{suffix}")

    def export_adapter(self, adapter: str, path: Path) -> None:
        """Write one adapter as a part file (``trunk.safetensors``) that ``splitlm generate/export`` load."""
        if self.bank is None:
            if self.trainable:
                save_trainable(self.trunk, path)
            return
        tmp = path.with_name(path.name + ".tmp")
        save_file(self.bank.state(adapter), str(tmp), metadata={"format": "pt"})
        tmp.replace(path)

    def load(self, folder: Path) -> None:
        if self.bank is None:
            if self.trainable:
                load_trainable(self.trunk, folder / "trunk.safetensors")
            self.optimizer().load(folder)
            return
        for name in self.bank.names:
            suffix = "" if name == ADAPTER else f"-{name}"
            path = folder / f"trunk{suffix}.safetensors"
            if not path.is_file():
                if name == ADAPTER:
                    raise CheckpointError(f"{path} not found: the checkpoint is incomplete")
                continue
            self.bank.load_state(name, load_file(str(path)))
            if (folder / f"optimizer{suffix}").is_dir():
                self.bank.optimizer(name).load(folder / f"optimizer{suffix}")
