"""Boosting (model replacement; Bagdasaryan et al. 2020): a malicious client scales up its update before averaging.

FedAvg of n client sides takes 1/n of each client's change; a malicious client that multiplies its change by about
n before handing it in replaces the global client side with its own (the update of any other attack it runs with,
e.g. the backdoor's). At its first step of each round the attack keeps its trainable weights (the global client side
it starts from); after its last step of the round it sets them to ``start + factor x (now - start)``. It reaches only
the client's own parts (head [+ tail]): its trunk adapter is on the server, trained and averaged as before. A scaled
update is far from the honest ones, which is what robust aggregation (median, trimmed mean, Krum) and SafeSplit look
for.

``privacy.client_attack: {backdoor: {clients: [3], target: rotten}, boost: {clients: [3], factor: 8}}``.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from splitlm.data import Batch
from splitlm.privacy.client_attack import CLIENT_ATTACKS, ClientAttack, ClientAttackSettings


@CLIENT_ATTACKS.component
class Boost(ClientAttack):
    name = "boost"

    class Settings(ClientAttackSettings):
        factor: float = Field(
            8.0,
            gt=0,
            allow_inf_nan=False,
            description="The malicious client's change over a round is multiplied by this before it is averaged "
            "(about framework.num_clients replaces the global client side with its own).",
        )

    def __init__(self, settings: Any = None) -> None:
        super().__init__(settings)
        self.start: dict[str, torch.Tensor] | None = None  # the weights at the round's first step
        self.start_step = -1
        self.boosted = 0  # rounds boosted

    def weights(self) -> dict[str, torch.nn.Parameter]:
        return {
            f"{role}.{name}": p
            for role, part in self.context.parts.items()
            for name, p in part.named_parameters()
            if p.requires_grad
        }

    def on_batch(self, key: tuple[str, int, int], batch: Batch) -> None:
        step = key[1]
        if step % max(self.context.local_steps, 1) == 0 and (self.start is None or step != self.start_step):
            self.start = {name: p.detach().clone() for name, p in self.weights().items()}
            self.start_step = step

    def after_step(self, step: int) -> None:
        if (step + 1) % max(self.context.local_steps, 1) != 0 or self.start is None:
            return  # not the round's last step, or the round's start is not known here (resumed mid-round)
        factor = self.settings.factor  # type: ignore[attr-defined]
        with torch.no_grad():
            for name, p in self.weights().items():
                start = self.start[name]
                p.copy_(start + factor * (p - start))
        self.start = None
        self.boosted += 1

    def report(self) -> dict[str, Any]:
        factor = self.settings.factor  # type: ignore[attr-defined]
        return {**super().report(), "factor": factor, "boosted_rounds": self.boosted}
