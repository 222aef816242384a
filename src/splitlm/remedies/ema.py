"""SLwF's decelerated update (survey §3.3, sequential ``sl``): ``remedies: {ema: {decay: e}}``.

The client side a sequential framework passes to the next client is an exponential moving average,
``e * previous + (1 - e) * trained``, so one client's local steps move the carried client side only part of the way
and cannot overwrite what the clients before it taught. e = 0 is off.
"""

from __future__ import annotations

from typing import Any

import torch
from pydantic import Field

from splitlm.registry import ComponentSettings
from splitlm.remedies.base import REMEDIES, Remedy, State


def decelerated(previous: State | None, trained: State, ema: float) -> State:
    """``ema * previous + (1 - ema) * trained`` tensor by tensor. Accumulated in float64 and returned in each trained
    tensor's dtype; with no previous carry (the very first client), or a tensor it lacks or shapes differently, the
    trained one as it is."""
    if previous is None:
        return dict(trained)
    mixed = {}
    for name, now in trained.items():
        before = previous.get(name)
        if before is None or before.shape != now.shape or not now.is_floating_point():
            mixed[name] = now
            continue
        average = ema * before.to(now.device, torch.float64) + (1.0 - ema) * now.to(torch.float64)
        mixed[name] = average.to(now.dtype)
    return mixed


@REMEDIES.component
class Ema(Remedy):
    name = "ema"
    former_keys = (("train.ema", "remedies.ema.decay"),)

    class Settings(ComponentSettings):
        decay: float = Field(
            0.5,
            ge=0,
            lt=1,
            allow_inf_nan=False,
            description="e: the client side passed to the next client is e * previous + (1 - e) * trained (0: off).",
        )

    @classmethod
    def problems(cls, settings: Any, config: Any, framework: Any) -> list[str]:
        if settings.decay and framework is not None and not framework.sequential:
            return [
                "remedies.ema averages the client side passed from one client to the next; "
                f"framework.name={framework.name} passes none: set framework.name=sl or remove it from remedies"
            ]
        return []

    def passed_on(self, previous: State, trained: State) -> State | None:
        return decelerated(previous, trained, self.settings.decay) if self.settings.decay else None
