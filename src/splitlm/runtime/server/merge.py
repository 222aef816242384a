"""Merged trunk passes (MiniBatch-SFL / SCALA, survey §3.1.2; ``framework.merge`` K > 1), a ``TrunkMod`` of the
server's request handlers.

On an adapter shared at a barrier, the training forwards of one micro-batch from the barrier's clients are held
(``_held``; the worker serves everything else meanwhile) until K of them, or every barrier client that may still
send one this step, have arrived. Their ``hidden`` (B_i, T_i, d) are concatenated in client order, right-padded to
the longest T (attention mask zero and positions continued on the padding), the trunk runs once on the
(sum B_i, T_max, d) batch, and each client gets its own rows back, trimmed to its T_i. In a U-shaped split the
pass's graph (``_Pass``) waits for every one of its clients' backwards, which run as one backward of the
zero-padded gradients; in a vanilla split the clients' losses (each its mean, times its scale) are summed and run
backward at once. Either way the trunk's gradient is the sum of the per-client gradients and goes to one client's
own gradients (the pass's first client, the others get none), so the barrier's step, which sums them and divides
by the barrier's count, takes the same update as without merging. ``max_tokens`` caps a pass at that many tokens
(rows x T_max): a larger set runs as several passes of whole requests (clients of different cuts never share a
pass either). A held forward of a client that leaves (``forget``) or of a stopped round (``abandon``,
``restore``) fails, as a waiting step does.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from splitlm.errors import ProtocolError, SplitLMError
from splitlm.runtime.loss import causal_lm_loss
from splitlm.runtime.rng import seeded
from splitlm.runtime.scheduling import Request
from splitlm.runtime.server.handlers import Handlers, Key, labels_of, resolve, tensor_of, trunk_inputs
from splitlm.transport.messages import Message

log = logging.getLogger(__name__)


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

    keys: list[Key]  # (client, step, micro) of each client, in row order
    leaves: list[torch.Tensor]  # each client's hidden, a leaf (B_i, T_i, d)
    out: torch.Tensor  # the trunk's output (sum B_i, T_max, d)
    owner: str  # the client whose own gradients (at the barrier) take the pass's trunk gradient
    grads: dict[Key, tuple[Request, torch.Tensor]] = field(default_factory=dict)  # arrived ones

    def rows(self, index: int) -> slice:
        start = sum(leaf.shape[0] for leaf in self.leaves[:index])
        return slice(start, start + self.leaves[index].shape[0])


def answer(requests: list[Request], work: Callable[[], list[Message]]) -> None:
    """Resolve ``requests`` with ``work``'s replies (in order), or all of them with its error."""
    try:
        replies: list[Message | BaseException] = list(work())
    except SplitLMError as error:
        replies = [error] * len(requests)
    except Exception as error:  # a bug must reach the clients, not hang them
        log.exception("merged %s of %s failed", requests[0].message.kind, [r.message.client_id for r in requests])
        replies = [error] * len(requests)
    for request, reply in zip(requests, replies, strict=True):
        resolve(request.future, reply)


