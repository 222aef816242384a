"""Byzantine-robust aggregation (survey §5.2): ``median``, ``trimmed_mean`` and ``krum`` in place of FedAvg's mean.

Each is the synchronous round (the framework's recipe) with another ``average``, used wherever the recipe averages:
the client sides (sflv1, sflv2, gsfl) and the trunk adapters (sflv1's per-client adapters, gsfl's per-group ones).
sflv2's one shared trunk adapter is trained by every client in turn and never averaged, so there a malicious client's
steps on it are not filtered (use sflv1, or a server guard).

- ``median`` (Yin et al. 2018): the coordinate-wise median of the states (the mean of the two middle values for an
  even count); the clients' sample counts are not used.
- ``trimmed_mean`` (Yin et al. 2018): per coordinate, drop the ``beta`` share of the largest and of the smallest
  values (floor(beta x n) each), average the rest.
- ``krum`` (Blanchard et al. 2017): with at most ``f`` Byzantine states among n, score each state by the sum of
  squared distances to its n - f - 2 nearest others and keep the lowest-scored one; ``m`` > 1 is multi-Krum, the
  samples-weighted mean of the m lowest-scored states (scored once). Needs n >= 2f + 3. Where a round averages
  several parts per client (sflv1: client sides and trunk adapters; gsfl: per group), a client is one point made of
  all its parts (``Strategy.average_parts``), and the same clients are kept for every part.

Every state is flattened in float64 for the distances; each tensor comes back in its input dtype. ``summary()``
names which states Krum kept at its last aggregation (0-based, in the recipe's order: client index order).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from pydantic import Field

from splitlm.frameworks.aggregate import AggregationError
from splitlm.frameworks.aggregation import STRATEGIES, Strategy
from splitlm.registry import ComponentSettings

KEY = "framework.aggregation"


def states_per_round(config: Any, framework: Any) -> int:
    """How many states the recipe averages each round: one per group (gsfl's group adapters), else one per client
    of the round."""
    fw = config.framework
    if framework.trunk_adapters == "group":
        return len(fw.groups) if fw.groups else fw.num_groups
    return fw.clients_per_round or fw.num_clients


def stacked(states: list[dict[str, torch.Tensor]], key: str) -> torch.Tensor:
    """``key``'s tensors of every state stacked, in float64 on the CPU (n, ...)."""
    shape = states[0][key].shape
    for index, state in enumerate(states):
        if key not in state or state[key].shape != shape:
            raise AggregationError(f"robust aggregation: state {index} has no {key} of shape {tuple(shape)}")
    return torch.stack([state[key].detach().to("cpu", torch.float64) for state in states])


class Robust(Strategy):
    """A synchronous round whose ``average`` resists a few malicious states."""

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if framework is None:
            return []
        key = f"{KEY}={cls.name}"
        if not framework.aggregates:
            return [
                f"{key}: a robust average of the clients' client sides; framework.name={framework.name} averages none "
                "(use sflv1, sflv2 or gsfl)"
            ]
        from splitlm.frameworks.setup import mixed_clients

        if mixed_clients(config):
            return [
                f"{key}: clients of different cuts or LoRA ranks are averaged module by module (FedAvg only); drop "
                "split and lora from framework.clients or use framework.aggregation=sync"
            ]
        return cls.own_problems(settings, states_per_round(config, framework))

    @classmethod
    def own_problems(cls, settings: Any, n: int) -> list[str]:
        """What this strategy cannot do with ``n`` states per round."""
        return []

    def average(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        if not states:
            raise AggregationError(f"{KEY}={self.name}: no states to aggregate (did every client drop out?)")
        return {key: self.combine(stacked(states, key), weights).to(states[0][key].dtype) for key in states[0]}

    def combine(self, values: torch.Tensor, weights: list[float]) -> torch.Tensor:
        """One tensor from ``values`` (n, ...) of the n states."""
        raise NotImplementedError


@STRATEGIES.component
class Median(Robust):
    name = "median"

    def combine(self, values: torch.Tensor, weights: list[float]) -> torch.Tensor:
        ordered = values.sort(dim=0).values
        n = values.shape[0]
        return (ordered[(n - 1) // 2] + ordered[n // 2]) / 2


@STRATEGIES.component
class TrimmedMean(Robust):
    name = "trimmed_mean"

    class Settings(ComponentSettings):
        beta: float = Field(
            0.2,
            ge=0,
            lt=0.5,
            allow_inf_nan=False,
            description="Share of the largest and of the smallest values dropped per coordinate (floor(beta x n) "
            "each) before averaging the rest.",
        )

    @classmethod
    def own_problems(cls, settings: Any, n: int) -> list[str]:
        if n and math.floor(settings.beta * n) == 0 and settings.beta > 0:
            return [
                f"{KEY}.trimmed_mean.beta={settings.beta:g}: drops floor(beta x {n}) = 0 of the {n} values per round "
                f"(a plain mean); raise beta to at least {1 / n:.3g}"
            ]
        return []

    def combine(self, values: torch.Tensor, weights: list[float]) -> torch.Tensor:
        n = values.shape[0]
        cut = math.floor(self.settings.beta * n)  # type: ignore[attr-defined]
        return values.sort(dim=0).values[cut : n - cut].mean(dim=0)


@STRATEGIES.component
class Krum(Robust):
    name = "krum"

    class Settings(ComponentSettings):
        f: int = Field(1, ge=0, description="The most malicious states Krum is to withstand per round.")
        m: int = Field(1, ge=1, description="States kept: 1 is Krum, more is multi-Krum (their samples-weighted mean).")

    def __init__(self, settings: ComponentSettings | None = None) -> None:
        super().__init__(settings)
        self.selected: list[int] = []

    @classmethod
    def own_problems(cls, settings: Any, n: int) -> list[str]:
        f, m = settings.f, settings.m
        if n < 2 * f + 3:
            return [
                f"{KEY}.krum.f={f}: Krum needs at least 2f + 3 = {2 * f + 3} states per round, got {n}; lower f or add "
                "clients"
            ]
        if m > n - f:
            return [f"{KEY}.krum.m={m}: keeps at most n - f = {n - f} of {n} states per round; lower m"]
        return []

    def scores(self, flat: torch.Tensor) -> torch.Tensor:
        """Each state's Krum score (n,): the sum of squared distances to its n - f - 2 nearest others."""
        n = flat.shape[0]
        distances = torch.cdist(flat, flat).pow(2)  # (n, n)
        nearest = n - self.settings.f - 2  # type: ignore[attr-defined]
        ordered = distances.sort(dim=1).values[:, 1 : nearest + 1]  # without the distance to itself
        return ordered.sum(dim=1)

    def average(self, states: list[dict[str, torch.Tensor]], weights: list[float]) -> dict[str, torch.Tensor]:
        return self.average_parts([states], weights)[0]

    def average_parts(
        self, parts: list[list[dict[str, torch.Tensor]]], weights: list[float]
    ) -> list[dict[str, torch.Tensor]]:
        """Krum over clients: a client is one point, all its parts flattened together (its client side and the trunk
        adapter trained with it), and every part is the mean of the same kept clients' (a client side of one client
        with the trunk adapter of another would be a model nobody trained)."""
        n = len(parts[0]) if parts else 0
        if not n:
            raise AggregationError(f"{KEY}=krum: no states to aggregate (did every client drop out?)")
        if any(len(states) != n for states in parts):
            raise AggregationError(f"{KEY}=krum: parts of {[len(s) for s in parts]} states; one per client each")
        problems = self.own_problems(self.settings, n)
        if problems:
            raise AggregationError(problems[0])
        flat = torch.cat(
            [stacked(states, key).reshape(n, -1) for states in parts for key in states[0]], dim=1
        )  # (n, P)
        m = self.settings.m  # type: ignore[attr-defined]
        self.selected = sorted(torch.argsort(self.scores(flat), stable=True)[:m].tolist())
        kept = [float(weights[i]) for i in self.selected]
        total = sum(kept) or float(len(kept))
        share = torch.tensor([w / total if sum(kept) else 1 / len(kept) for w in kept], dtype=torch.float64)
        averaged = []
        for states in parts:
            out = {}
            for key in states[0]:
                values = stacked([states[i] for i in self.selected], key)  # (m, ...)
                out[key] = torch.tensordot(share, values, dims=1).to(states[0][key].dtype)
            averaged.append(out)
        return averaged

    def summary(self) -> dict[str, object]:
        return {**super().summary(), "selected": self.selected}
