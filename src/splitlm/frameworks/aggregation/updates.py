"""The arithmetic of asynchronous aggregation (``asynchronous.py``, ``semi_async.py``; survey §4.4), pure functions.

An update is what a client's training changed since it last took the global model or handed an update in,
``delta = L - base`` (per tensor, in the client's own shapes), and the global model moves by weighted deltas,
``G <- G + sum w_i delta_i``. Deltas, not models, are applied: an update trained from an older global model still
carries only its own progress, instead of dragging the global model back toward the old one, and with one client
and no staleness the result is that client's own training.

The global model is one flat state under unsplit-model names, each LoRA module once: a client's update covers its
client side and the blocks its trunk adapter runs for it on the server (``Federation.contribution``), so clients
with different cuts mix module by module; each tensor's weights are renormalised over the updates that hold it.
The global model keeps the largest client rank; a client of another rank is mixed in by its LoRA product instead
(``G <- fit(G, aggregate([G, L], [1 - w, w]))``, ``aggregate.py``), since factor deltas of different ranks do not add.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from splitlm.frameworks.aggregate import aggregate, fit, lora_pair

State = dict[str, torch.Tensor]


@dataclass
class AsyncStats:
    """What ``summary.json`` reports under ``aggregation``."""

    mode: str
    versions: int = 0
    handed_in: int = 0
    applied: int = 0
    dropped: int = 0
    superseded: int = 0  # semi_async: replaced by a later update of the same client in the same window
    staleness: list[int] = field(default_factory=list)

    def summary(self) -> dict[str, object]:
        stale = self.staleness
        return {
            "mode": self.mode, "versions": self.versions, "handed_in": self.handed_in, "applied": self.applied,
            "dropped": self.dropped, "superseded": self.superseded,
            "mean_staleness": sum(stale) / len(stale) if stale else 0.0, "max_staleness": max(stale, default=0),
        }  # fmt: skip


def staleness_weight(settings: Any, share: float, staleness: int) -> float | None:
    """async: the weight an update gets in ``G <- (1 - a) G + a L``, or None past ``settings.max_staleness`` versions
    (dropped): ``mix * share * (1 + staleness) ** -staleness_exponent``, at most 1 (``settings``: async's). ``share``
    is the client's samples over the mean client's."""
    if staleness > settings.max_staleness:
        return None
    return min(1.0, settings.mix * share * (1.0 + staleness) ** -settings.staleness_exponent)


def window_weights(shares: list[float], missed: list[int]) -> list[float]:
    """semi_async: each arrival's weight, its share of the samples times the windows since it last took part,
    normalised to sum to 1."""
    weights = [share * max(count, 1) for share, count in zip(shares, missed, strict=True)]
    total = sum(weights)
    return [w / total for w in weights]


def apply_updates(
    global_state: State, updates: Sequence[tuple[State, State]], weights: Sequence[float]
) -> dict[str, torch.Tensor]:
    """``G + sum_i w_i delta_i`` per tensor. ``updates`` are (delta, state) pairs; a tensor's weights are
    rescaled over the updates that hold it to the sum of all the weights. A LoRA pair whose shape differs from
    the global model's (another rank) is mixed in by its product instead: ``fit(G, aggregate([G, L], [1 - w, w]))``.
    Sums in float64; every tensor keeps the global model's dtype."""
    total = float(sum(weights))
    result = dict(global_state)
    for key, current in global_state.items():
        holders = [(delta, state, w) for (delta, state), w in zip(updates, weights, strict=True) if key in delta]
        held = sum(w for _, _, w in holders)
        if not holders or held <= 0:
            continue
        scale = total / held
        acc = current.detach().to("cpu", torch.float64)
        for delta, _, w in holders:
            if delta[key].shape == current.shape:
                acc = acc + delta[key].detach().to("cpu", torch.float64) * (w * scale)
        result[key] = acc.to(current.dtype)
    for (delta, state), w in zip(updates, weights, strict=True):  # other ranks: by their product
        mismatched = {k for k in delta if k in global_state and delta[k].shape != global_state[k].shape}
        for a_key in sorted(k for k in mismatched if (pair := lora_pair(k)) is not None and pair[0] == k):
            b_key = lora_pair(a_key)[1]  # type: ignore[index]
            mine = {a_key: result[a_key], b_key: result[b_key]}
            mixed = aggregate([mine, {a_key: state[a_key], b_key: state[b_key]}], [1.0 - min(w, 1.0), min(w, 1.0)])
            result.update(fit(mine, mixed))
    return result
