"""Step 11: FedAvg, a pure function over state dicts."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
