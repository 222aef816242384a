"""Step 11: FedAvg, pure functions over state dicts (tensors under unsplit-model names).

``fedavg`` averages states that all hold the same tensors. ``aggregate`` and ``fit`` aggregate clients with different
cuts and LoRA ranks (``framework.clients``):

- Each tensor is averaged over the states that hold it, the weights renormalised over those holders. A
  client contributes what it trained: its client side, and its trunk adapter restricted to the blocks its
  cut leaves to the server (``contribution``). The server's trunk covers the union of the clients' trunk
  blocks, so a client's trunk adapter also has LoRA on blocks that client runs itself, untrained: they are
  left out, and each block gets each client's contribution exactly once.
- Where the holders of a LoRA pair (``...lora_A.weight`` (r, in), ``...lora_B.weight`` (out, r)) have
  different ranks, A and B cannot be averaged entry by entry, and averaging factors is not averaging their
  products anyway. The factors are stacked (HSplitLoRA / FLoRA): B = [c_1 B_1 | c_2 B_2 | ...] and
  A = [A_1; A_2; ...] with c_i = w_i R / r_i (w_i normalised, R = sum r_i), so that the stacked pair with
  peft's scaling alpha / R has the delta weight (alpha/R) B A = sum_i w_i (alpha/r_i) B_i A_i exactly
  (alpha is the same for every client; an override changes only the rank). ``fit`` cuts the stacked pair
  back to each party's own rank r: the best rank-r approximation of the product (a truncated SVD, computed
  through QR of the stacked factors), scaled by r / R for peft's alpha / r.
- Where all holders have the same rank, A and B are averaged separately, as FedAvg always did: a run whose
  clients all have the same rank aggregates exactly as before (and a run whose clients also share one cut
  keeps calling ``fedavg``), and no low-rank approximation is made where none is needed.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any

import torch

from splitlm.errors import SplitLMError


class AggregationError(SplitLMError):
    """The states to average are empty or do not match each other."""


def fedavg(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted average of ``states`` (weights: e.g. each client's number of samples).

    Sums in float64 and returns each tensor in its input dtype. Every state must have the same keys and
    shapes; weights must be non-negative with a positive sum.
    """
    if not states:
        raise AggregationError("fedavg: no states to average (did every client drop out?)")
    if len(weights) != len(states):
        raise AggregationError(f"fedavg: {len(states)} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AggregationError(f"fedavg: weights must be >= 0 with a positive sum, got {list(weights)}")
    keys = set(states[0])
    for index, state in enumerate(states[1:], start=1):
        if set(state) != keys:
            diff = sorted(keys ^ set(state))
            raise AggregationError(f"fedavg: state {index} has different tensors than state 0 (e.g. {diff[:3]})")
    total = float(sum(weights))
    averaged: dict[str, torch.Tensor] = {}
    for key in states[0]:
        reference = states[0][key]
        acc = torch.zeros(reference.shape, dtype=torch.float64)
        for index, (state, weight) in enumerate(zip(states, weights, strict=True)):
            tensor = state[key]
            if tensor.shape != reference.shape:
                raise AggregationError(
                    f"fedavg: {key} has shape {tuple(tensor.shape)} in state {index} "
                    f"but {tuple(reference.shape)} in state 0"
                )
            acc += tensor.detach().to("cpu", torch.float64) * (weight / total)
        averaged[key] = acc.to(reference.dtype)
    return averaged


def global_step(
    old: Mapping[str, torch.Tensor], average: Mapping[str, torch.Tensor], lr: float
) -> dict[str, torch.Tensor]:
    """FedAvg with a global learning rate (``framework.aggregation_lr``, MU-SplitFed's eta_g): the new global model
    ``old + lr * (average - old)`` tensor by tensor, ``old`` the global model the round started from and
    ``average`` the clients' FedAvg; lr 1 is the average, lr 2 twice its step from ``old``.

    Computed in float64 and returned in each average tensor's dtype. A tensor ``old`` lacks or shapes differently,
    or that is not floating point, is the average as it is."""
    stepped: dict[str, torch.Tensor] = {}
    for key, now in average.items():
        before = old.get(key)
        if before is None or before.shape != now.shape or not now.is_floating_point():
            stepped[key] = now.detach().clone()
            continue
        base = before.detach().to("cpu", torch.float64)
        stepped[key] = (base + lr * (now.detach().to("cpu", torch.float64) - base)).to(now.dtype)
    return stepped


# The factor pairs of a LoRA module: A holds the rank in dim 0, B in dim 1 (Linear, Conv, Embedding alike).
LORA_PAIRS = (("lora_A", "lora_B"), ("lora_embedding_A", "lora_embedding_B"))


def lora_pair(key: str) -> tuple[str, str] | None:
    """The (A, B) keys of the LoRA pair ``key`` belongs to, None for any other tensor."""
    parts = key.split(".")
    for a, b in LORA_PAIRS:
        for name, other in ((a, b), (b, a)):
            if name in parts:
                at = len(parts) - 1 - parts[::-1].index(name)
                partner = ".".join([*parts[:at], other, *parts[at + 1 :]])
                return (key, partner) if name == a else (partner, key)
    return None


def block_index(key: str) -> int | None:
    """The block a tensor belongs to: the first number in its unsplit-model name (``model.layers.3.``,
    ``transformer.h.3.``), None for a tensor outside the blocks (embeddings, final norm, LM head)."""
    return next((int(part) for part in key.split(".") if part.isdigit()), None)


def contribution(
    client_side: Mapping[str, torch.Tensor],
    trunk: Mapping[str, torch.Tensor],
    blocks: Collection[int] | Any,
    block_of: Callable[[str], int | None] = block_index,
    blockless: bool = True,
) -> dict[str, torch.Tensor]:
    """What one client trained: its client side, and of its trunk adapter the tensors of ``blocks`` (the blocks
    its cut leaves to the server, or its server ``Route``; ``block_of`` maps a key to its block) and, with
    ``blockless``, those outside any block (a vanilla trunk's LM head)."""
    keep = set(getattr(blocks, "blocks", blocks))
    own = {}
    for key, value in trunk.items():
        block = block_of(key)
        if block in keep or (block is None and blockless):
            own[key] = value
    overlap = sorted(set(own) & set(client_side))
    if overlap:
        raise AggregationError(f"contribution: the client side and the trunk adapter both hold {overlap[:3]}")
    return {**client_side, **own}


def _check_weights(what: str, count: int, weights: Sequence[float]) -> None:
    if not count:
        raise AggregationError(f"{what}: no states to average (did every client drop out?)")
    if len(weights) != count:
        raise AggregationError(f"{what}: {count} states but {len(weights)} weights")
    if any(w < 0 for w in weights) or sum(weights) <= 0:
        raise AggregationError(f"{what}: weights must be >= 0 with a positive sum, got {list(weights)}")


def _mean(key: str, tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """``fedavg``'s arithmetic for one tensor: float64 sums in the states' order, the input dtype back."""
    reference = tensors[0]
    total = float(sum(weights))
    acc = torch.zeros(reference.shape, dtype=torch.float64)
    for tensor, weight in zip(tensors, weights, strict=True):
        if tensor.shape != reference.shape:
            raise AggregationError(
                f"aggregate: {key} has shapes {tuple(tensor.shape)} and {tuple(reference.shape)} in two states"
            )
        acc += tensor.detach().to("cpu", torch.float64) * (weight / total)
    return acc.to(reference.dtype)


def _stack(
    a_key: str, pairs: list[tuple[torch.Tensor, torch.Tensor]], weights: list[float]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One LoRA pair of mixed ranks: A stacked by rows, B by columns scaled by w_i R / r_i (module docstring)."""
    ranks = [a.shape[0] for a, _ in pairs]
    for a, b in pairs:
        if a.shape[1:] != pairs[0][0].shape[1:] or b.shape[0] != pairs[0][1].shape[0] or b.shape[1] != a.shape[0]:
            raise AggregationError(f"aggregate: {a_key} and its lora_B differ in shape across states")
    total, stacked = float(sum(weights)), float(sum(ranks))
    a = torch.cat([a.detach().to("cpu", torch.float64) for a, _ in pairs], dim=0)  # (R, in)
    scaled = [
        b.detach().to("cpu", torch.float64) * (w / total * stacked / r)
        for (_, b), w, r in zip(pairs, weights, ranks, strict=True)
    ]
    b = torch.cat(scaled, dim=1)  # (out, R)
    return a.to(pairs[0][0].dtype), b.to(pairs[0][1].dtype)


def aggregate(states: Sequence[Mapping[str, torch.Tensor]], weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """The weighted average of states that may hold different tensors and LoRA ranks (see the module docstring):
    each tensor over the states holding it, LoRA pairs of mixed ranks stacked. States with weight 0 add nothing."""
    _check_weights("aggregate", len(states), weights)
    held = [(state, float(w)) for state, w in zip(states, weights, strict=True) if w > 0]
    averaged: dict[str, torch.Tensor] = {}
    for key in dict.fromkeys(k for state, _ in held for k in state):
        if key in averaged:
            continue
        pair = lora_pair(key)
        holders = [(state, w) for state, w in held if key in state]
        if pair is None:
            averaged[key] = _mean(key, [s[key] for s, _ in holders], [w for _, w in holders])
            continue
        a_key, b_key = pair
        if any(a_key not in s or b_key not in s for s, _ in holders):
            raise AggregationError(f"aggregate: a state holds one of {a_key} and {b_key} without the other")
        ws = [w for _, w in holders]
        if len({s[a_key].shape[0] for s, _ in holders}) == 1:  # one rank: FedAvg of each factor
            averaged[a_key] = _mean(a_key, [s[a_key] for s, _ in holders], ws)
            averaged[b_key] = _mean(b_key, [s[b_key] for s, _ in holders], ws)
        else:
            averaged[a_key], averaged[b_key] = _stack(a_key, [(s[a_key], s[b_key]) for s, _ in holders], ws)
    return averaged


def _refit(a: torch.Tensor, b: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A (R, in), B (out, R) with scaling alpha/R as a rank-``rank`` pair with scaling alpha/rank: the best
    approximation of (rank/R) B A, exact where rank >= R.

    Truncation: B = Q_b R_b, A^T = Q_a R_a (QR), R_b R_a^T = U S V^T (SVD of an R x R matrix), so
    B A = (Q_b U) S (Q_a V)^T. The new A = (Q_a V_r)^T has orthonormal rows, the new B = Q_b U_r S_r (rank/R):
    no factor starts at zero where the product is not zero, and A's rows are about as long as peft's init's."""
    full = a.shape[0]
    if a.dim() != 2 or b.dim() != 2:
        raise AggregationError(f"fit: LoRA factors of shapes {tuple(a.shape)}, {tuple(b.shape)} cannot change rank")
    a64, b64 = a.detach().to("cpu", torch.float64), b.detach().to("cpu", torch.float64)
    scale = rank / full
    if rank >= full:  # room for the whole product: the stacked factors, padded
        # The padding keeps the product: B's new columns are 0. A's new rows are drawn as peft draws A (kaiming
        # uniform; from a generator fixed by the shapes, never the global one), so the padded directions still
        # learn: a row of A and a column of B that were both 0 would get no gradient, ever.
        fresh = torch.empty(rank - full, a64.shape[1], dtype=torch.float32)
        generator = torch.Generator().manual_seed(rank * 1_000_003 + full * 1009 + a64.shape[1])
        torch.nn.init.kaiming_uniform_(fresh, a=math.sqrt(5), generator=generator)
        a_new = torch.cat([a64, fresh.to(torch.float64)], dim=0)
        b_new = torch.cat([b64 * scale, b64.new_zeros(b64.shape[0], rank - full)], dim=1)
        return a_new.to(a.dtype), b_new.to(b.dtype)
    q_b, r_b = torch.linalg.qr(b64)  # (out, k), (k, R)
    q_a, r_a = torch.linalg.qr(a64.T)  # (in, k'), (k', R)
    u, s, vh = torch.linalg.svd(r_b @ r_a.T)  # (k, k'); s descending
    kept = min(rank, s.numel())
    a_new = a64.new_zeros(rank, a64.shape[1])
    b_new = b64.new_zeros(b64.shape[0], rank)
    a_new[:kept] = vh[:kept] @ q_a.T
    b_new[:, :kept] = (q_b @ u[:, :kept]) * (s[:kept] * scale)
    return a_new.to(a.dtype), b_new.to(b.dtype)


def fit(like: Mapping[str, torch.Tensor], aggregate: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """``aggregate`` fitted to one party: ``like``'s keys (every one must be in ``aggregate``), shapes and dtypes
    (``like`` may hold meta tensors: only its shapes and dtypes are read); a LoRA pair of another rank is cut
    down (or padded) to like's rank (``_refit``). Same shapes: the aggregate's tensors as they are."""
    missing = sorted(set(like) - set(aggregate))
    if missing:
        raise AggregationError(f"fit: the aggregate lacks {missing[:3]}, which this party holds")
    fitted: dict[str, torch.Tensor] = {}
    for key, reference in like.items():
        if key in fitted:
            continue
        value = aggregate[key]
        if value.shape == reference.shape:
            fitted[key] = value.to(reference.dtype)
            continue
        pair = lora_pair(key)
        if pair is None or pair[0] not in like or pair[1] not in like:
            raise AggregationError(
                f"fit: {key} has shape {tuple(value.shape)} in the aggregate but {tuple(reference.shape)} here"
            )
        a_key, b_key = pair
        a, b = _refit(aggregate[a_key], aggregate[b_key], like[a_key].shape[0])
        if a.shape != like[a_key].shape or b.shape != like[b_key].shape:
            raise AggregationError(f"fit: {a_key} and its lora_B do not match this party's module")
        fitted[a_key], fitted[b_key] = a.to(like[a_key].dtype), b.to(like[b_key].dtype)
    return fitted