class MergedPasses:
    """Merges the training forwards of a barrier's clients, ``k`` at a time, into one trunk pass."""

    def __init__(self, k: int, max_tokens: int = 0) -> None:
        if k < 1 or max_tokens < 0:
            raise ValueError(
                f"merge={k}, merge_max_tokens={max_tokens}; expected merge >= 1 (1: off) and "
                "merge_max_tokens >= 0 (0: no cap)"
            )
        self.k = k  # training forwards of a barrier's clients merged into one trunk pass (1: off)
        self.max_tokens = max_tokens  # tokens (rows x T) of one merged pass at most (0: no cap)
        self._handlers: Handlers | None = None
        # (adapter, micro-batch) -> training forwards held for a merged pass, and the clients whose forward of
        # that micro-batch ran since the adapter's last step; (client, step, micro) -> a merged pass (U-shape)
        # waiting for its clients' backwards
        self._held: dict[tuple[str, int], list[_Held]] = {}
        self._fed: dict[tuple[str, int], set[str]] = {}
        self._merged: dict[Key, _Pass] = {}

    # --- the TrunkMod seam ------------------------------------------------------------------------------

    def bind(self, handlers: Handlers) -> None:
        self._handlers = handlers

    @property
    def handlers(self) -> Handlers:
        if self._handlers is None:
            raise RuntimeError("MergedPasses is not bound to a server's handlers")
        return self._handlers

    def take(self, request: Request) -> bool:
        message = request.message
        if message.kind == "forward" and self._merges(message):
            self._hold(request)
            return True
        if message.kind == "backward" and message.key in self._merged:
            self._merged_backward(request)
            return True
        return False

    def stepped(self, adapter: str, complete: bool) -> None:
        if complete:  # the next step's forwards merge afresh
            for key in [k for k in self._fed if k[0] == adapter]:
                del self._fed[key]
        elif self._held:  # this client sends no more forwards this step: merges waiting for it may go now
            self._release(adapter)

    def graphs(self) -> list[tuple[Key, ...]]:
        return [tuple(merged.keys) for merged in {id(p): p for p in self._merged.values()}.values()]

    def drop(self, adapter: str | None, reason: str, client_id: str | None = None) -> None:
        """Fail the forwards held for a merge (of ``adapter``, or every one) and the backwards waiting in merged
        passes (of ``client_id``'s passes, or every one), and drop those passes: the clients they wait for may
        never come."""
        for key in [k for k in self._held if adapter is None or k[0] == adapter]:
            for held in self._held.pop(key):
                m = held.request.message
                resolve(held.request.future, ProtocolError(f"forward {m.step}/{m.micro} of {m.client_id} {reason}"))
        for key in [k for k in self._fed if adapter is None or k[0] == adapter]:
            del self._fed[key]
        for merged in {id(p): p for p in self._merged.values()}.values():
            if client_id is not None and all(key[0] != client_id for key in merged.keys):
                continue
            for key in merged.keys:
                self._merged.pop(key, None)
            for waiting, _ in merged.grads.values():
                m = waiting.message
                resolve(waiting.future, ProtocolError(f"backward {m.step}/{m.micro} of {m.client_id} {reason}"))

    # --- holding forwards until a merge is complete -------------------------------------------------------

    def _merges(self, message: Message) -> bool:
        """Whether a forward waits to be merged: merging is on, the client's adapter has a barrier, the round
        goes on, and the pass keeps a graph (the client wants its gradient or the trunk trains)."""
        handlers = self.handlers
        if self.k <= 1 or handlers.abandoned:
            return False
        route = handlers.router.routes.get(message.client_id)
        if route is None or handlers.barrier(route.adapter) <= 1:
            return False
        return bool(message.meta.get("want_grad", True)) or handlers.router.trainable

    def _hold(self, request: Request) -> None:
        """Validate a training forward and hold it for a merged pass; run the pass once enough have arrived."""
        message = request.message
        router = self.handlers.router
        hidden, mask, positions = trunk_inputs(message, router.stage)
        labels = labels_of(message, hidden) if router.mode == "vanilla" else None
        adapter = router.adapter_of(message.client_id)
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
        stepped = self.handlers.stepping(adapter)
        remaining = self.handlers.barrier(adapter) - len(served) - len(stepped - served - held)
        return max(1, min(self.k, remaining))

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
                    message = part[0].request.message
                    answer([part[0].request], lambda m=message: [self.handlers.trunk_forward(m)])
                else:
                    answer([h.request for h in part], lambda part=part: self._merged_forward(part))

    def _passes(self, group: list[_Held]) -> list[list[_Held]]:
        """A merge's trunk passes: one per cut (clients whose routes run other blocks cannot share a pass), each
        cut into runs of whole requests of at most ``max_tokens`` tokens (rows x the longest T) each."""
        by_blocks: dict[tuple[int, ...], list[_Held]] = {}
        for held in group:
            by_blocks.setdefault(self.handlers.router.route_of(held.client_id).blocks, []).append(held)
        passes: list[list[_Held]] = []
        for members in by_blocks.values():
            current: list[_Held] = []
            rows = longest = 0
            for held in members:
                b, t = held.hidden.shape[:2]
                if current and self.max_tokens and (rows + b) * max(longest, t) > self.max_tokens:
                    passes.append(current)
                    current, rows, longest = [], 0, 0
                current.append(held)
                rows, longest = rows + b, max(longest, t)
            passes.append(current)
        return passes

    # --- one merged pass ------------------------------------------------------------------------------------

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
        handlers, router = self.handlers, self.handlers.router
        messages = [h.request.message for h in part]
        first = messages[0]
        leaves, hidden, mask, positions = self._merged_inputs(part)
        with router.serving(first.client_id) as route:
            router.trunk.train()
            # the pass's random draws (dropout) are fixed by its first client's (client, step, micro-batch)
            with seeded(router.seed, *first.key, "trunk", devices=(router.stage.device,)):
                out = router.run_trunk(route, hidden, mask, positions)  # (sum B_i, T_max, d|V)
            merged = _Pass([m.key for m in messages], leaves, out, first.client_id)
            pieces = [out[merged.rows(i), : leaf.shape[1]] for i, leaf in enumerate(leaves)]  # (B_i, T_i, d|V)
            if router.mode == "ushape":
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
                with handlers.own_gradients(first.client_id):
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
        grad = tensor_of(message, "grad")
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
        answer(requests, lambda: self._run_merged_backward(merged))

    def _run_merged_backward(self, merged: _Pass) -> list[Message]:
        out = merged.out
        full = torch.zeros_like(out)  # (sum B_i, T_max, d)
        for index, key in enumerate(merged.keys):
            grad = merged.grads[key][1]
            full[merged.rows(index), : grad.shape[1]] = grad.to(device=out.device, dtype=out.dtype)
        with self.handlers.router.serving(merged.owner), self.handlers.own_gradients(merged.owner):
            out.backward(full)
        replies = []
        for (client, step, micro), leaf in zip(merged.keys, merged.leaves, strict=True):
            tensors = {"grad": leaf.grad} if leaf.grad is not None else {}
            replies.append(Message("gradients", client, step, micro, tensors))
        return replies
